import json
import os
import signal
from pathlib import Path

import pytest

from clara_ray.config import load_config
from clara_ray.data.trap import generate_trap_corpus
from clara_ray.modeling.checkpoint import load_model
from clara_ray.modeling.initial import build_initial_model
from clara_ray.progress import PROGRESS_FILE, read_stage_progress
from clara_ray.training.stages import run_stage1, write_training_data

pytestmark = pytest.mark.ray

SMALL = [
    "model.tiny.hidden_size=64", "model.tiny.num_layers=2", "model.tiny.num_heads=2",
    "model.tiny.intermediate_size=128", "model.tiny.vocab_size=500",
    "stage1.micro_batch_size_per_worker=8", "stage1.learning_rate=3e-3", "stage3.top_k=2",
    "stage3.num_candidates=8", "stage3.micro_batch_size_per_worker=8",
]
STAGE1 = SMALL + ["stage1.steps=40", "stage1.report_every=5", "stage1.checkpoint_every=10", "train.num_workers=2",
                  "train.zero_stage=2"]


def _stage1(tmp_path: Path, loop=None):
    """(config, StageResult) of a small two-worker stage 1 whose run directory is `tmp_path`."""
    config = load_config(None, STAGE1)
    corpus = generate_trap_corpus(num_entities=12, seed=3)
    initial = build_initial_model(config, corpus.documents, corpus.train_qa, tmp_path / "init")
    init_dir, config = initial.model_dir, initial.config
    documents = {d.id: d.text for d in corpus.documents}
    data = write_training_data(config, documents, corpus.train_qa, tmp_path)
    extra = {} if loop is None else {"loop": loop}
    return config, run_stage1(config, data, init_dir, tmp_path, **extra)


@pytest.fixture(scope="module")
def uninterrupted(local_ray, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    return (*_stage1(run_dir), run_dir)


def test_two_worker_deepspeed_stage1_loss_goes_down(uninterrupted):
    config, result, run_dir = uninterrupted
    losses = [h["loss"] for h in result.history]
    assert [h["step"] for h in result.history] == list(range(5, 41, 5))
    assert losses[-1] < 0.7 * losses[0], losses
    # The checkpoint is a model directory the evaluation can load, adapters in safetensors.
    assert (result.model_dir / "adapters.safetensors").exists()
    manifest = json.loads((result.model_dir / "clara.json").read_text())
    assert manifest["backbone"] == "backbone"
    model, _, _ = load_model(result.model_dir)
    assert model.num_memory_tokens == config.model.num_memory_tokens
    assert all(h["tokens_per_second"] > 0 for h in result.history)
    assert list((run_dir / "tensorboard" / "stage1").glob("events.out.tfevents.*"))
    # Rank 0's place, which the driver draws its bar from on a terminal (clara_ray/progress.py).
    progress = read_stage_progress(run_dir / "ray_train" / "stage1" / PROGRESS_FILE)
    assert progress == {"step": 40, "total": 40, "status": f"loss {losses[-1]:.4g}"}


def test_killed_worker_resumes_from_its_checkpoint_and_ends_like_an_uninterrupted_run(uninterrupted, tmp_path):
    """Rank 1 SIGKILLs itself after its 13th step, once, when Ray Train has taken the
    checkpoint of step 10 (the only one by then): the restart must go on from there,
    and training is deterministic on CPU, so every window's loss must match."""
    marker = str(tmp_path / "killed-once")

    def loop_that_loses_a_worker(run):
        import ray.train

        from clara_ray.training import loops

        step, calls = loops.stage1_step, []

        def step_then_die_once(*args, **kwargs):
            metrics = step(*args, **kwargs)
            calls.append(1)
            if len(calls) == 13 and ray.train.get_context().get_world_rank() == 1 and not os.path.exists(marker):
                ray.train.get_all_reported_checkpoints()  # blocks until Ray Train has taken the step-10 one
                open(marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
            return metrics

        loops.stage1_step = step_then_die_once
        return loops.stage1_loop(run)

    _, result = _stage1(tmp_path, loop_that_loses_a_worker)
    assert os.path.exists(marker), "the worker was never killed"
    assert result.resumed_after == [10]
    _, clean, _ = uninterrupted
    assert clean.resumed_after == []
    assert [h["step"] for h in result.history] == [h["step"] for h in clean.history]
    # Same weights, optimizer state, schedule, batches and random state after the
    # restart: the same arithmetic in the same order, so equal to float rounding.
    assert [h["loss"] for h in result.history] == pytest.approx([h["loss"] for h in clean.history], rel=1e-6)
    load_model(result.model_dir)

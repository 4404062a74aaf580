import json

import pytest

from clara_ray.config import load_config
from clara_ray.data.trap import generate_trap_corpus
from clara_ray.modeling.checkpoint import load_model
from clara_ray.modeling.initial import build_initial_model
from clara_ray.training.stages import run_stage1

pytestmark = pytest.mark.ray

SMALL = [
    "model.tiny.hidden_size=64", "model.tiny.num_layers=2", "model.tiny.num_heads=2",
    "model.tiny.intermediate_size=128", "model.tiny.vocab_size=500",
    "stage1.micro_batch_size_per_worker=8", "stage1.learning_rate=3e-3", "stage3.top_k=2",
    "stage3.num_candidates=8",
]


def test_two_worker_deepspeed_stage1_loss_goes_down(local_ray, tmp_path):
    config = load_config(None, SMALL + ["stage1.steps=40", "stage1.report_every=10", "train.num_workers=2",
                                        "train.zero_stage=2"])
    corpus = generate_trap_corpus(num_entities=12, seed=3)
    init_dir = build_initial_model(config, corpus.documents, corpus.train_qa, tmp_path / "init")

    result = run_stage1(config, {d.id: d.text for d in corpus.documents}, corpus.train_qa, init_dir, tmp_path)

    losses = [h["loss"] for h in result.history]
    assert [h["step"] for h in result.history] == [10, 20, 30, 40]
    assert losses[-1] < 0.7 * losses[0], losses
    # The checkpoint is a model directory the evaluation can load, adapters in safetensors.
    assert (result.model_dir / "adapters.safetensors").exists()
    manifest = json.loads((result.model_dir / "clara.json").read_text())
    assert manifest["backbone"] == "backbone"
    model, _, _ = load_model(result.model_dir)
    assert model.num_memory_tokens == config.model.num_memory_tokens

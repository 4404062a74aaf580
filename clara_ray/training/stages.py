"""Drivers for the training stages: config in, Ray Train + DeepSpeed run, model directory out.

    stage1 = run_stage1(config, documents, train_qa, init_model_dir, run_dir)
    stage2 = run_stage2(config, documents, train_qa, stage1.model_dir, run_dir)   # when config.stage2.enabled
    stage3 = run_stage3(config, train_qa, stage2.model_dir, IndexActorCandidates(router), run_dir)

Each returns a `StageResult` with the trained model directory (copied out of Ray
Train's storage into <run_dir>/models/<stage>) and the metric history.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from clara_ray.config import Config
from clara_ray.training.batches import QuestionBatch, prepare_stage1_examples, prepare_stage2_examples
from clara_ray.training.candidates import CandidateSource
from clara_ray.training.checkpoints import MODEL_DIR, read_trainer_state
from clara_ray.training.loops import stage1_loop, stage2_loop, stage3_loop
from clara_ray.training.settings import Stage1Settings, Stage2Settings, Stage3Settings, WorkerSettings


@dataclass(frozen=True)
class StageResult:
    model_dir: Path
    history: list[dict]
    resumed_after: list[int]  # steps after which a failed stage went on from its checkpoint


def _fit(loop, loop_config: dict, config: Config, run_dir: Path, stage: str) -> StageResult:
    run_dir = Path(run_dir).resolve()
    loop_config = {"worker": WorkerSettings.from_config(config), "tensorboard_dir": str(run_dir / "tensorboard"),
                   **loop_config}
    resources = {"CPU": config.train.cpu_threads_per_worker}
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=config.train.num_workers, use_gpu=config.train.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=stage,
            storage_path=str(run_dir / "ray_train"),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=config.train.max_failures),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"{stage} failed") from result.error
    # Copied beside its place and renamed: models/<stage> appears whole or not at all.
    model_dir, partial = run_dir / "models" / stage, run_dir / "models" / f"{stage}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    with result.checkpoint.as_directory() as directory:
        shutil.copytree(Path(directory) / MODEL_DIR, partial)
        state = read_trainer_state(directory)
    if model_dir.exists():
        shutil.rmtree(model_dir)
    partial.rename(model_dir)
    return StageResult(model_dir, state["history"], state["resumed_after"])


def run_stage1(config: Config, documents: dict[str, str], train_qa, init_model_dir: Path, run_dir: Path,
               loop=stage1_loop) -> StageResult:
    """Compressor pretraining on every document (reconstruction) and the training
    QA pairs with their gold documents. `loop` is the per-worker function (a test
    wraps it to kill a worker); rerun with the same `run_dir` after a killed driver
    and Ray Train resumes from the stage's last checkpoint."""
    s1 = config.stage1
    examples = prepare_stage1_examples(
        documents, train_qa, s1.hard_distractor_fraction, s1.hard_distractor_pool, s1.rival_pool, config.run.seed
    )
    loop_config = {
        "settings": Stage1Settings.from_config(config),
        "model_dir": str(init_model_dir),
        "examples": examples,
        "documents": list(documents.values()),
    }
    return _fit(loop, loop_config, config, run_dir, "stage1")


def run_stage2(config: Config, documents: dict[str, str], train_qa, stage1_model_dir: Path, run_dir: Path) -> StageResult:
    """Instruction tuning on the training QA pairs with their gold documents among
    BM25-retrieved ones."""
    loop_config = {
        "settings": Stage2Settings.from_config(config),
        "model_dir": str(stage1_model_dir),
        "examples": prepare_stage2_examples(documents, train_qa, config.stage2.num_documents),
        "documents": list(documents.values()),
    }
    return _fit(stage2_loop, loop_config, config, run_dir, "stage2")


def run_stage3(config: Config, train_qa, stage1_model_dir: Path, candidates: CandidateSource, run_dir: Path) -> StageResult:
    """Joint training of query reasoner and generator through the top-k, candidates
    from `candidates` (the index actors in the pipeline). Gold document ids travel
    along only to log training recall."""
    loop_config = {
        "settings": Stage3Settings.from_config(config),
        "model_dir": str(stage1_model_dir),
        "candidates": candidates,
        "questions": QuestionBatch.from_qa(train_qa),
    }
    return _fit(stage3_loop, loop_config, config, run_dir, "stage3")

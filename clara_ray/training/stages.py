"""Drivers for the training stages: config in, Ray Train + DeepSpeed run, model directory out.

    stage1 = run_stage1(config, documents, train_qa, init_model_dir, run_dir)
    stage3 = run_stage3(config, train_qa, stage1.model_dir, index_actor_name, run_dir)

Each returns a `StageResult` with the trained model directory (copied out of Ray
Train's storage into <run_dir>/models/<stage>) and the metric history.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.train import CheckpointConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from clara_ray.config import Config
from clara_ray.data.formats import Document
from clara_ray.eval.baselines import bm25_rankings
from clara_ray.training.batches import stage1_examples
from clara_ray.training.loops import stage1_loop, stage3_loop
from clara_ray.training.rivals import rival_documents


@dataclass(frozen=True)
class StageResult:
    model_dir: Path
    history: list[dict]


def _common(config: Config, model_dir: Path) -> dict:
    return {
        "model_dir": str(model_dir),
        "seed": config.run.seed,
        "use_gpu": config.train.use_gpu,
        "cpu_threads": config.train.cpu_threads_per_worker,
        "zero_stage": config.train.zero_stage,
        "gradient_clipping": config.train.gradient_clipping,
        "dtype": config.model.dtype.value,
        "lengths": {
            "doc": config.model.doc_max_len,
            "question": config.model.question_max_len,
            "answer": config.model.answer_max_len,
            "reconstruction": config.model.reconstruction_max_len,
        },
    }


def _fit(loop, loop_config: dict, config: Config, run_dir: Path, stage: str) -> StageResult:
    run_dir = Path(run_dir).resolve()
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
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"{stage} failed") from result.error
    # Copied beside its place and renamed: models/<stage> appears whole or not at all.
    model_dir, partial = run_dir / "models" / stage, run_dir / "models" / f"{stage}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    with result.checkpoint.as_directory() as directory:
        shutil.copytree(directory, partial)
    if model_dir.exists():
        shutil.rmtree(model_dir)
    partial.rename(model_dir)
    return StageResult(model_dir, list(result.return_value or []))


def run_stage1(config: Config, documents: dict[str, str], train_qa, init_model_dir: Path, run_dir: Path) -> StageResult:
    """Compressor pretraining on every document (reconstruction) and the training
    QA pairs with their gold documents."""
    neighbours = None
    if config.stage1.hard_distractor_fraction > 0 and len(documents) > 1:
        corpus = [Document(doc_id, text) for doc_id, text in documents.items()]
        depth = min(len(corpus), config.stage1.hard_distractor_pool + 1)  # +1: the gold one drops out
        neighbours = bm25_rankings(corpus, [qa.question for qa in train_qa], depth)
    rivals = None
    if config.stage1.rival_pool > 0:
        rivals = rival_documents(documents, train_qa, config.stage1.rival_pool, config.run.seed)
    examples = stage1_examples(documents, train_qa, neighbours, rivals)
    loop_config = {
        **_common(config, init_model_dir),
        "steps": config.stage1.steps,
        "learning_rate": config.stage1.learning_rate,
        "warmup_fraction": config.stage1.warmup_fraction,
        "micro_batch_size": config.stage1.micro_batch_size_per_worker,
        "mse_weight": config.stage1.mse_weight,
        "reconstruction_order": config.stage1.reconstruction_order.value,
        "counterfactual_rate": config.stage1.counterfactual_rate,
        "hard_fraction": config.stage1.hard_distractor_fraction,
        "rival_steps": round(config.stage1.rival_steps_fraction * config.stage1.steps),
        "min_context_docs": config.stage1.min_context_docs,
        "report_every": config.stage1.report_every,
        "train_backbone": config.model.train_backbone_in_stage1,
        "num_context_docs": config.stage1.max_context_docs,
        "examples": [(e.document, e.question, e.answer, e.neighbours, e.rivals) for e in examples],
        "documents": list(documents.values()),
    }
    return _fit(stage1_loop, loop_config, config, run_dir, "stage1")


def run_stage3(config: Config, train_qa, stage1_model_dir: Path, index_actor: str, run_dir: Path) -> StageResult:
    """Joint training of query reasoner and generator through the top-k.
    Gold document ids travel along only to log training recall."""
    loop_config = {
        **_common(config, stage1_model_dir),
        "steps": config.stage3.steps,
        "learning_rate": config.stage3.learning_rate,
        "warmup_fraction": config.stage3.warmup_fraction,
        "micro_batch_size": config.stage3.micro_batch_size_per_worker,
        "report_every": config.stage3.report_every,
        "train_generator": config.stage3.train_generator,
        "top_k": config.stage3.top_k,
        "temperature": config.stage3.temperature,
        "initial_temperature": config.stage3.initial_temperature or config.stage3.temperature,
        "num_candidates": config.stage3.num_candidates,
        "retrieval_gain_learning_rate": config.stage3.retrieval_gain_learning_rate,
        "retrieval_gain_start_fraction": config.stage3.retrieval_gain_start_fraction,
        "anchor_weight": config.stage3.anchor_weight,
        "anchor_start_fraction": config.stage3.anchor_start_fraction,
        "index_actor": index_actor,
        "index_namespace": ray.get_runtime_context().namespace,
        "questions": [qa.question for qa in train_qa],
        "answers": [qa.answers[0] for qa in train_qa],
        "gold_doc_ids": [list(qa.gold_doc_ids) for qa in train_qa],
    }
    return _fit(stage3_loop, loop_config, config, run_dir, "stage3")

"""Per-worker training loops for Ray Train (one process per worker, DeepSpeed inside).

Each loop takes a dict of typed settings and data (built by
`clara_ray.training.stages`), runs the stage's step function
(`clara_ray.training.steps`) for a fixed number of steps, reports metrics every `report_every` steps (a barrier:
every rank reports the same number of times), and ends by reporting a model
directory (see `clara_ray.modeling.checkpoint`) as the Ray Train checkpoint.
Rank 0 prints progress lines and returns the metric history.
"""

from __future__ import annotations

import logging
import tempfile
import time

import ray
import ray.train
import torch
import torch.distributed as dist

from clara_ray.modeling.checkpoint import load_model, save_model
from clara_ray.modeling.clara import Role
from clara_ray.training.batches import stage1_batches, stage3_batches
from clara_ray.training.engine import DeepSpeedUpdater, OptimiserSettings, ParameterAnchor, full_parameters
from clara_ray.training.settings import Stage1Settings, Stage3Settings, WorkerSettings
from clara_ray.training.steps import MetricWindow, progress_line, stage1_step, stage3_step


class _Reporter:
    """Averages step metrics over each reporting window (and over ranks), prints a
    progress line with ETA on rank 0, and reports to Ray Train. The last window
    is reported by `_finish`, together with the checkpoint."""

    def __init__(self, stage: str, total_steps: int, report_every: int, rank: int):
        self.stage, self.total, self.rank = stage, total_steps, rank
        self.window = MetricWindow(report_every, total_steps)
        self.started = time.perf_counter()
        self.history: list[dict] = []

    def add(self, step: int, values: dict[str, float], learning_rate: float) -> None:
        means = self.window.add(step, values)
        if means is None:
            return
        metrics = _mean_over_ranks(means)
        metrics.update(step=step, stage=self.stage, learning_rate=learning_rate)
        self.history.append(metrics)
        if self.rank == 0:
            print(progress_line(self.stage, step, self.total, metrics, time.perf_counter() - self.started), flush=True)
        if step != self.total:
            ray.train.report(metrics)


def _mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(tensor)
    tensor /= dist.get_world_size()
    return dict(zip(keys, tensor.tolist()))


def _quiet_report_logging() -> None:
    """Ray Train logs every `ray.train.report` of every worker at INFO, metrics
    dict included; `_Reporter` already prints one progress line per window."""
    try:  # an internal module (Ray 2.60): if it moves, the lines just come back
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def _setup(run: dict, trainable: list[Role], train_backbone: bool, optimiser: OptimiserSettings, micro_batch_size: int):
    _quiet_report_logging()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    worker: WorkerSettings = run["worker"]
    if not worker.use_gpu:
        torch.set_num_threads(worker.cpu_threads)
    torch.manual_seed(worker.seed + rank)
    model, tokenizer, manifest = load_model(run["model_dir"])
    model.set_trainable(trainable, backbone=train_backbone)
    updater = DeepSpeedUpdater(model, optimiser, micro_batch_size, worker.zero_stage, worker.use_gpu, worker.bf16)
    return rank, world, updater, tokenizer, manifest


def _finish(updater, tokenizer, manifest, rank: int, metrics: dict, trained_backbone: bool) -> None:
    """Report the final model directory as this run's checkpoint.

    The base weights are written when they were trained here or came from a
    model directory (the tiny preset); a frozen pretrained base stays a reference.
    """
    save_backbone = trained_backbone or manifest["backbone"] == "backbone"
    with tempfile.TemporaryDirectory() as directory:
        with full_parameters(updater):
            if rank == 0:
                save_model(updater.module, tokenizer, directory, manifest["backbone"], save_backbone)
        checkpoint = ray.train.Checkpoint.from_directory(directory) if rank == 0 else None
        ray.train.report(metrics, checkpoint=checkpoint)


def stage1_loop(run: dict):
    """Compressor pretraining: compressor + generator (and base, if configured).
    `run`: worker (WorkerSettings), settings (Stage1Settings), model_dir, examples, documents."""
    settings: Stage1Settings = run["settings"]
    worker: WorkerSettings = run["worker"]
    rank, world, updater, tokenizer, manifest = _setup(
        run, [Role.COMPRESSOR, Role.GENERATOR], settings.train_backbone, settings.optimiser, settings.micro_batch_size
    )
    reporter = _Reporter("stage1", settings.steps, settings.report_every, rank)
    for step, batch in stage1_batches(
        run["examples"], run["documents"], settings, worker.lengths, tokenizer, updater.module.num_memory_tokens,
        worker.seed, rank, world,
    ):
        learning_rate = updater.learning_rate()  # the one this step runs at
        reporter.add(step, stage1_step(updater, batch, settings), learning_rate)
    # Stage 3 starts its query reasoner from the trained compressor (CLaRa's init).
    updater.module.copy_adapter(Role.COMPRESSOR, Role.QUERY_REASONER)
    _finish(updater, tokenizer, manifest, rank, reporter.history[-1], settings.train_backbone)
    return reporter.history


def stage3_loop(run: dict):
    """Joint training: query reasoner (+ generator) through the differentiable top-k,
    candidates drawn from `run["candidates"]` (a CandidateSource); compressor and base
    frozen. `run`: worker, settings (Stage3Settings), model_dir, candidates, questions
    (QuestionBatch of every training question)."""
    settings: Stage3Settings = run["settings"]
    worker: WorkerSettings = run["worker"]
    trainable = [Role.QUERY_REASONER] + ([Role.GENERATOR] if settings.train_generator else [])
    rank, world, updater, tokenizer, manifest = _setup(
        run, trainable, False, settings.optimiser, settings.micro_batch_size
    )
    reporter = _Reporter("stage3", settings.steps, settings.report_every, rank)
    anchor = ParameterAnchor(updater.module, settings.anchor_weight)
    for step, batch in stage3_batches(run["questions"], settings.micro_batch_size, settings.steps, worker.seed, rank, world):
        learning_rate = updater.learning_rate()
        metrics = stage3_step(updater, tokenizer, batch, run["candidates"], settings, worker.lengths, step, anchor)
        reporter.add(step, metrics, learning_rate)
    _finish(updater, tokenizer, manifest, rank, reporter.history[-1], trained_backbone=False)
    return reporter.history

"""Per-worker training loops for Ray Train (one process per worker, DeepSpeed inside).

Each loop takes a dict of typed settings and file paths (built by
`clara_ray.training.stages`), reads its micro-batches from the trainer's draw
plan (a Ray Dataset, ``training.data``), runs the stage's step function
(`clara_ray.training.steps`) for a fixed number of steps, reports metrics every
`report_every` steps and a checkpoint (`clara_ray.training.checkpoints`) every
`checkpoint_every` steps and after the last one (a report is a barrier: every
rank reports at the same steps). After a failure Ray Train restarts the workers
and each loop resumes from `ray.train.get_checkpoint()`: weights, optimizer,
schedule, batch position and random state, so the run goes on as if nothing
had happened. Rank 0 prints progress lines and returns the metric history.
"""

from __future__ import annotations

import logging
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
import torch
import torch.distributed as dist

from clara_ray.modeling.checkpoint import load_model, save_model
from clara_ray.modeling.clara import Role
from clara_ray.modeling.text import tokenize_texts
from clara_ray.progress import write_stage_progress
from clara_ray.training.batches import memory_qa_batch, salient_word_weights
from clara_ray.training.checkpoints import (
    MODEL_DIR,
    load_rank_state,
    read_trainer_state,
    save_rank_state,
    write_trainer_state,
)
from clara_ray.training.data import rank_batches
from clara_ray.training.engine import DeepSpeedUpdater, ParameterAnchor, full_parameters
from clara_ray.training.settings import OptimiserSettings
from clara_ray.training.settings import Stage2Settings, Stage3Settings, WorkerSettings
from clara_ray.training.steps import MetricWindow, attempt_fit, progress_line, stage1_step, stage2_step, stage3_step
from clara_ray.training.worlds import CounterfactualWorlds
from clara_ray.training.tables import DocumentTable, example_from_row, questions_from_rows, read_answer_pool, read_table
from clara_ray.training.validation import validation_recall


class _Reporter:
    """Averages step metrics over each reporting window (and over ranks), prints a
    progress line with ETA on rank 0 (or, when the driver draws a bar, keeps rank 0's
    progress file current: ``clara_ray/progress.py``), and reports to Ray Train: every
    window's metrics, and a checkpoint (``checkpoints.py``) every `checkpoint_every`
    steps and after the last. Every rank reports at the same steps (a report is a barrier)."""

    def __init__(self, stage: str, total_steps: int, report_every: int, checkpoint_every: int, rank: int,
                 world: int, history: list[dict], first_step: int, run: dict, window_metrics=None):
        """`run`: the loop config (its tensorboard_dir and progress settings).
        `window_metrics()`, when given, is called on every rank at the end of each
        window; what it returns (rank 0's) joins that window's metrics."""
        self.stage, self.total, self.rank, self.checkpoint_every = stage, total_steps, rank, checkpoint_every
        self.progress_path = run.get("progress_path") if rank == 0 else None
        self.progress_lines, self.progress_written, self.status = run.get("progress_lines", True), 0.0, ""
        tensorboard_dir = run.get("tensorboard_dir")
        self.window = MetricWindow(report_every, total_steps)
        self.started, self.first_step, self.world = time.perf_counter(), first_step, world
        self.history, self.window_metrics = history, window_metrics
        self.tensorboard = None
        if rank == 0 and tensorboard_dir is not None:
            from tensorboardX import SummaryWriter

            self.tensorboard = SummaryWriter(str(Path(tensorboard_dir) / stage))

    def add(self, step: int, values: dict[str, float], learning_rate: float, save) -> None:
        """`save(directory, step)` writes this rank's checkpoint files."""
        means = self.window.add(step, values)
        if means is not None:
            metrics = _mean_over_ranks(means)
            # Every rank's tokens in the ranks' mean step time.
            metrics["tokens_per_second"] = metrics["tokens"] * self.world / max(metrics["seconds_step"], 1e-9)
            if self.window_metrics is not None:
                metrics.update(self.window_metrics())
            metrics.update(step=step, stage=self.stage, learning_rate=learning_rate)
            self.history.append(metrics)
            if self.tensorboard is not None:
                for key, value in metrics.items():
                    if key not in ("step", "stage"):
                        self.tensorboard.add_scalar(f"{self.stage}/{key}", value, step)
                self.tensorboard.flush()
            self.status = f"loss {metrics['loss']:.4g}" if "loss" in metrics else ""
            if self.rank == 0 and self.progress_lines:
                elapsed = time.perf_counter() - self.started
                print(progress_line(self.stage, step, self.total, metrics, elapsed, self.first_step), flush=True)
        now = time.perf_counter()
        if self.progress_path is not None and (now - self.progress_written >= 0.5 or step == self.total):
            write_stage_progress(self.progress_path, step, self.total, self.status)
            self.progress_written = now
        if step % self.checkpoint_every == 0 or step == self.total:
            self.checkpoint(step, save)
        elif means is not None:
            ray.train.report(self.history[-1])

    def checkpoint(self, step: int, save) -> None:
        """A checkpoint of `step`, reported with the last window's metrics."""
        with tempfile.TemporaryDirectory() as directory:
            save(directory, step)
            ray.train.report(self.history[-1] if self.history else {"step": step},
                             checkpoint=ray.train.Checkpoint.from_directory(directory))

    def finish_early(self, step: int, save) -> None:
        """End at `step` (the last) without training up to it: its checkpoint and progress."""
        if self.progress_path is not None:
            write_stage_progress(self.progress_path, step, self.total, self.status)
        self.checkpoint(step, save)


def _took_off(history: list[dict], settings: Stage3Settings, rank: int) -> bool:
    """Whether the real schedule's fit (``attempt_fit`` over its windows, the same on
    every rank) reaches stage3.takeoff_recall, so that its world steps run."""
    key, fit = attempt_fit([window for window in history if window["step"] <= settings.schedule_steps])
    fit = _mean_over_ranks({"fit": fit})["fit"]  # one decision on every rank, whatever each holds
    if fit >= settings.takeoff_recall:
        return True
    if rank == 0:
        print(f"[stage3] no world steps: the real schedule fits {key} {fit:.3f}, below stage3.takeoff_recall "
              f"({settings.takeoff_recall}); it took off on no kind of question, so there is no fit to carry "
              f"to other names", flush=True)
    return False


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


@dataclass
class _Worker:
    rank: int
    world: int
    updater: DeepSpeedUpdater
    tokenizer: object
    manifest: dict
    resumed: dict | None  # trainer_state.json of the checkpoint resumed from
    checkpoint_dir: str | None


def _setup(run: dict, trainable: list[Role], train_backbone: bool, optimiser: OptimiserSettings,
           micro_batch_size: int) -> _Worker:
    """Model, DeepSpeed and, after a failure, the state of the last checkpoint."""
    _quiet_report_logging()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    worker: WorkerSettings = run["worker"]
    if not worker.use_gpu:
        torch.set_num_threads(worker.cpu_threads)
    torch.manual_seed(worker.seed + rank)
    checkpoint = ray.train.get_checkpoint()
    checkpoint_dir = None if checkpoint is None else checkpoint.to_directory()
    model_dir = run["model_dir"] if checkpoint_dir is None else str(Path(checkpoint_dir) / MODEL_DIR)
    model, tokenizer, manifest = load_model(model_dir)
    model.set_trainable(trainable, backbone=train_backbone)
    updater = DeepSpeedUpdater(model, optimiser, micro_batch_size, worker.zero_stage, worker.use_gpu, worker.bf16)
    resumed = None if checkpoint_dir is None else read_trainer_state(checkpoint_dir)
    if resumed is not None and rank == 0:
        print(f"[{resumed['stage']}] resuming after step {resumed['step']} from {checkpoint_dir}", flush=True)
    return _Worker(rank, world, updater, tokenizer, manifest, resumed, checkpoint_dir)


def _saver(w: _Worker, stage: str, steps: int, reporter: _Reporter, trained_backbone: bool, batch_rng=None,
           index_version=None):
    """save(directory, step) for the reporter: this rank's optimizer state; on rank 0 also
    the model (whole weights) and the trainer state. The base weights are written
    when they were trained here or came from a model directory (the tiny preset);
    a frozen pretrained base stays a reference."""
    save_backbone = trained_backbone or w.manifest["backbone"] == "backbone"

    def save(directory: str, step: int) -> None:
        save_rank_state(directory, w.rank, w.updater.optimizer, w.updater.scheduler, batch_rng)
        with full_parameters(w.updater):
            if w.rank == 0:
                save_model(w.updater.module, w.tokenizer, Path(directory) / MODEL_DIR, w.manifest["backbone"], save_backbone)
        if w.rank == 0:
            resumed_after = [] if w.resumed is None else [*w.resumed.get("resumed_after", []), w.resumed["step"]]
            version = index_version() if index_version is not None else None
            write_trainer_state(directory, stage, step, steps, reporter.history, version, resumed_after)

    return save


def _memory_qa_loop(run: dict, stage: str, trainable: list[Role], step_function, copy_compressor: bool):
    """Stages 1 and 2: batches of documents to compress and targets to generate."""
    settings = run["settings"]
    worker: WorkerSettings = run["worker"]
    w = _setup(run, trainable, settings.train_backbone, settings.optimiser, settings.micro_batch_size)
    start = 1 if w.resumed is None else w.resumed["step"] + 1
    batch_rng = random.Random(worker.seed * 7919 + w.rank)
    if w.checkpoint_dir is not None:
        load_rank_state(w.checkpoint_dir, w.rank, w.updater.optimizer, w.updater.scheduler, batch_rng)
    reporter = _Reporter(stage, settings.steps, settings.report_every, settings.checkpoint_every, w.rank, w.world,
                         [] if w.resumed is None else w.resumed["history"], start, run)
    save = _saver(w, stage, settings.steps, reporter, settings.train_backbone, batch_rng)
    documents, answers = DocumentTable(run["documents_path"]), read_answer_pool(run["examples_path"])
    weights = salient_word_weights(settings, documents)
    for step, rows in rank_batches(settings.micro_batch_size, w.rank, start):
        batch = memory_qa_batch([example_from_row(r) for r in rows], documents, settings, step, worker.lengths,
                                w.tokenizer, w.updater.module.num_memory_tokens, batch_rng, answers, weights)
        learning_rate = w.updater.learning_rate()  # the one this step runs at
        values = step_function(w.updater, batch, settings)
        if step == settings.steps and copy_compressor:
            # Stage 3 starts its query reasoner from the trained compressor (CLaRa's init).
            w.updater.module.copy_adapter(Role.COMPRESSOR, Role.QUERY_REASONER)
        reporter.add(step, values, learning_rate, save)
    return reporter.history


def stage1_loop(run: dict):
    """Compressor pretraining: compressor + generator (and base, if configured).
    `run`: worker (WorkerSettings), settings (Stage1Settings), model_dir, examples_path,
    documents_path (``tables.py`` files); the draws arrive as the trainer's dataset."""
    return _memory_qa_loop(run, "stage1", [Role.COMPRESSOR, Role.GENERATOR], stage1_step, copy_compressor=True)


def stage2_loop(run: dict):
    """Instruction tuning: the generator (and the compressor, if configured) on QA
    examples with given documents. `run`: as for stage 1, settings (Stage2Settings)."""
    settings: Stage2Settings = run["settings"]
    trainable = [Role.GENERATOR] + ([Role.COMPRESSOR] if settings.train_compressor else [])
    return _memory_qa_loop(run, "stage2", trainable, stage2_step, copy_compressor=settings.train_compressor)


def _validation(w: _Worker, path: str | None, candidates, settings: Stage3Settings, worker: WorkerSettings):
    """Validation recall of the query reasoner, on rank 0 (all ranks take part under ZeRO-3)."""
    if path is None:
        return None
    questions = questions_from_rows(read_table(path).to_pylist())

    def measure() -> dict:
        with full_parameters(w.updater):
            if w.rank != 0:
                return {}
            return validation_recall(w.updater.module, w.tokenizer, questions, candidates, settings.num_candidates,
                                     worker.lengths.question)

    return measure


def _refresh_metrics(scheduler, step_of) -> dict:
    """Index refresh figures for a report window (rank 0 asks the scheduler)."""
    status = ray.get(scheduler.status.remote())
    metrics = {"index_version_step": status["live_step"], "index_staleness": step_of() - status["live_step"],
               "refreshes_swapped": status["swapped"], "refreshes_skipped": len(status["skipped"]),
               "refreshes_failed": status["failed"]}
    swapped = [e for e in status["events"] if e["outcome"] == "swapped"]
    if swapped:
        last = swapped[-1]
        metrics.update(refresh_encode_seconds=last["encode_seconds"], refresh_build_seconds=last["build_seconds"],
                       refresh_swap_seconds=last["swap_seconds"])
        if last["top_l_overlap"] is not None:
            metrics["refresh_top_l_overlap"] = last["top_l_overlap"]
    return metrics


class _Refresher:
    """Stage 3's side of the index refresh (``clara_ray.index.refresh``): at every
    `refresh_every`-th step before the last, a snapshot of the model goes to the
    scheduler, with the query reasoner's keys of a fixed probe batch (the first
    training questions); the loop never waits for the refresh itself. While one runs
    no snapshot is written, the scheduler only counts the step as skipped. (The
    refresh after the last step is the driver's, from the stage's model directory.)"""

    PROBE_QUESTIONS = 16

    def __init__(self, w: _Worker, scheduler, plan, settings: Stage3Settings, questions_path: str, lengths):
        self.w, self.scheduler, self.plan, self.settings, self.lengths = w, scheduler, plan, settings, lengths
        self.probe = read_table(questions_path).slice(0, self.PROBE_QUESTIONS).column("question").to_pylist()
        self.save_backbone = w.manifest["backbone"] == "backbone"
        if w.rank == 0:  # a reservation of a loop that died before starting its refresh
            ray.get(scheduler.release.remote())

    def due(self, step: int) -> bool:
        every = self.settings.refresh_every
        return every > 0 and step % every == 0 and step < self.settings.steps

    def after_step(self, step: int) -> None:
        if not self.due(step):
            return
        with full_parameters(self.w.updater):  # every rank: ZeRO-3 gathers here
            if self.w.rank != 0 or not ray.get(self.scheduler.reserve.remote(step)):  # False: one is running
                return
            model = self.w.updater.module
            snapshot = self.plan.snapshot_dir(step)
            save_model(model, self.w.tokenizer, snapshot, self.w.manifest["backbone"], self.save_backbone)
            with torch.no_grad():
                tokens = tokenize_texts(self.w.tokenizer, self.probe, self.lengths.question)
                keys, _ = model.encode(Role.QUERY_REASONER, tokens.ids.to(self.w.updater.device),
                                       tokens.mask.to(self.w.updater.device))
            self.scheduler.start.remote(step, str(snapshot), keys.flatten(1).float().cpu().numpy())


def stage3_loop(run: dict):
    """Joint training: query reasoner (+ generator, + compressor) through the differentiable
    top-k, candidates drawn from `run["candidates"]` (a CandidateSource); the base frozen.
    `run`: worker, settings (Stage3Settings), model_dir, candidates, validation_path
    (held-out questions, or None), documents_path, questions_path and, with a trainable
    compressor, refresh (the scheduler actor) and refresh_plan; the questions arrive as
    the trainer's dataset."""
    settings: Stage3Settings = run["settings"]
    worker: WorkerSettings = run["worker"]
    trainable = ([Role.QUERY_REASONER] + ([Role.COMPRESSOR] if settings.trainable_compressor else [])
                 + ([Role.GENERATOR] if settings.train_generator else []))
    w = _setup(run, trainable, False, settings.optimiser, settings.micro_batch_size)
    start = 1 if w.resumed is None else w.resumed["step"] + 1
    if w.checkpoint_dir is not None:
        load_rank_state(w.checkpoint_dir, w.rank, w.updater.optimizer, w.updater.scheduler)
    candidates = run["candidates"]
    refresher = None
    if settings.trainable_compressor:
        refresher = _Refresher(w, run["refresh"], run["refresh_plan"], settings, run["questions_path"], worker.lengths)
    validation = _validation(w, run.get("validation_path"), candidates, settings, worker)
    current = {"step": start}

    def window_metrics() -> dict:
        metrics = validation() if validation is not None else {}
        if refresher is not None and w.rank == 0:
            metrics.update(_refresh_metrics(refresher.scheduler, lambda: current["step"]))
        return metrics

    reporter = _Reporter("stage3", settings.steps, settings.report_every, settings.checkpoint_every, w.rank, w.world,
                         [] if w.resumed is None else w.resumed["history"], start, run, window_metrics)
    save = _saver(w, "stage3", settings.steps, reporter, False, index_version=lambda: getattr(candidates, "version", None))
    # The pull back to the start measures from where stage 3 started, not from the checkpoint.
    anchor = ParameterAnchor(w.updater.module, settings.anchor_weight, start=run["model_dir"] if w.resumed else None,
                             lower_weight=settings.lower_anchor_weight, free_top_layers=settings.anchor_free_top_layers)
    rewrites = settings.trainable_compressor or settings.counterfactual_rate > 0
    documents = DocumentTable(run["documents_path"]).texts_of if rewrites else None
    worlds = None
    if settings.counterfactual_rate > 0:
        asked = read_table(run["questions_path"]).select(["question", "answer"]).to_pydict()
        worlds = CounterfactualWorlds.of_questions(asked["question"], asked["answer"], settings.counterfactual_rate,
                                                   worker.seed, w.rank, settings.schedule_steps,
                                                   settings.counterfactual_worlds, settings.counterfactual_swap)
    takes_worlds = None  # decided at the first world step, from the real schedule's fit
    for step, rows in rank_batches(settings.micro_batch_size, w.rank, start):
        current["step"] = step
        if worlds is not None and step > settings.schedule_steps and takes_worlds is None:
            takes_worlds = _took_off(reporter.history, settings, w.rank)
        if takes_worlds is False:  # nothing to carry to other names: the world steps would only cost
            if step == settings.steps:
                reporter.finish_early(step, save)
            continue
        batch = questions_from_rows(rows)
        learning_rate = w.updater.learning_rate()
        metrics = stage3_step(w.updater, w.tokenizer, batch, candidates, settings, worker.lengths, step, anchor,
                              documents, worlds)
        if refresher is not None:
            refresher.after_step(step)
        reporter.add(step, metrics, learning_rate, save)
    return reporter.history

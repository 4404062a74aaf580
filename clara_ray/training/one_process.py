"""The training stages in one process, without Ray or DeepSpeed.

    history = train_stage1(model, tokenizer, examples, documents, stage1_settings, worker_settings, workers=2)
    history = train_stage3(model, tokenizer, questions, ExactSearch(ids, memory), stage3_settings, worker_settings)

The same batches (``batches.stage1_batches`` / ``stage3_batches``), step functions,
optimizer groups and schedule as the Ray Train loops (``loops.py``), with
``TorchUpdater`` in place of DeepSpeed: for recipe runs (benchmarks/recipe_sweep.py),
tests, and a GPU machine with nothing but torch (``model.dtype=bfloat16``: bf16
autocast, float32 weights). With ``workers=N`` a step takes
the examples that N Ray Train workers take together in that step; the loss is
then one mean over all of them instead of a mean of N per-worker means.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable

import torch

from clara_ray.modeling.clara import Role
from clara_ray.training.batches import stage1_batches, stage3_batches
from clara_ray.training.examples import QuestionBatch, Stage1Example
from clara_ray.training.candidates import CandidateSource
from clara_ray.training.engine import ParameterAnchor, TorchUpdater
from clara_ray.training.settings import Stage1Settings, Stage2Settings, Stage3Settings, WorkerSettings
from clara_ray.training.steps import MetricWindow, progress_line, stage1_step, stage2_step, stage3_step
from clara_ray.training.worlds import CounterfactualWorlds

OnWindow = Callable[[dict], None]  # called with each reporting window's metrics (after they are in the history)


def _report(stage: str, window: MetricWindow, step: int, total: int, values: dict, learning_rate: float,
            started: float, history: list[dict], on_window: OnWindow | None, log) -> None:
    means = window.add(step, values)
    if means is None:
        return
    metrics = {**means, "step": step, "stage": stage, "learning_rate": learning_rate}
    history.append(metrics)
    if on_window is not None:
        on_window(metrics)
    log(progress_line(stage, step, total, metrics, time.perf_counter() - started))


def _memory_qa(stage: str, step_function, trainable: list[Role], copy_compressor: bool, model, tokenizer,
               examples, documents, settings, worker: WorkerSettings, workers: int, on_window, log) -> list[dict]:
    """Stages 1 and 2, as the Ray loop runs them (``loops._memory_qa_loop``)."""
    torch.manual_seed(worker.seed)
    model.set_trainable(trainable, backbone=settings.train_backbone)
    model.train()
    settings = dataclasses.replace(settings, micro_batch_size=settings.micro_batch_size * workers)
    updater = TorchUpdater(model, settings.optimiser, bf16=worker.bf16)
    window, history, started = MetricWindow(settings.report_every, settings.steps), [], time.perf_counter()
    for step, batch in stage1_batches(
        examples, documents, settings, worker.lengths, tokenizer, model.num_memory_tokens, worker.seed,
        random.Random(worker.seed * 7919),
    ):
        learning_rate = updater.learning_rate()
        values = step_function(updater, batch, settings)
        _report(stage, window, step, settings.steps, values, learning_rate, started, history, on_window, log)
    if copy_compressor:
        model.copy_adapter(Role.COMPRESSOR, Role.QUERY_REASONER)
    return history


def train_stage1(
    model, tokenizer, examples: list[Stage1Example], documents: list[str], settings: Stage1Settings,
    worker: WorkerSettings, workers: int = 1, on_window: OnWindow | None = None, log=print,
) -> list[dict]:
    """Compressor pretraining in place; ends by starting the query reasoner from the
    trained compressor, as the Ray loop does."""
    return _memory_qa("stage1", stage1_step, [Role.COMPRESSOR, Role.GENERATOR], True, model, tokenizer,
                      examples, documents, settings, worker, workers, on_window, log)


def train_stage2(
    model, tokenizer, examples: list[Stage1Example], documents: list[str], settings: Stage2Settings,
    worker: WorkerSettings, workers: int = 1, on_window: OnWindow | None = None, log=print,
) -> list[dict]:
    """Instruction tuning in place (examples from ``batches.prepare_stage2_examples``)."""
    trainable = [Role.GENERATOR] + ([Role.COMPRESSOR] if settings.train_compressor else [])
    return _memory_qa("stage2", stage2_step, trainable, settings.train_compressor, model, tokenizer,
                      examples, documents, settings, worker, workers, on_window, log)


def train_stage3(
    model, tokenizer, questions: QuestionBatch, candidates: CandidateSource, settings: Stage3Settings,
    worker: WorkerSettings, workers: int = 1, on_window: OnWindow | None = None, log=print,
    documents: Callable[[list[str]], list[str]] | None = None,
) -> list[dict]:
    """Joint training in place: the query reasoner (and the generator, and the
    compressor, if configured; a trainable compressor needs `documents(ids) -> texts`
    and here trains against `candidates` as they are: no refresh)."""
    torch.manual_seed(worker.seed)
    model.set_trainable([Role.QUERY_REASONER] + ([Role.COMPRESSOR] if settings.trainable_compressor else [])
                        + ([Role.GENERATOR] if settings.train_generator else []), backbone=False)
    model.train()
    settings = dataclasses.replace(settings, micro_batch_size=settings.micro_batch_size * workers)
    updater = TorchUpdater(model, settings.optimiser, bf16=worker.bf16)
    anchor = ParameterAnchor(model, settings.anchor_weight, lower_weight=settings.lower_anchor_weight,
                             free_top_layers=settings.anchor_free_top_layers)
    worlds = None
    if settings.counterfactual_rate > 0:
        worlds = CounterfactualWorlds.of_questions(questions.questions, questions.answers,
                                                   settings.counterfactual_rate, worker.seed,
                                                   start_step=settings.schedule_steps,
                                                   num_worlds=settings.counterfactual_worlds,
                                                   swap=settings.counterfactual_swap)
    window, history, started = MetricWindow(settings.report_every, settings.steps), [], time.perf_counter()
    for step, batch in stage3_batches(questions, settings.micro_batch_size, settings.steps, worker.seed):
        learning_rate = updater.learning_rate()
        values = stage3_step(updater, tokenizer, batch, candidates, settings, worker.lengths, step, anchor, documents,
                             worlds)
        _report("stage3", window, step, settings.steps, values, learning_rate, started, history, on_window, log)
    return history

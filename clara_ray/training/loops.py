"""Per-worker training loops for Ray Train (one process per worker, DeepSpeed inside).

Each loop takes a plain dict (built by `clara_ray.training.stages`), trains for a
fixed number of steps, reports metrics every `report_every` steps (a barrier:
every rank reports the same number of times), and ends by reporting a model
directory (see `clara_ray.modeling.checkpoint`) as the Ray Train checkpoint.
Rank 0 prints progress lines and returns the metric history.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import tempfile
import time

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist

from clara_ray.modeling.checkpoint import load_model, save_model
from clara_ray.modeling.clara import Objective, Role
from clara_ray.modeling.topk import annealed_temperature
from clara_ray.training import engine as ds
from clara_ray.training.batches import (
    Lengths,
    ReconstructionOrder,
    Stage1Example,
    stage1_batch,
    stage3_batch,
)


class _Reporter:
    """Averages step metrics over each reporting window (and over ranks), prints a
    progress line with ETA on rank 0, and reports to Ray Train. The last window
    is reported by `_finish`, together with the checkpoint."""

    def __init__(self, stage: str, total_steps: int, report_every: int, rank: int):
        self.stage, self.total, self.every, self.rank = stage, total_steps, report_every, rank
        self.started = time.perf_counter()
        self.history: list[dict] = []
        self._sums: dict[str, float] = {}
        self._count = 0

    def add(self, step: int, values: dict[str, float], learning_rate: float) -> None:
        for key, value in values.items():
            self._sums[key] = self._sums.get(key, 0.0) + float(value)
        self._count += 1
        if step % self.every and step != self.total:
            return
        metrics = _mean_over_ranks({k: v / self._count for k, v in self._sums.items()})
        metrics.update(step=step, stage=self.stage, learning_rate=learning_rate)
        self._sums, self._count = {}, 0
        self.history.append(metrics)
        if self.rank == 0:
            elapsed = time.perf_counter() - self.started
            eta = elapsed / step * (self.total - step)
            shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k not in ("step", "stage"))
            print(f"[{self.stage}] step {step}/{self.total} {shown} | {elapsed:.0f}s elapsed, eta {eta:.0f}s", flush=True)
        if step != self.total:
            ray.train.report(metrics)


def _mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(tensor)
    tensor /= dist.get_world_size()
    return dict(zip(keys, tensor.tolist()))


def _epoch_slices(num_items: int, batch_size: int, rank: int, world: int, seed: int):
    """Endless micro-batches of item indices: each epoch is one seeded shuffle
    shared by all ranks, rank r taking every world-th full batch."""
    epoch = 0
    while True:
        order = list(range(num_items))
        random.Random(seed + epoch).shuffle(order)
        usable = (num_items // (batch_size * world)) * batch_size * world
        if usable == 0:
            raise ValueError(
                f"{num_items} training examples cannot fill one micro-batch of {batch_size} on {world} workers"
            )
        for start in range(rank * batch_size, usable, batch_size * world):
            yield order[start : start + batch_size]
        epoch += 1


def _quiet_report_logging() -> None:
    """Ray Train logs every `ray.train.report` of every worker at INFO, metrics
    dict included; `_Reporter` already prints one progress line per window."""
    try:  # an internal module (Ray 2.60): if it moves, the lines just come back
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def _setup(config: dict, trainable: list[Role], train_backbone: bool, gain_learning_rate: float | None = None):
    _quiet_report_logging()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    use_gpu = config["use_gpu"]
    if not use_gpu:
        torch.set_num_threads(config["cpu_threads"])
    torch.manual_seed(config["seed"] + rank)
    model, tokenizer, manifest = load_model(config["model_dir"])
    model.set_trainable(trainable, backbone=train_backbone)
    ds_config = ds.deepspeed_config(
        micro_batch_size=config["micro_batch_size"],
        learning_rate=config["learning_rate"],
        total_steps=config["steps"],
        warmup_steps=int(config["warmup_fraction"] * config["steps"]),
        zero_stage=config["zero_stage"],
        gradient_clipping=config["gradient_clipping"],
        bf16=config["dtype"] == "bfloat16",
    )
    engine = ds.initialize(model, ds_config, use_gpu, gain_learning_rate)
    lengths = Lengths(**config["lengths"])
    return rank, world, engine, tokenizer, manifest, lengths


def _finish(engine, tokenizer, manifest, config: dict, rank: int, metrics: dict, trained_backbone: bool) -> None:
    """Report the final model directory as this run's checkpoint.

    The base weights are written when they were trained here or came from a
    model directory (the tiny preset); a frozen pretrained base stays a reference.
    """
    save_backbone = trained_backbone or manifest["backbone"] == "backbone"
    with tempfile.TemporaryDirectory() as directory:
        with ds.full_parameters(engine, config["zero_stage"]):
            if rank == 0:
                save_model(engine.module, tokenizer, directory, manifest["backbone"], save_backbone)
        checkpoint = ray.train.Checkpoint.from_directory(directory) if rank == 0 else None
        ray.train.report(metrics, checkpoint=checkpoint)


def stage1_loop(config: dict):
    """Compressor pretraining: compressor + generator (and base, if configured)."""
    rank, world, engine, tokenizer, manifest, lengths = _setup(
        config, [Role.COMPRESSOR, Role.GENERATOR], config["train_backbone"]
    )
    examples = [Stage1Example(d, q, a, tuple(n), tuple(r)) for d, q, a, n, r in config["examples"]]
    without_rivals = [dataclasses.replace(e, rivals=()) for e in examples]
    documents = config["documents"]
    answer_pool = sorted({e.answer for e in examples if e.answer is not None})
    rng = random.Random(config["seed"] * 7919 + rank)
    batches = _epoch_slices(len(examples), config["micro_batch_size"], rank, world, config["seed"])
    reporter = _Reporter("stage1", config["steps"], config["report_every"], rank)
    device = engine.device
    for step in range(1, config["steps"] + 1):
        pool = examples if step <= config["rival_steps"] else without_rivals
        batch = stage1_batch(
            [pool[i] for i in next(batches)], documents, config["num_context_docs"],
            engine.module.num_memory_tokens, tokenizer, lengths, rng,
            ReconstructionOrder(config["reconstruction_order"]), config["counterfactual_rate"], answer_pool,
            config["hard_fraction"], config["min_context_docs"],
        )
        out = engine(
            Objective.COMPRESSOR_PRETRAINING,
            **{k: v.to(device) for k, v in batch.items()},
            mse_weight=config["mse_weight"],
        )
        engine.backward(out["loss"])
        engine.step()
        reporter.add(step, {k: out[k].item() for k in ("loss", "generation_loss", "mse_loss")}, engine.get_lr()[0])
    # Stage 3 starts its query reasoner from the trained compressor (CLaRa's init).
    engine.module.copy_adapter(Role.COMPRESSOR, Role.QUERY_REASONER)
    _finish(engine, tokenizer, manifest, config, rank, reporter.history[-1], config["train_backbone"])
    return reporter.history


def stage3_loop(config: dict):
    """Joint training: query reasoner (+ generator) through the differentiable top-k,
    candidates drawn from the index actor; compressor and base frozen."""
    trainable = [Role.QUERY_REASONER] + ([Role.GENERATOR] if config["train_generator"] else [])
    rank, world, engine, tokenizer, manifest, lengths = _setup(
        config, trainable, train_backbone=False, gain_learning_rate=config["retrieval_gain_learning_rate"]
    )
    index = ray.get_actor(config["index_actor"], namespace=config["index_namespace"])
    questions, answers, gold = config["questions"], config["answers"], config["gold_doc_ids"]
    batches = _epoch_slices(len(questions), config["micro_batch_size"], rank, world, config["seed"])
    reporter = _Reporter("stage3", config["steps"], config["report_every"], rank)
    gains_trained = config["retrieval_gain_learning_rate"] > 0
    hold_gains_until = round(config["retrieval_gain_start_fraction"] * config["steps"])
    anchor = ds.ParameterAnchor(engine.module, config["anchor_weight"])
    anchor_from = round(config["anchor_start_fraction"] * config["steps"])
    device = engine.device
    for step in range(1, config["steps"] + 1):
        rows = next(batches)
        batch = {
            k: v.to(device)
            for k, v in stage3_batch([questions[i] for i in rows], [answers[i] for i in rows], tokenizer, lengths).items()
        }
        with torch.no_grad():
            query_memory, _ = engine.module.encode(Role.QUERY_REASONER, batch["question_ids"], batch["question_mask"])
        found = ray.get(index.search.remote(query_memory.flatten(1).float().cpu().numpy(), config["num_candidates"]))
        candidate_memory = torch.from_numpy(found.memory.astype(np.float32)).to(device)  # (B, L, n, d)
        temperature = annealed_temperature(step, config["steps"], config["initial_temperature"], config["temperature"])
        out = engine(
            Objective.JOINT, **batch, candidate_memory=candidate_memory, k=config["top_k"], temperature=temperature,
        )
        anchored = step > anchor_from
        with torch.set_grad_enabled(anchored):  # before the pull starts it is only logged
            penalty = anchor.penalty()
        engine.backward(out["loss"] + config["anchor_weight"] * penalty if anchored else out["loss"])
        if gains_trained and step <= hold_gains_until:
            ds.hold_last_group(engine)
        engine.step()
        # Logged only (gold labels never reach the loss): is the exact top-1 a gold document?
        top1 = out["scores"].argmax(-1).cpu().numpy()
        hits = [found.doc_ids[j, top1[j]] in gold[i] for j, i in enumerate(rows)]
        in_candidates = [any(d in gold[i] for d in found.doc_ids[j]) for j, i in enumerate(rows)]
        values = {"loss": out["loss"].item(), "train_recall_at_1": np.mean(hits),
                  "gold_in_candidates": np.mean(in_candidates), "temperature": temperature}
        if anchor.params:
            values["anchor_distance"] = penalty.detach().sqrt().item()
        gains = engine.module.retrieval_gain[Role.QUERY_REASONER.value].weight.detach().exp().flatten().tolist()
        values.update({f"retrieval_gain_{slot}": gain for slot, gain in enumerate(gains)})
        reporter.add(step, values, engine.get_lr()[0])
    _finish(engine, tokenizer, manifest, config, rank, reporter.history[-1], trained_backbone=False)
    return reporter.history

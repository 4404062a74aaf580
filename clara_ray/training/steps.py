"""One training step per objective, in plain PyTorch (no Ray).

    metrics = stage1_step(updater, batch, settings)
    metrics = stage2_step(updater, batch, settings)
    metrics = stage3_step(updater, tokenizer, batch, candidates, settings, lengths, step, anchor)

`updater` is a ``clara_ray.training.engine.TorchUpdater`` (one process) or
``DeepSpeedUpdater`` (a Ray Train worker): it owns the forward call, backward,
clipping, the optimizer groups and the schedule. The Ray Train loops, the
one-process recipe runs, the benchmarks and the sweeps all call these functions;
nothing else computes a training step.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from clara_ray.modeling.clara import Objective, Role
from clara_ray.modeling.text import tokenize_texts
from clara_ray.training.batches import stage3_batch
from clara_ray.training.settings import Lengths
from clara_ray.training.examples import QuestionBatch
from clara_ray.training.candidates import CandidateSource
from clara_ray.training.engine import ParameterAnchor
from clara_ray.training.settings import Stage1Settings, Stage2Settings, Stage3Settings
from clara_ray.training.worlds import CounterfactualWorlds


def stage1_step(updater, batch: dict[str, torch.Tensor], settings: Stage1Settings) -> dict[str, float]:
    """Compressor pretraining on a batch from ``batches.stage1_batch``."""
    started = time.perf_counter()
    out = updater.forward(
        Objective.COMPRESSOR_PRETRAINING,
        **{k: v.to(updater.device) for k, v in batch.items()},
        mse_weight=settings.mse_weight,
        separation_weight=settings.separation_weight,
        separation_temperature=settings.separation_temperature,
        qa_loss_share=settings.qa_loss_share,
    )
    updater.backward(out["loss"])
    updater.step()
    metrics = {k: out[k].item() for k in (
        "loss", "generation_loss", "mse_loss", "separation_loss", "qa_loss", "reconstruction_loss")}
    tokens = int(batch["doc_mask"].sum() + batch["prompt_mask"].sum() + batch["target_mask"].sum())
    return {**metrics, "tokens": tokens, "seconds_step": time.perf_counter() - started}


def stage2_step(updater, batch: dict[str, torch.Tensor], settings: Stage2Settings) -> dict[str, float]:
    """Instruction tuning on a batch of QA examples from ``batches.stage1_batch``: the
    generator's loss on the answer, reading every given document's memory."""
    started = time.perf_counter()
    out = updater.forward(
        Objective.COMPRESSOR_PRETRAINING, **{k: v.to(updater.device) for k, v in batch.items()}, mse_weight=0.0
    )
    updater.backward(out["loss"])
    updater.step()
    tokens = int(batch["doc_mask"].sum() + batch["prompt_mask"].sum() + batch["target_mask"].sum())
    return {"loss": out["loss"].item(), "tokens": tokens, "seconds_step": time.perf_counter() - started}


class _Clock:
    """Wall-clock split of a step; waits for the GPU before each reading."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.seconds: dict[str, float] = {}
        self._last = self._now()

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self, name: str) -> None:
        now = self._now()
        self.seconds[f"seconds_{name}"] = now - self._last
        self._last = now


def stage3_step(
    updater,
    tokenizer,
    batch: QuestionBatch,
    candidates: CandidateSource,
    settings: Stage3Settings,
    lengths: Lengths,
    step: int,
    anchor: ParameterAnchor,
    documents: Callable[[list[str]], list[str]] | None = None,
    worlds: CounterfactualWorlds | None = None,
) -> dict[str, float]:
    """Joint training, step `step` (1-based) of `settings.steps`: the query reasoner
    asks `candidates` for L documents, re-scores them exactly against their stored
    memories, the differentiable top-k picks k, and the generator's loss on the
    answer trains the query reasoner (and the generator, if configured).

    With a trainable compressor (`settings.trainable_compressor`) the index only
    proposes the L candidates: their texts (`documents(ids)`) are compressed again
    by the current compressor, with gradient, once per distinct document of the batch,
    and those fresh memories are re-scored and read.

    In a step that `worlds` draws a counterfactual world for (see
    ``clara_ray.training.worlds``), the real question proposes the L candidates, then
    question, candidate texts (`documents(ids)`) and answer are rewritten in that world;
    the candidates are compressed again, by the frozen compressor without gradient
    unless it trains (then only those holding a word the batch puts in play,
    ``World.in_play``), and scored against the rewritten question."""
    model, device = updater.module, updater.device
    clock = _Clock(device)
    world = worlds.draw(step) if worlds is not None else None
    if (world is not None or settings.trainable_compressor) and documents is None:
        raise ValueError("a trainable compressor or a counterfactual world compresses candidates again: "
                         "stage3_step needs `documents`")
    questions, answers = (batch.questions, batch.answers) if world is None else (
        world.texts(batch.questions), world.texts(batch.answers))
    inputs = {k: v.to(device) for k, v in stage3_batch(questions, answers, tokenizer, lengths).items()}
    # The index holds the real world's memories, so the real question proposes the
    # candidates: a name world's question names someone else, whose real documents are
    # not the ones its renamed subject's are. They are scored in the world below.
    search = inputs if questions == batch.questions else {
        k: v.to(device) for k, v in stage3_batch(batch.questions, batch.answers, tokenizer, lengths).items()}
    with torch.no_grad():
        query_memory, _ = model.encode(Role.QUERY_REASONER, search["question_ids"], search["question_mask"])
    clock.lap("query")
    found = candidates.candidates(query_memory.flatten(1).float().cpu().numpy(), settings.num_candidates, batch.question_ids)
    clock.lap("search")
    in_play = world.in_play([*batch.questions, *batch.answers]) if world is not None else frozenset()
    candidate_inputs, encoded = _candidate_inputs(model, tokenizer, found, settings, lengths, documents, world, in_play)
    temperature = settings.temperature_at(step)
    out = updater.forward(Objective.JOINT, **inputs, **candidate_inputs, k=settings.top_k, temperature=temperature,
                          sample=settings.gumbel_top_k,
                          distillation=settings.distillation if step > settings.distillation_start_step else None)
    anchored = step > settings.anchor_start_step
    with torch.set_grad_enabled(anchored):  # before the pull starts it is only logged
        penalty = anchor.penalty()
    lower = anchor.lower_penalty()
    clock.lap("forward")
    loss = out["loss"] + settings.lower_anchor_weight * lower
    updater.backward(loss + settings.anchor_weight * penalty if anchored else loss)
    updater.step(hold_gains=step <= settings.hold_gains_steps)
    clock.lap("backward")
    tokens = int(sum(inputs[k].sum() for k in ("question_mask", "prompt_mask", "target_mask")))
    metrics = {"loss": out["loss"].item(), "temperature": temperature, "tokens": tokens,
               **({"distillation_loss": out["distillation_loss"].item()} if "distillation_loss" in out else {}),
               "seconds_step": sum(clock.seconds.values()), **clock.seconds}
    if settings.trainable_compressor or worlds is not None:
        metrics["candidates_encoded"] = encoded
    if worlds is not None:
        metrics["counterfactual"] = float(world is not None)
    if batch.gold_doc_ids is not None:
        top1 = out["scores"].argmax(-1).cpu().numpy()
        gold = batch.gold_doc_ids
        metrics["train_recall_at_1"] = float(np.mean([found.doc_ids[j, top1[j]] in gold[j] for j in range(len(gold))]))
        metrics["gold_in_candidates"] = float(np.mean([any(d in gold[j] for d in found.doc_ids[j]) for j in range(len(gold))]))
    if anchor.params:
        metrics["anchor_distance"] = penalty.detach().sqrt().item()
    if anchor.lower_params:
        metrics["lower_anchor_distance"] = lower.detach().sqrt().item()
    gains = model.retrieval_gain[Role.QUERY_REASONER.value].weight.detach().exp().flatten().tolist()  # empty under ZeRO-3
    metrics.update({f"retrieval_gain_{slot}": gain for slot, gain in enumerate(gains)})
    return metrics


def _candidate_inputs(model, tokenizer, found, settings: Stage3Settings, lengths: Lengths, documents,
                      world, in_play: frozenset[str]) -> tuple[dict, int]:
    """The joint objective's candidate arguments, and how many candidates are compressed
    again: the stored memories (none); or, with a trainable compressor, the distinct
    candidates' tokens (all, in the forward pass, with gradient); or, in a
    counterfactual world with a frozen compressor, the stored memories with those of
    the candidates that hold a word `in_play` rewritten and compressed again (those
    the world has not compressed before). Only those: a candidate that holds other
    swapped words reads the same to this batch's questions either way, and on long
    documents that share many names (CLaRa's sample: most of them hold some training
    question's subject) compressing every candidate the world touches is what a world
    step would cost."""
    device = next(model.parameters()).device
    if not settings.trainable_compressor and world is None:
        return {"candidate_memory": torch.from_numpy(found.memory.astype(np.float32)).to(device)}, 0  # (B, L, n, d)
    distinct, first, rows = np.unique(found.doc_ids.astype(str), return_index=True, return_inverse=True)
    rows = torch.from_numpy(rows.reshape(found.doc_ids.shape)).to(device)  # (B, L) into the U distinct
    texts = documents(distinct.tolist())
    if settings.trainable_compressor:
        tokens = tokenize_texts(tokenizer, texts if world is None else world.texts(texts), lengths.doc,
                                pad_to_max_length=True)
        return {"candidate_memory": None, "candidate_doc_ids": tokens.ids.to(device),
                "candidate_doc_mask": tokens.mask.to(device), "candidate_rows": rows}, len(texts)
    memory = torch.from_numpy(found.memory.reshape(-1, *found.memory.shape[2:])[first].astype(np.float32))  # (U, n, d)
    rewritten = {i: world.text(text) for i, text in enumerate(texts) if world.touches(text, in_play)}
    changed = [i for i, new in rewritten.items() if new != texts[i]]
    missing = [i for i in changed if distinct[i] not in world.memory]  # a world drawn again remembers its own
    if missing:
        tokens = tokenize_texts(tokenizer, [rewritten[i] for i in missing], lengths.doc, pad_to_max_length=True)
        with torch.no_grad():
            fresh, _ = model.encode(Role.COMPRESSOR, tokens.ids.to(device), tokens.mask.to(device))
        world.memory.update(zip(distinct[missing].tolist(), fresh.float().cpu()))
    for i in changed:
        memory[i] = world.memory[distinct[i]]
    return {"candidate_memory": memory.to(device)[rows]}, len(missing)  # (B, L, n, d)


def attempt_fit(history: list[dict]) -> tuple[str, float]:
    """How well a stage-3 run fits its questions: its validation recall@1 when it held
    questions out, else its training recall@1, as the mean of its last two report windows."""
    key = "val_recall_at_1" if any("val_recall_at_1" in window for window in history) else "train_recall_at_1"
    values = [window[key] for window in history if key in window][-2:]
    return key, sum(values) / len(values) if values else 0.0


class MetricWindow:
    """Means of step metrics over windows of `every` steps (the last window ends at
    `total_steps`, whatever its length)."""

    def __init__(self, every: int, total_steps: int):
        self.every, self.total = every, total_steps
        self._sums: dict[str, float] = {}
        self._count = 0

    def add(self, step: int, values: dict[str, float]) -> dict[str, float] | None:
        """The window's means when `step` closes one, else None."""
        for key, value in values.items():
            self._sums[key] = self._sums.get(key, 0.0) + float(value)
        self._count += 1
        if step % self.every and step != self.total:
            return None
        means = {k: v / self._count for k, v in self._sums.items()}
        self._sums, self._count = {}, 0
        return means


def progress_line(stage: str, step: int, total_steps: int, metrics: dict, elapsed: float, first_step: int = 1) -> str:
    """`elapsed` seconds since `first_step` began (a resumed run starts after 1)."""
    eta = elapsed / (step - first_step + 1) * (total_steps - step)
    gains = [v for k, v in metrics.items() if k.startswith("retrieval_gain_")]
    if len(gains) > 4:  # one per memory vector: their range says enough in a progress line
        metrics = {k: v for k, v in metrics.items() if not k.startswith("retrieval_gain_")}
        metrics[f"retrieval_gains(x{len(gains)}) min"], metrics["max"] = min(gains), max(gains)
    shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k not in ("step", "stage"))
    return f"[{stage}] step {step}/{total_steps} {shown} | {elapsed:.0f}s elapsed, eta {eta:.0f}s"

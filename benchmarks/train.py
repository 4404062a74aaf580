"""Training benchmarks: what a trainable compressor and its index refreshes cost, and what ZeRO-3 saves.

    python benchmarks/train.py                       # all parts, tiny preset and SmolLM2-135M; into BENCHMARKS.md
    python benchmarks/train.py --parts steps --models tiny --no-write   # a quick look

Every comparison is measured side by side in this one run, and the last line printed is
one JSON object with the ratios.

- `steps` (one process, torch only: ``training.steps.stage3_step`` with ``TorchUpdater``):
  the stage-3 step time with stored candidate memories (the frozen compressor; the
  index's fp16 memories are read) against re-compressing 20 candidates per question
  every step, CLaRa's official stage 3 (each question its own 20 documents, so nothing
  is shared within a batch); and our trainable-compressor step (L = 64 candidates
  proposed by the index, each distinct document of the batch re-compressed once)
  against the frozen step at the same L. Arms alternate, `--rounds` times; medians.
  The ~100M config is the real SmolLM2-135M-Instruct (LoRA, frozen base), at a
  smaller batch.
- `refresh` (Ray): stage-3 throughput (steps/s, whole stage) of a trainable compressor
  with the index refreshed every `--refresh-every` steps against no refresh while
  training, tiny preset (4 questions and L = 16 candidates per step, so that a run
  takes a minute), one training worker; the refresh's encode actor gets the
  machine's other core (the cluster's spare resources). Also the share of a step spent
  in the index search (the refresh-off arm's own timers).
- `zero` (Ray): per-worker model + optimizer state at 2 workers under ZeRO-3 against
  ZeRO-0, measured inside each DeepSpeed worker after a step: the bytes of the module's
  parameters this rank holds (its partitions under ZeRO-3) plus the optimizer's state
  and any fp32 copies it steps. Tiny preset as stage 1 trains it (whole backbone) and
  SmolLM2-135M as stage 3 trains it (LoRA on a frozen base).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sections import write_section  # noqa: E402  (benchmarks/sections.py)

MARK_BEGIN, MARK_END = "<!-- benchmarks/train.py begin -->", "<!-- benchmarks/train.py end -->"
# config, questions per step, rounds, steps per round (SmolLM2's re-compressing arms take tens of seconds a step)
MODELS = {"tiny": (None, 16, 3, 4), "smollm2": (REPO / "jobs" / "configs" / "smollm2_135m.yaml", 2, 2, 2)}


def _model(name: str, work: Path):
    """(config, model, tokenizer, corpus) of a preset on the bundled trap corpus; weights as built (no training)."""
    from clara_ray.config import load_config
    from clara_ray.data.trap import generate_trap_corpus
    from clara_ray.modeling.checkpoint import load_model
    from clara_ray.modeling.initial import build_initial_model

    config = load_config(MODELS[name][0], [])
    corpus = generate_trap_corpus(160, 0.5, 0, "bundled")
    initial = build_initial_model(config, corpus.documents, corpus.train_qa, work / name, corpus.test_qa)
    model, tokenizer, _ = load_model(initial.model_dir)
    return initial.config, model, tokenizer, corpus, initial.model_dir


def step_times(name: str, work: Path, rounds: int | None = None, steps_per_round: int | None = None) -> dict:
    """Median stage-3 step seconds of four arms (see module doc)."""
    import numpy as np
    import torch

    from clara_ray.modeling.clara import Role
    from clara_ray.modeling.text import document_input
    from clara_ray.training.batches import stage3_batches
    from clara_ray.training.examples import QuestionBatch
    from clara_ray.training.candidates import ExactSearch, FixedCandidates
    from clara_ray.training.engine import ParameterAnchor, TorchUpdater
    from clara_ray.training.settings import Stage3Settings, WorkerSettings
    from clara_ray.training.steps import stage3_step

    torch.set_num_threads(2)
    config, model, tokenizer, corpus, _ = _model(name, work)
    _, batch_size, default_rounds, default_steps = MODELS[name]
    rounds, steps_per_round = rounds or default_rounds, steps_per_round or default_steps
    ids = [d.id for d in corpus.documents]
    texts = {d.id: document_input(d.text, d.title) for d in corpus.documents}
    worker = WorkerSettings.from_config(config)
    # Only time is measured: the stored memories are random values of the shape the index stores
    # (encoding the corpus with SmolLM2 would take minutes and change no step's arithmetic).
    memory = np.random.default_rng(0).normal(size=(len(ids), model.num_memory_tokens,
                                                   model.lm.config.hidden_size)).astype(np.float16)
    exact = ExactSearch(ids, memory)
    questions = QuestionBatch.from_qa(corpus.train_qa)
    # CLaRa's shape: every question its own 20 documents, none shared within a batch.
    own = FixedCandidates({q: [ids[(i * 20 + j) % len(ids)] for j in range(20)] for i, q in enumerate(questions.question_ids)},
                          ids, memory)
    base = dataclasses.replace(Stage3Settings.from_config(config.with_steps({"stage3": 1000})), micro_batch_size=batch_size)
    arms = {
        "stored, L=20": (dataclasses.replace(base, num_candidates=20), own),
        "re-compress 20 per question (CLaRa)": (dataclasses.replace(base, num_candidates=20, trainable_compressor=True), own),
        "stored, L=64": (dataclasses.replace(base, num_candidates=64), exact),
        "trainable, L=64 (distinct candidates re-compressed)": (dataclasses.replace(base, num_candidates=64,
                                                                                    trainable_compressor=True), exact),
    }
    seconds = {arm: [] for arm in arms}
    encoded = {arm: [] for arm in arms}
    search = {arm: [] for arm in arms}
    documents = lambda doc_ids: [texts[d] for d in doc_ids]  # noqa: E731
    batches = stage3_batches(questions, batch_size, 1000, 0)
    for _ in range(rounds):
        for arm, (settings, source) in arms.items():
            roles = [Role.QUERY_REASONER] + ([Role.COMPRESSOR] if settings.trainable_compressor else [])
            model.set_trainable(roles, backbone=False)
            model.train()
            updater = TorchUpdater(model, settings.optimiser)
            anchor = ParameterAnchor(model, settings.anchor_weight, lower_weight=settings.lower_anchor_weight,
                                     free_top_layers=settings.anchor_free_top_layers)
            for step in range(1, steps_per_round + 2):  # the first step of each arm warms up and is not counted
                _, batch = next(batches)
                metrics = stage3_step(updater, tokenizer, batch, source, settings, worker.lengths, step, anchor,
                                      documents)
                if step > 1:
                    seconds[arm].append(metrics["seconds_step"])
                    search[arm].append(metrics["seconds_search"])
                    encoded[arm].append(metrics.get("candidates_encoded", 0))
            print(f"[steps] {name} {arm}: {statistics.median(seconds[arm][-steps_per_round:]):.3f}s", flush=True)
    result = {arm: {"median_step_seconds": statistics.median(seconds[arm]),
                    "candidates_encoded_per_step": float(np.mean(encoded[arm])),
                    "search_share": statistics.median(search[arm]) / statistics.median(seconds[arm])} for arm in arms}
    return {"model": name, "questions_per_step": batch_size, "arms": result,
            "stored_speedup_vs_clara": result["re-compress 20 per question (CLaRa)"]["median_step_seconds"]
            / result["stored, L=20"]["median_step_seconds"],
            "trainable_overhead_L64": result["trainable, L=64 (distinct candidates re-compressed)"]["median_step_seconds"]
            / result["stored, L=64"]["median_step_seconds"]}


def _zero_loop(run: dict):
    """Ray Train worker: one stage-1 (tiny) or stage-3-shaped (LoRA) step under ZeRO, then state bytes."""
    import random

    import ray.train
    import torch

    from clara_ray.config import load_config
    from clara_ray.modeling.checkpoint import load_model
    from clara_ray.modeling.clara import Role
    from clara_ray.training.batches import stage1_batch
    from clara_ray.training.settings import Lengths
    from clara_ray.training.examples import Stage1Example
    from clara_ray.training.engine import DeepSpeedUpdater
    from clara_ray.training.settings import Stage1Settings
    from clara_ray.training.steps import stage1_step

    torch.set_num_threads(1)
    model, tokenizer, _ = load_model(run["model_dir"])
    roles = [Role.COMPRESSOR, Role.GENERATOR]
    model.set_trainable(roles, backbone=run["backbone"])
    settings = Stage1Settings.from_config(load_config(None, ["stage1.steps=10"]))
    updater = DeepSpeedUpdater(model, settings.optimiser, 2, run["zero_stage"], use_gpu=False, bf16=False)
    texts = run["texts"]
    lengths = Lengths(doc=32, question=24, answer=12, reconstruction=40)
    examples = [Stage1Example(0), Stage1Example(1, "Which city?", "Marlow", (2,))]
    for _ in range(2):
        batch = stage1_batch(examples, texts, 2, model.num_memory_tokens, tokenizer, lengths, random.Random(0))
        stage1_step(updater, batch, settings)
    engine = updater.engine
    module_params = list(engine.module.parameters())
    held = [getattr(p, "ds_tensor", p.data) for p in module_params]
    model_bytes = sum(t.numel() * t.element_size() for t in held)
    ids = {id(p) for p in module_params} | {id(t) for t in held}
    optimizer = engine.basic_optimizer
    copies = sum(p.numel() * p.element_size() for g in optimizer.param_groups for p in g["params"] if id(p) not in ids)
    states = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    rank = ray.train.get_context().get_world_rank()
    Path(run["out"], f"rank-{rank}.json").write_text(json.dumps({"model_bytes": model_bytes,
                                                                 "optimizer_bytes": copies + states}))


def zero_memory(name: str, work: Path) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from clara_ray.data.trap import generate_trap_corpus

    _, _, _, _, model_dir = _model(name, work)
    texts = [d.text for d in generate_trap_corpus(12, seed=3).documents[:6]]
    result = {}
    for stage in (0, 3):
        out = work / f"zero{stage}-{name}"
        out.mkdir()
        trainer = TorchTrainer(
            _zero_loop,
            train_loop_config={"model_dir": str(model_dir), "zero_stage": stage, "backbone": name == "tiny",
                               "texts": texts, "out": str(out)},
            scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
            run_config=RunConfig(name=f"zero{stage}-{name}", storage_path=str(work / "ray_train")),
        )
        trainer.fit()
        ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]
        result[f"zero{stage}"] = {k: max(r[k] for r in ranks) for k in ("model_bytes", "optimizer_bytes")}  # the larger rank
        print(f"[zero] {name} ZeRO-{stage}: {result[f'zero{stage}']}", flush=True)
    total = {k: v["model_bytes"] + v["optimizer_bytes"] for k, v in result.items()}
    return {"model": name, "trains": "whole backbone (stage 1)" if name == "tiny" else "LoRA on a frozen base",
            **result, "zero3_over_zero0": total["zero3"] / total["zero0"]}


def refresh_throughput(work: Path, steps: int, refresh_every: int) -> dict:
    """Whole-stage steps/s of stage 3 with a trainable compressor, refresh on against off."""
    import ray

    from clara_ray.config import load_config
    from clara_ray.data.corpus_rows import CorpusFormat
    from clara_ray.data.trap import generate_trap_corpus, write_trap_corpus
    from clara_ray.encode import encode_corpus
    from clara_ray.index.actor import IndexActorCandidates, index_actor_name, start_index_actor
    from clara_ray.index.refresh import RefreshPlan, refresh_scheduler_name, start_refresh_scheduler
    from clara_ray.index.versions import IndexSettings
    from clara_ray.modeling.initial import build_initial_model
    from clara_ray.modeling.text import document_input
    from clara_ray.pipeline import encode_settings
    from clara_ray.training.stages import run_stage3, write_training_data

    corpus = generate_trap_corpus(160, 0.5, 0, "bundled")
    paths = write_trap_corpus(work / "data", corpus)
    arms = {}
    for arm, every in (("refresh off", 0), (f"refresh every {refresh_every} steps", refresh_every)):
        run_dir = work / arm.replace(" ", "-")
        config = load_config(None, [f"stage3.steps={steps}", "stage3.compressor=trainable",
                                    f"stage3.refresh_every={every}", "train.num_workers=1",
                                    "stage3.micro_batch_size_per_worker=4", "stage3.num_candidates=16",
                                    "stage3.checkpoint_every=100000", "encode.max_actors=1"])
        initial = build_initial_model(config, corpus.documents, corpus.train_qa, run_dir / "init", corpus.test_qa)
        config = initial.config
        data = write_training_data(config, {d.id: document_input(d.text, d.title) for d in corpus.documents},
                                   corpus.train_qa, run_dir)
        encode_corpus(str(paths["corpus"]), initial.model_dir, run_dir / "memory", encode_settings(config),
                      CorpusFormat.JSONL, log=lambda line: None)
        index = start_index_actor(str(run_dir / "memory"), index_actor_name(run_dir),
                                  settings=IndexSettings.from_config(config.index))
        plan = RefreshPlan(str(run_dir / "memory"), str(data.documents), encode_settings(config),
                           str(run_dir / "refresh"), config.stage3.num_candidates)
        scheduler = start_refresh_scheduler(index, plan, refresh_scheduler_name(run_dir))
        started = time.perf_counter()
        result = run_stage3(config, data, initial.model_dir, IndexActorCandidates(index), run_dir,
                            refresh=(scheduler, plan))
        seconds = time.perf_counter() - started
        status = ray.get(scheduler.drain.remote())
        ray.kill(scheduler)
        ray.kill(index)
        last = result.history[-1]
        windows = result.history
        arms[arm] = {"stage_seconds": seconds, "steps_per_second": steps / seconds,
                     "refreshes_swapped": status["swapped"], "refreshes_skipped": len(status["skipped"]),
                     "refreshes_failed": status["failed"],
                     "search_share": statistics.mean(h["seconds_search"] / h["seconds_step"] for h in windows),
                     "final_staleness": last.get("index_staleness"),
                     "events": status["events"]}
        print(f"[refresh] {arm}: {steps / seconds:.3f} steps/s, {status['swapped']} swapped, "
              f"{len(status['skipped'])} skipped", flush=True)
    on, off = arms[f"refresh every {refresh_every} steps"], arms["refresh off"]
    return {"steps": steps, "arms": arms, "throughput_ratio": on["steps_per_second"] / off["steps_per_second"]}


def _table(results: dict, command: str) -> str:
    lines = [MARK_BEGIN, "## Training benchmarks (`benchmarks/train.py`)", "", f"`{command}`, one run, "
             f"{time.strftime('%Y-%m-%d')}; every ratio measured side by side in that run.", ""]
    for steps in results.get("steps", []):
        lines += [f"**Stage-3 step time, {steps['model']}** ({steps['questions_per_step']} questions per step, "
                  "median over alternating rounds):", "",
                  "| arm | seconds / step | candidates compressed / step | share in index search |", "|---|---|---|---|"]
        for arm, row in steps["arms"].items():
            lines.append(f"| {arm} | {row['median_step_seconds']:.3f} | {row['candidates_encoded_per_step']:.0f} | "
                         f"{row['search_share']:.1%} |")
        lines += ["", f"Stored memories are **{steps['stored_speedup_vs_clara']:.1f}x** faster than re-compressing 20 "
                  f"per question; the trainable compressor's step at L = 64 costs "
                  f"**{steps['trainable_overhead_L64']:.1f}x** the frozen one's.", ""]
    if "refresh" in results:
        r = results["refresh"]
        lines += [f"**Throughput while refreshes run** (tiny preset, trainable compressor, {r['steps']} stage-3 steps "
                  "of 4 questions and L = 16, one training worker; the refresh's encoders beside it on the same 2 cores):", "",
                  "| arm | steps/s | refreshes swapped / skipped / failed | share of a step in index search |",
                  "|---|---|---|---|"]
        for arm, row in r["arms"].items():
            lines.append(f"| {arm} | {row['steps_per_second']:.3f} | {row['refreshes_swapped']} / "
                         f"{row['refreshes_skipped']} / {row['refreshes_failed']} | {row['search_share']:.1%} |")
        lines += ["", f"Throughput with refreshes running: **{r['throughput_ratio']:.2f}x** of refresh off.", ""]
    for z in results.get("zero", []):
        mib = lambda b: b / 2**20  # noqa: E731
        lines += [f"**Per-worker state at 2 workers, {z['model']}** ({z['trains']}): ZeRO-0 model "
                  f"{mib(z['zero0']['model_bytes']):.1f} MiB + optimizer {mib(z['zero0']['optimizer_bytes']):.1f} MiB; "
                  f"ZeRO-3 model {mib(z['zero3']['model_bytes']):.1f} MiB + optimizer "
                  f"{mib(z['zero3']['optimizer_bytes']):.1f} MiB: **{z['zero3_over_zero0']:.2f}x**.", ""]
    return "\n".join(lines + [MARK_END])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["steps", "zero", "refresh"], choices=["steps", "zero", "refresh"])
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=list(MODELS))
    parser.add_argument("--rounds", type=int, help="of the step-time arms (default: 3 tiny, 2 SmolLM2)")
    parser.add_argument("--steps-per-round", type=int, help="(default: 4 tiny, 2 SmolLM2)")
    parser.add_argument("--refresh-steps", type=int, default=150)
    parser.add_argument("--refresh-every", type=int, default=25)
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    results: dict = {}
    with tempfile.TemporaryDirectory() as directory:
        work = Path(directory)
        if "steps" in args.parts:
            results["steps"] = [step_times(m, work, args.rounds, args.steps_per_round) for m in args.models]
        if {"zero", "refresh"} & set(args.parts):
            from clara_ray.cli import start_ray

            start_ray(address=None)
            if "zero" in args.parts:
                results["zero"] = [zero_memory(m, work) for m in args.models]
            if "refresh" in args.parts:
                results["refresh"] = refresh_throughput(work, args.refresh_steps, args.refresh_every)
    command = "python benchmarks/train.py " + " ".join(sys.argv[1:])
    if not args.no_write:
        write_section(REPO / "BENCHMARKS.md", _table(results, command.strip()), MARK_BEGIN, MARK_END)
    summary = {
        "stored_speedup_vs_clara": {s["model"]: s["stored_speedup_vs_clara"] for s in results.get("steps", [])},
        "trainable_overhead_L64": {s["model"]: s["trainable_overhead_L64"] for s in results.get("steps", [])},
        "zero3_over_zero0": {z["model"]: z["zero3_over_zero0"] for z in results.get("zero", [])},
        **({"refresh_throughput_ratio": results["refresh"]["throughput_ratio"],
            "search_share": results["refresh"]["arms"]["refresh off"]["search_share"]} if "refresh" in results else {}),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

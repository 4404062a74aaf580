"""Corpus-encoding benchmark: Ray Data pipeline vs a plain loop, FLOP/s vs GEMM peak, scaling.

    python benchmarks/encode.py                      # the full run behind BENCHMARKS.md
    python benchmarks/encode.py --tiny-docs 5000 --big-docs 100 --rounds 2 --sizes 1000 10000 --no-write   # a quick look

All figures come from one run on one machine, measured side by side:
1. GEMM peak: the best of several large fp32 `torch.matmul`s on the same threads,
   measured before and after the runs (the higher one counts: a busy moment at
   either end must not make the fractions look better).
2. For the tiny preset (random weights; speed does not depend on them) and a real
   pretrained LM, the bundled SmolLM2-135M-Instruct (`model.backbone=smollm2-135m`,
   referenced by the model directory as a run's models are): documents/s of
   (a) a plain single-process loop with no Ray running: load the model, read the
       JSONL -> tokenize -> compressor (LoRA merged, as in the actor) -> fp16
       rows -> Parquet, same model, batch size and threads;
   (b) `encode_corpus` with one actor owning the same cores, on a local Ray
       started for the run as `clara-ray encode` starts it: its encode step
       (read -> actor start and model load -> actor -> Parquet, checkpointed)
       and the whole job (plus the duplicate-id, count and quarantine passes).
   This machine's speed drifts by several percent from one minute to the next,
   so (a) and (b) run in alternating rounds (loop first, then Ray first, ...)
   and the ratio reported is the median of the rounds' ratios.
   Achieved FLOP/s = model FLOPs per document (counted by torch's FlopCounterMode)
   x documents/s, against the GEMM peak.
3. Tiny preset over corpus sizes: wall time and the driver's peak RSS.
Results are printed and written into BENCHMARKS.md between this benchmark's markers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sections import write_section  # noqa: E402  (benchmarks/sections.py)

from clara_ray.cli import start_ray
from clara_ray.encode import EncodeSettings, encode_corpus
from clara_ray.memory_shards import memory_table
from clara_ray.modeling.backbone import build_tiny, load_pretrained, train_tokenizer
from clara_ray.modeling.checkpoint import load_model, save_model
from clara_ray.modeling.clara import ClaraModel, LoraSettings, Role
from clara_ray.modeling.text import tokenize_texts

THREADS = os.cpu_count() or 1
MARK_BEGIN, MARK_END = "<!-- benchmarks/encode.py begin -->", "<!-- benchmarks/encode.py end -->"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TinyShape:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int


@dataclass(frozen=True)
class ModelSpec:
    name: str
    backbone: str  # "tiny" (built from `tiny`) or a model.backbone reference
    doc_max_len: int
    num_memory_tokens: int
    lora_r: int
    batch_size: int
    words_per_doc: int
    tiny: TinyShape | None = None


TINY = ModelSpec("tiny preset", "tiny", 32, 4, 32, 128, 20, TinyShape(256, 4, 4, 512, 600))
REAL_LM = ModelSpec("SmolLM2-135M-Instruct", "smollm2-135m", 128, 8, 16, 32, 100)


def synthetic_documents(count: int, words_per_doc: int, seed: int = 0) -> list[str]:
    """Word soup from a 5,000-word vocabulary: the token count is what matters here."""
    rng = random.Random(seed)
    vocabulary = [f"{rng.choice('bcdfghklmnprstvz')}{rng.choice('aeiou')}{rng.choice('lmnrst')}{i % 37}" for i in range(5000)]
    return [" ".join(rng.choices(vocabulary, k=words_per_doc)) for _ in range(count)]


def write_corpus(path: Path, texts: list[str]) -> Path:
    with path.open("w") as out:
        for i, text in enumerate(texts):
            out.write(json.dumps({"id": f"d{i}", "text": text}) + "\n")
    return path


def build_model(spec: ModelSpec, directory: Path) -> tuple[Path, int]:
    if spec.tiny is None:  # a pretrained base, referenced by the saved model as in a run
        backbone, tokenizer = load_pretrained(spec.backbone)
    else:
        shape = spec.tiny
        tokenizer = train_tokenizer(synthetic_documents(2000, spec.words_per_doc, seed=1), shape.vocab_size)
        backbone = build_tiny(tokenizer, shape.hidden_size, shape.num_layers, shape.num_heads, shape.intermediate_size,
                              max_positions=spec.doc_max_len + spec.num_memory_tokens + 8, seed=0)
    model = ClaraModel(backbone, spec.num_memory_tokens, LoraSettings(spec.lora_r, 2 * spec.lora_r, 0.0, LORA_TARGETS))
    parameters = sum(p.numel() for p in model.parameters())
    saved = save_model(model, tokenizer, directory, backbone_ref=spec.backbone, save_backbone=spec.tiny is not None)
    return saved, parameters


def gemm_peak(threads: int, size: int = 4096, repeats: int = 5) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.matmul(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def flops_per_document(model_dir: Path, spec: ModelSpec, texts: list[str]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model, tokenizer, _ = load_model(model_dir)
    model.eval()
    model.merge_for_inference(Role.COMPRESSOR)  # count the model's FLOPs, not the unmerged LoRA's extra ones
    tokens = tokenize_texts(tokenizer, texts[: spec.batch_size], spec.doc_max_len)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model.encode(Role.COMPRESSOR, tokens.ids, tokens.mask)
    return counter.get_total_flops() / len(tokens.ids)


def plain_loop(model_dir: Path, spec: ModelSpec, corpus: Path, output: Path, threads: int) -> float:
    """Documents/s of the same work without Ray: load the model, read the JSONL, tokenize, encode, fp16 rows, Parquet."""
    torch.set_num_threads(threads)
    shutil.rmtree(output, ignore_errors=True)
    output.mkdir(parents=True)
    started = time.perf_counter()  # the actor's model load counts on Ray's side too
    model, tokenizer, _ = load_model(model_dir)
    model.eval()
    model.merge_for_inference(Role.COMPRESSOR)  # as the encoder actor does
    with corpus.open() as lines:
        texts = [json.loads(line)["text"] for line in lines]
    for part, start in enumerate(range(0, len(texts), spec.batch_size)):
        batch = texts[start : start + spec.batch_size]
        tokens = tokenize_texts(tokenizer, batch, spec.doc_max_len)
        with torch.inference_mode():
            memory, _ = model.encode(Role.COMPRESSOR, tokens.ids, tokens.mask)
        lengths = np.asarray(tokens.lengths)
        table = memory_table([f"d{start + i}" for i in range(len(batch))], memory.numpy(),
                             np.minimum(lengths, spec.doc_max_len), lengths > spec.doc_max_len)
        pq.write_table(table, output / f"part-{part:05d}.parquet")
    return len(texts) / (time.perf_counter() - started)


class PeakRss:
    """The driver's peak resident memory while the block runs (sampled every 50 ms)."""

    def __enter__(self):
        self.process, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.05)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def ray_pipeline(model_dir: Path, spec: ModelSpec, corpus: Path, output: Path, threads: int):
    """`clara-ray encode` on a local Ray started as that command starts it, shut down after."""
    import ray

    settings = EncodeSettings(doc_max_len=spec.doc_max_len, batch_size=spec.batch_size, min_actors=1, max_actors=1,
                              num_cpus_per_actor=threads, rows_per_shard=8192)
    start_ray(address=None, dashboard=False)
    try:
        with PeakRss() as rss:
            summary = encode_corpus(corpus, model_dir, output, settings, log=lambda *_: None)
    finally:
        ray.shutdown()
    return summary, rss.peak


def compare(spec: ModelSpec, num_docs: int, rounds: int, work: Path, threads: int) -> dict:
    """The side-by-side comparison: `rounds` alternating loop / Ray runs over the same corpus."""
    model_dir, parameters = build_model(spec, work / f"model-{spec.backbone}")
    texts = synthetic_documents(num_docs, spec.words_per_doc)
    corpus = write_corpus(work / f"corpus-{spec.backbone}-{num_docs}.jsonl", texts)
    flops = flops_per_document(model_dir, spec, texts)
    loop_rates, ray_rates, job_rates = [], [], []
    for round_index in range(rounds):
        def loop():
            loop_rates.append(plain_loop(model_dir, spec, corpus, work / f"loop-{spec.backbone}", threads))

        def pipeline():
            output = work / f"ray-{spec.backbone}-{round_index}"
            summary, _ = ray_pipeline(model_dir, spec, corpus, output, threads)
            ray_rates.append(summary.documents_per_second)
            job_rates.append(num_docs / summary.total_seconds)
            shutil.rmtree(output)

        for run in (loop, pipeline) if round_index % 2 == 0 else (pipeline, loop):
            run()
        print(f"{spec.name} round {round_index + 1}: loop {loop_rates[-1]:.1f} docs/s, Ray encode "
              f"{ray_rates[-1]:.1f} docs/s, ratio {ray_rates[-1] / loop_rates[-1]:.3f}", flush=True)
    ratios = [r / l for r, l in zip(ray_rates, loop_rates)]
    return {
        "model": spec.name, "parameters": parameters, "documents": num_docs, "doc_tokens": spec.doc_max_len,
        "batch_size": spec.batch_size, "rounds": rounds,
        "loop_docs_per_s": statistics.median(loop_rates), "ray_encode_docs_per_s": statistics.median(ray_rates),
        "ray_job_docs_per_s": statistics.median(job_rates), "round_ratios": ratios,
        "ratio": statistics.median(ratios), "gflop_per_doc": flops / 1e9,
    }


def _scaling_row(size: int, summary, peak_rss: int) -> dict:
    return {"documents": size, "job_seconds": summary.total_seconds, "encode_seconds": summary.seconds,
            "driver_peak_rss_mb": peak_rss / 2**20}


def scaling(sizes: list[int], work: Path, threads: int) -> list[dict]:
    """Tiny preset over corpus sizes."""
    model_dir, _ = build_model(TINY, work / "model-scaling")
    rows = []
    for size in sizes:
        corpus = write_corpus(work / f"scaling-{size}.jsonl", synthetic_documents(size, TINY.words_per_doc, seed=size))
        summary, peak_rss = ray_pipeline(model_dir, TINY, corpus, work / f"scaling-out-{size}", threads)
        rows.append(_scaling_row(size, summary, peak_rss))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def with_fractions_of_peak(comparison: dict, peak: float) -> dict:
    flops = comparison["gflop_per_doc"] * 1e9
    return {**comparison, "loop_fraction_of_peak": flops * comparison["loop_docs_per_s"] / peak,
            "ray_fraction_of_peak": flops * comparison["ray_encode_docs_per_s"] / peak}


def markdown(peak: float, comparisons: list[dict], scale: list[dict], threads: int, command: str) -> str:
    lines = [
        MARK_BEGIN,
        "## Corpus encoding (`benchmarks/encode.py`)",
        "",
        (
            f"Command: `{command}` — {threads} CPU threads, {time.strftime('%Y-%m-%d')}, "
            f"torch {torch.__version__}. GEMM peak (fp32 4096² matmul, best of 5, the higher of before and after the runs): **{peak / 1e9:.1f} GFLOP/s**."
        ),
        "",
        "| model | params | docs | tokens/doc | batch | plain loop docs/s | Ray Data encode docs/s | ratio (rounds) | whole job docs/s | GFLOP/doc | loop % of peak | Ray % of peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        rounds = " / ".join(f"{r:.2f}" for r in c["round_ratios"])
        lines.append(
            f"| {c['model']} | {c['parameters'] / 1e6:.1f}M | {c['documents']} | {c['doc_tokens']} | {c['batch_size']} | "
            f"{c['loop_docs_per_s']:.1f} | {c['ray_encode_docs_per_s']:.1f} | **{c['ratio']:.2f}** ({rounds}) | "
            f"{c['ray_job_docs_per_s']:.1f} | {c['gflop_per_doc']:.3f} | {100 * c['loop_fraction_of_peak']:.0f}% | "
            f"**{100 * c['ray_fraction_of_peak']:.0f}%** |"
        )
    lines += [
        "",
        "Plain loop = load the model, then read -> tokenize -> compressor -> Parquet in one process, no Ray running.",
        "Ray Data encode = the checkpointed read -> compressor actor (one actor, all cores; its start and model",
        "load included) -> Parquet step, on a local Ray started as `clara-ray encode` starts it (no dashboard);",
        "whole job adds the duplicate-id, count and quarantine passes over the",
        "input and the manifest check. Rounds alternate which of the two runs first; docs/s and the ratio are",
        "medians over the rounds, each round's ratio in brackets.",
        "",
        "Tiny preset, time against corpus size (one actor, all cores):",
        "",
        "| documents | whole job s | encode step s | x previous size (job) | driver peak RSS MB |",
        "|---|---|---|---|---|",
    ]
    previous = None
    for row in scale:
        growth = "" if previous is None else f"{row['job_seconds'] / previous['job_seconds']:.2f}"
        lines.append(f"| {row['documents']} | {row['job_seconds']:.1f} | {row['encode_seconds']:.1f} | {growth} | "
                     f"{row['driver_peak_rss_mb']:.0f} |")
        previous = row
    lines.append(MARK_END)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Long enough that actor start-up and model loading (a few seconds) weigh little.
    parser.add_argument("--tiny-docs", type=int, default=60000, help="documents per round, tiny-preset comparison (0: skip)")
    parser.add_argument("--big-docs", type=int, default=800, help="documents per round, SmolLM2-135M comparison (0: skip)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating loop / Ray rounds per comparison")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    command = "python benchmarks/encode.py " + " ".join(sys.argv[1:])

    threads = THREADS
    peak_before = gemm_peak(threads)
    print(f"GEMM peak before the runs {peak_before / 1e9:.1f} GFLOP/s on {threads} threads", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        comparisons = []
        for spec, count in ((TINY, args.tiny_docs), (REAL_LM, args.big_docs)):
            if count == 0:
                continue
            comparisons.append(compare(spec, count, args.rounds, work, threads))
            print(json.dumps(comparisons[-1]), flush=True)
        scale = scaling(args.sizes, work, threads)
    peak_after = gemm_peak(threads)
    print(f"GEMM peak after the runs {peak_after / 1e9:.1f} GFLOP/s", flush=True)
    peak = max(peak_before, peak_after)
    comparisons = [with_fractions_of_peak(c, peak) for c in comparisons]
    for comparison in comparisons:
        print(json.dumps(comparison), flush=True)
    section = markdown(peak, comparisons, scale, threads, command.strip())
    print(section)
    if not args.no_write:
        write_section(REPO / "BENCHMARKS.md", section, MARK_BEGIN, MARK_END)
    return 0


if __name__ == "__main__":
    sys.exit(main())

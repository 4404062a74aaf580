"""Training memory against corpus size: does anything corpus-sized reach the trainer?

    python benchmarks/training_memory.py                  # 10k and 100k documents, written into BENCHMARKS.md
    python benchmarks/training_memory.py --sizes 2000 --steps 10 --no-write   # a quick look

For each corpus size (bundled trap corpus, 9 documents and 4.5 training questions
per entity, so the training questions grow with it) two fresh processes run one
after the other:
1. prepare: corpus -> initial model (small tiny config) -> the stages' example
   files (``write_training_data``: BM25 neighbours, rivals, Arrow tables). This is
   the driver-side preparation; it holds the corpus and is not expected to be flat.
2. train: a local Ray and two-worker Ray Train + DeepSpeed stage 1 over those files
   (``run_stage1``): the driver passes paths, the examples arrive through the Ray
   Data draw plan, documents are read by row from the memory-mapped table.
Reported: peak resident memory (ru_maxrss) of the prepare process, of the train
driver, and of each training worker (measured inside the worker after its last
step). RSS counts the pages of the memory-mapped tables a worker touched; those
are shared between the processes of a node and evictable, not private copies.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sections import write_section  # noqa: E402  (benchmarks/sections.py)

MARK_BEGIN, MARK_END = "<!-- benchmarks/training_memory.py begin -->", "<!-- benchmarks/training_memory.py end -->"
SMALL = [
    "model.tiny.hidden_size=64", "model.tiny.num_layers=2", "model.tiny.num_heads=2",
    "model.tiny.intermediate_size=128", "model.tiny.vocab_size=500", "stage1.micro_batch_size_per_worker=8",
    "stage1.report_every=10", "stage1.checkpoint_every=100000", "train.num_workers=2",
]


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def prepare(work: Path, documents: int, steps: int) -> dict:
    from clara_ray.config import load_config
    from clara_ray.data.trap import generate_trap_corpus
    from clara_ray.modeling.initial import build_initial_model
    from clara_ray.training.stages import write_training_data

    config = load_config(None, [*SMALL, f"stage1.steps={steps}"])
    corpus = generate_trap_corpus(num_entities=math.ceil(documents / 9), seed=0)
    started = time.perf_counter()
    config = build_initial_model(config, corpus.documents, corpus.train_qa, work / "init").config
    data = write_training_data(config, {d.id: d.text for d in corpus.documents}, corpus.train_qa, work)
    return {"documents": len(corpus.documents), "train_questions": len(corpus.train_qa),
            "seconds": time.perf_counter() - started, "peak_mib": _peak_mib(),
            "files_mib": {k: Path(v).stat().st_size / 2**20 for k, v in vars(data).items() if v is not None},
            "data": {k: None if v is None else str(v) for k, v in vars(data).items()}}


def _measured_stage1(run: dict):
    """stage1_loop, then this worker's peak RSS into the run directory."""
    import ray.train

    from clara_ray.training.loops import stage1_loop

    history = stage1_loop(run)
    rank = ray.train.get_context().get_world_rank()
    Path(run["tensorboard_dir"]).parent.joinpath(f"worker-{rank}-peak.json").write_text(json.dumps(_peak_mib()))
    return history


def train(work: Path, steps: int, data: dict) -> dict:
    from clara_ray.cli import start_ray
    from clara_ray.config import load_config
    from clara_ray.training.stages import TrainingData, run_stage1

    config = load_config(None, [*SMALL, f"stage1.steps={steps}"])
    start_ray(None)
    started = time.perf_counter()
    training = TrainingData(**{k: None if v is None else Path(v) for k, v in data.items()})
    result = run_stage1(config, training, work / "init", work, loop=_measured_stage1)
    workers = [json.loads(p.read_text()) for p in sorted(work.glob("worker-*-peak.json"))]
    return {"seconds": time.perf_counter() - started, "driver_peak_mib": _peak_mib(), "worker_peak_mib": workers,
            "final_loss": result.history[-1]["loss"]}


def _child(role: str, work: Path, *args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", role, str(work), *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the {role} process failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def section(results: list[dict], command: str) -> str:
    lines = [
        MARK_BEGIN,
        "## Training memory against corpus size (Ray Data draw plan, documents by row)",
        "",
        f"`{command}` — one run on this machine (2 cores); stage 1 of a small tiny config, 2 Ray Train workers",
        "(DeepSpeed, gloo), the bundled trap corpus grown to each size. Peak RSS (ru_maxrss) of each process.",
        "",
        "| documents | training questions | example files (MiB) | prepare process (MiB) | train driver (MiB) | worker 0 / 1 (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        p, t = r["prepare"], r["train"]
        lines.append(
            f"| {p['documents']:,} | {p['train_questions']:,} | {sum(p['files_mib'].values()):.1f} | {p['peak_mib']:.0f} | "
            f"{t['driver_peak_mib']:.0f} | {' / '.join(f'{w:.0f}' for w in t['worker_peak_mib'])} |"
        )
    first, last = results[0], results[-1]
    growth = last["prepare"]["documents"] / first["prepare"]["documents"]
    lines += [
        "",
        f"From {first['prepare']['documents']:,} to {last['prepare']['documents']:,} documents ({growth:.0f}x): train driver "
        f"{last['train']['driver_peak_mib'] - first['train']['driver_peak_mib']:+.0f} MiB, workers "
        + ", ".join(f"{b - a:+.0f} MiB" for a, b in zip(first['train']['worker_peak_mib'], last['train']['worker_peak_mib']))
        + f"; the prepare process (corpus, BM25 neighbours, tokenizer) "
        f"{last['prepare']['peak_mib'] - first['prepare']['peak_mib']:+.0f} MiB.",
        "The trainer's driver passes file paths; workers receive their draws through the Ray Data plan and read",
        "the 1-5 documents an example needs from the memory-mapped `documents.arrow`, so neither holds the corpus.",
        "The preparation (one process, before training) still reads the whole corpus to find each question's",
        "BM25 neighbours.",
        MARK_END,
    ]
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        role, work = sys.argv[2], Path(sys.argv[3])
        if role == "prepare":
            result = prepare(work, int(sys.argv[4]), int(sys.argv[5]))
        else:
            result = train(work, int(sys.argv[4]), json.loads(sys.argv[5]))
        print(json.dumps(result))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000], help="corpus sizes (documents)")
    parser.add_argument("--steps", type=int, default=40, help="stage-1 steps per size")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    results = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as work:
            prepared = _child("prepare", Path(work), str(size), str(args.steps))
            trained = _child("train", Path(work), str(args.steps), json.dumps(prepared["data"]))
        results.append({"prepare": prepared, "train": trained})
        print(json.dumps(results[-1]), flush=True)
    command = "python benchmarks/training_memory.py" + ("" if args.sizes == [10000, 100000] else
                                                         " --sizes " + " ".join(map(str, args.sizes)))
    text = section(results, command)
    print(text)
    if not args.no_write:
        write_section(REPO / "BENCHMARKS.md", text, MARK_BEGIN, MARK_END)
    return 0


if __name__ == "__main__":
    sys.exit(main())

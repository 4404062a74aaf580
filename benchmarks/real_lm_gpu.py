"""The real LM's whole recipe on one GPU, without Ray: stage 1 -> encode -> stage 3 -> evaluate, bf16.

    python benchmarks/real_lm_gpu.py                                   # SmolLM2-135M, bundled trap corpus
    python benchmarks/real_lm_gpu.py --no-write model.backbone=/models/other.gguf stage1.steps=400

For a GPU machine that has torch and transformers and not much else: besides them it
needs peft, tokenizers, pydantic, pyyaml and bm25s (gguf for a GGUF backbone), and
neither Ray, DeepSpeed nor FAISS. It is `benchmarks/recipe_sweep.py one` (the
library's batches, step functions, optimizer groups and schedule, through
``clara_ray.training.one_process``; an exact search over the whole corpus memory in
place of the index actors) with jobs/configs/smollm2_135m.yaml, bf16 autocast
(float32 weights) and one GPU's batch: 32 examples a step, as the tiny preset's
steps take (2 workers x 16), for the tiny preset's 800 stage-1 and 400 stage-3 steps
(the CPU preset affords 180 and 150 steps of 16). Not yet run on a GPU: whether
it fits 10 minutes is for its first run to say. Prints one JSON line and writes a
section of BENCHMARKS.md (device,
times, test Recall@1 / EM before and after stage 3, the generator's EM reading the
gold memory).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))
from recipe_sweep import run_one  # noqa: E402
from sections import write_section  # noqa: E402

CONFIG = BENCHMARKS.parent / "jobs" / "configs" / "smollm2_135m.yaml"
ONE_GPU = [
    "model.dtype=bfloat16", "train.num_workers=1",
    "stage1.steps=800", "stage1.micro_batch_size_per_worker=32", "stage1.report_every=50",
    "stage3.steps=400", "stage3.micro_batch_size_per_worker=32", "stage3.report_every=50",
]
MARK_BEGIN, MARK_END = "<!-- benchmarks/real_lm_gpu.py begin -->", "<!-- benchmarks/real_lm_gpu.py end -->"


def _section(result: dict, device: str, command: str) -> str:
    before, after = result["before"], result["after"]
    stage3_and_eval = result["seconds"] - result["stage1_seconds"]
    return "\n".join([
        MARK_BEGIN,
        "## The real LM on one GPU (`benchmarks/real_lm_gpu.py`)",
        "",
        f"Command: `{command}` on {device}, {time.strftime('%Y-%m-%d')}, torch {torch.__version__}; one run, "
        f"`run.seed={result['config']['run']['seed']}`.",
        "",
        f"Stage 1 {result['stage1_seconds']:.0f} s; encoding, stage 3 and the evaluations {stage3_and_eval:.0f} s; "
        f"{result['seconds']:.0f} s in all. The generator reading each test question's gold memory: "
        f"EM {result['oracle_em']:.3f}.",
        "",
        "| query reasoner | Recall@1 | Recall@5 | EM |",
        "|---|---|---|---|",
        f"| before stage 3 | {before['recall@1']:.3f} | {before['recall@5']:.3f} | {before['em']:.3f} |",
        f"| after stage 3 | {after['recall@1']:.3f} | {after['recall@5']:.3f} | {after['em']:.3f} |",
        MARK_END,
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, after the one-GPU ones")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("real_lm_gpu.py: no CUDA device here (on a CPU, benchmarks/recipe_sweep.py one runs the same recipe)")
        return 2
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "run.json"
        run_one(argparse.Namespace(config=args.config, overrides=[*ONE_GPU, *args.overrides], out=str(out), threads=4,
                                   stage1_dir=None, save_stage1=None, eval_every=10**9))
        result = json.loads(out.read_text())
    device = torch.cuda.get_device_name()
    print(json.dumps({k: result[k] for k in ("before", "after", "oracle_em", "stage1_seconds", "seconds")} | {"device": device}))
    if not args.no_write:
        command = "python benchmarks/real_lm_gpu.py " + " ".join(sys.argv[1:])
        write_section(BENCHMARKS.parent / "BENCHMARKS.md", _section(result, device, command.strip()), MARK_BEGIN, MARK_END)
    return 0


if __name__ == "__main__":
    sys.exit(main())

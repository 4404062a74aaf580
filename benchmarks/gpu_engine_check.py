"""Stage-3 steps through the library's DeepSpeed updater in bf16 on this machine's GPU
(CPU if none), one process, the ZeRO stage given; no Ray, no FAISS: candidates come
from an exact search over 256 encoded trap-corpus documents. A check that the model,
the straight-through top-k, `stage3_step` and `DeepSpeedUpdater` run on CUDA in bf16:

    python benchmarks/gpu_engine_check.py runs/demo/models/stage1 --zero 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clara_ray.config import load_config  # noqa: E402
from clara_ray.data.lengths import choose_lengths  # noqa: E402
from clara_ray.data.trap import generate_trap_corpus  # noqa: E402
from clara_ray.modeling.checkpoint import load_model  # noqa: E402
from clara_ray.modeling.clara import Role  # noqa: E402
from clara_ray.modeling.text import document_input, tokenize_texts  # noqa: E402
from clara_ray.training.batches import stage3_batches  # noqa: E402
from clara_ray.training.examples import QuestionBatch  # noqa: E402
from clara_ray.training.candidates import ExactSearch  # noqa: E402
from clara_ray.training.engine import DeepSpeedUpdater, ParameterAnchor  # noqa: E402
from clara_ray.training.settings import Stage3Settings, WorkerSettings  # noqa: E402
from clara_ray.training.steps import stage3_step  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "tiny.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, help="a tiny-preset model directory (e.g. a demo's models/stage1)")
    parser.add_argument("--zero", type=int, default=2, choices=(0, 1, 2, 3))
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + args.zero), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    use_gpu = torch.cuda.is_available()
    config = load_config(CONFIG, [f"stage3.steps={args.steps}", "model.dtype=bfloat16", f"train.zero_stage={args.zero}",
                                  "stage3.anchor_weight=0", "stage3.retrieval_gain_start_fraction=0"])
    corpus = generate_trap_corpus(160, 0.5, 0)
    model, tokenizer, _ = load_model(args.model_dir)
    # The preset's token lengths are "auto": picked from this corpus as the demo picked them.
    config = config.with_lengths(choose_lengths(config.model, tokenizer, corpus.documents, corpus.train_qa,
                                                corpus.test_qa).lengths)
    settings, worker = Stage3Settings.from_config(config), WorkerSettings.from_config(config)
    model.set_trainable([Role.QUERY_REASONER], backbone=False)
    updater = DeepSpeedUpdater(model, settings.optimiser, settings.micro_batch_size, args.zero, use_gpu, bf16=True)
    device = updater.device
    documents = corpus.documents[:256]
    with torch.no_grad():
        docs = tokenize_texts(tokenizer, [document_input(d.text, d.title) for d in documents], worker.lengths.doc)
        memory, _ = updater.module.encode(Role.COMPRESSOR, docs.ids.to(device), docs.mask.to(device))
    source = ExactSearch([d.id for d in documents], memory.float().cpu().numpy())
    anchor = ParameterAnchor(updater.module, 0.0)
    losses, started = [], time.perf_counter()
    for step, batch in stage3_batches(QuestionBatch.from_qa(corpus.train_qa), settings.micro_batch_size, args.steps, 0):
        metrics = stage3_step(updater, tokenizer, batch, source, settings, worker.lengths, step, anchor)
        losses.append(round(metrics["loss"], 4))
    peak = torch.cuda.max_memory_allocated() / 2**20 if use_gpu else 0.0
    print(f"ZeRO-{args.zero} on {device}: memory {memory.dtype}, losses {losses}, "
          f"{(time.perf_counter() - started) / args.steps * 1000:.0f} ms/step (first steps included), "
          f"peak GPU memory {peak:.0f} MiB")
    if not np.isfinite(losses).all():
        raise SystemExit("non-finite loss")


if __name__ == "__main__":
    main()

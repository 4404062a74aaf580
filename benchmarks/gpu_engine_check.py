"""Ten stage-3 steps of the library's DeepSpeed engine in bf16 on this machine's GPU
(CPU if none), one process, the ZeRO stage given; no Ray, no FAISS (candidates are
drawn at random from 256 encoded trap-corpus documents). A check that the model,
the straight-through top-k and `clara_ray.training.engine` run on CUDA with bf16:

    python benchmarks/gpu_engine_check.py runs/demo/models/stage1 --zero 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clara_ray.data.trap import generate_trap_corpus  # noqa: E402
from clara_ray.modeling.checkpoint import load_model  # noqa: E402
from clara_ray.modeling.clara import Objective, Role  # noqa: E402
from clara_ray.modeling.text import tokenize_texts  # noqa: E402
from clara_ray.training import engine as ds  # noqa: E402
from clara_ray.training.batches import Lengths, stage3_batch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, help="a tiny-preset model directory (e.g. a demo's models/stage1)")
    parser.add_argument("--zero", type=int, default=2, choices=(0, 1, 2, 3))
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + args.zero), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    use_gpu = torch.cuda.is_available()
    lengths = Lengths(doc=32, question=32, answer=12, reconstruction=40)
    corpus = generate_trap_corpus(160, 0.5, 0)
    model, tokenizer, _ = load_model(args.model_dir)
    model.set_trainable([Role.QUERY_REASONER], backbone=False)
    config = ds.deepspeed_config(micro_batch_size=16, learning_rate=5e-4, total_steps=args.steps, warmup_steps=1,
                                 zero_stage=args.zero, gradient_clipping=1.0, bf16=True)
    engine = ds.initialize(model, config, use_gpu, gain_learning_rate=0.01)
    device = engine.device
    with torch.no_grad():
        docs = tokenize_texts(tokenizer, [d.text for d in corpus.documents[:256]], lengths.doc)
        memory, _ = engine.module.encode(Role.COMPRESSOR, docs.ids.to(device), docs.mask.to(device))
    losses = []
    started = time.perf_counter()
    for step in range(args.steps):
        rows = corpus.train_qa[step * 16 : (step + 1) * 16]
        batch = stage3_batch([x.question for x in rows], [x.answers[0] for x in rows], tokenizer, lengths)
        candidates = memory[torch.randint(0, memory.shape[0], (len(rows), 64), device=device)]
        out = engine(Objective.JOINT, **{k: v.to(device) for k, v in batch.items()},
                     candidate_memory=candidates, k=1, temperature=0.05)
        engine.backward(out["loss"])
        engine.step()
        losses.append(round(out["loss"].item(), 4))
    peak = torch.cuda.max_memory_allocated() / 2**20 if use_gpu else 0.0
    print(f"ZeRO-{args.zero} on {device}: memory {memory.dtype}, scores {out['scores'].dtype}, losses {losses}, "
          f"{(time.perf_counter() - started) / args.steps * 1000:.0f} ms/step (first steps included), "
          f"peak GPU memory {peak:.0f} MiB")
    if not all(torch.isfinite(torch.tensor(losses))):
        raise SystemExit("non-finite loss")


if __name__ == "__main__":
    main()

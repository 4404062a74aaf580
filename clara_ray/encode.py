"""Encode a corpus into memory shards with Ray Data and a compressor actor pool.

read (validated documents) -> map_batches(CompressorActor, actor pool) -> write_parquet
then manifest.json with the model fingerprint and counts (see memory_shards.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import torch

from clara_ray.data.formats import Document, QuarantinedRow, write_quarantine
from clara_ray.memory_shards import KEY_KIND_FLAT_MEMORY, memory_table, write_manifest


class CompressorActor:
    """Ray Data callable class: a batch of documents -> rows of the shard schema."""

    def __init__(self, model_dir: str, doc_max_len: int, dtype: str = "float32", num_threads: int = 1):
        from clara_ray.modeling.checkpoint import load_model

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(num_threads)
        model, self.tokenizer, _ = load_model(model_dir, dtype=getattr(torch, dtype))
        self.model = model.to(self.device).eval()
        self.doc_max_len = doc_max_len

    def __call__(self, batch: dict) -> pa.Table:
        from clara_ray.modeling.clara import Role
        from clara_ray.modeling.text import tokenize_texts

        texts = [str(t) for t in batch["text"]]
        tokens = tokenize_texts(self.tokenizer, texts, self.doc_max_len)
        with torch.inference_mode():
            memory, _ = self.model.encode(
                Role.COMPRESSOR, tokens.ids.to(self.device), tokens.mask.to(self.device)
            )  # (B, n_mem, d)
        lengths = np.asarray(tokens.lengths)
        return memory_table(
            batch["doc_id"],
            memory.float().cpu().numpy(),
            num_tokens=np.minimum(lengths, self.doc_max_len),
            truncated=lengths > self.doc_max_len,
        )


@dataclass(frozen=True)
class EncodeSummary:
    output_dir: str
    num_input_documents: int
    num_encoded: int
    num_quarantined: int
    num_truncated: int
    seconds: float

    @property
    def documents_per_second(self) -> float:
        return self.num_encoded / max(self.seconds, 1e-9)


def encode_documents(
    documents: list[Document],
    quarantined: list[QuarantinedRow],
    model_dir: str | Path,
    output_dir: str | Path,
    doc_max_len: int,
    batch_size: int,
    min_actors: int,
    max_actors: int,
    num_cpus_per_actor: float,
    num_gpus_per_actor: float,
    dtype: str = "float32",
) -> EncodeSummary:
    """Encode validated documents into memory shards under `output_dir`.

    `quarantined` are the corpus rows rejected on reading; they are written to
    quarantine.jsonl and counted so that input = encoded + quarantined.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"{output_dir} is not empty; choose a new output directory")
    model_manifest = json.loads((Path(model_dir) / "clara.json").read_text())
    started = time.perf_counter()
    rows = [{"doc_id": d.id, "text": d.text if d.title is None else f"{d.title}\n{d.text}"} for d in documents]
    dataset = ray.data.from_items(rows).map_batches(
        CompressorActor,
        fn_constructor_kwargs={
            "model_dir": str(model_dir),
            "doc_max_len": doc_max_len,
            "dtype": dtype,
            "num_threads": max(1, int(num_cpus_per_actor)),
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=min_actors, max_size=max_actors),
        num_cpus=num_cpus_per_actor,
        num_gpus=num_gpus_per_actor,
    )
    dataset.write_parquet(str(output_dir))
    seconds = time.perf_counter() - started
    write_quarantine(output_dir / "quarantine.jsonl", quarantined)
    manifest = write_manifest(
        output_dir,
        model_fingerprint=model_manifest["compressor_fingerprint"],
        num_memory_tokens=model_manifest["num_memory_tokens"],
        hidden_size=model_manifest["hidden_size"],
        memory_dtype="float16",
        key_kind=KEY_KIND_FLAT_MEMORY,
        key_dim=model_manifest["num_memory_tokens"] * model_manifest["hidden_size"],
        num_input_documents=len(documents) + len(quarantined),
        num_quarantined=len(quarantined),
        quarantine_file="quarantine.jsonl",
    )
    if manifest["num_encoded"] != len(documents):
        raise RuntimeError(
            f"encoded {manifest['num_encoded']} documents but {len(documents)} went in: shards are incomplete"
        )
    return EncodeSummary(str(output_dir), manifest["num_input_documents"], manifest["num_encoded"],
                         len(quarantined), manifest["num_truncated"], seconds)

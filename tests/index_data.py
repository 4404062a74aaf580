"""Memory-shard directories of clustered synthetic documents, for the index tests."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from clara_ray.index.synthetic import clustered_memory
from clara_ray.memory_shards import memory_table, write_manifest


def write_memory_shards(directory, count=600, n_mem=2, hidden=16, files=3, seed=0, fingerprint="fp0",
                        num_centres=40) -> tuple[list[str], np.ndarray]:
    """A finished memory-shard directory (the encoder's format) -> (doc ids, memory (N, n_mem, d) float16)."""
    directory.mkdir(parents=True, exist_ok=True)
    memory = clustered_memory(count, n_mem, hidden, num_centres, seed=seed)
    ids = [f"doc-{seed}-{i}" for i in range(count)]
    for part, rows in enumerate(np.array_split(np.arange(count), files)):
        table = memory_table([ids[i] for i in rows], memory[rows], num_tokens=[5] * len(rows),
                             truncated=[False] * len(rows))
        pq.write_table(table, directory / f"part-{part:05d}.parquet")
    write_manifest(directory, model_fingerprint=fingerprint, num_memory_tokens=n_mem, hidden_size=hidden,
                   memory_dtype="float16", key_kind="flat_memory", key_dim=n_mem * hidden,
                   num_input_documents=count, num_quarantined=0)
    return ids, memory


def exact_top(memory: np.ndarray, queries: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force cosine of flattened memory (float64): (B, count) rows and scores, best first."""
    keys = memory.reshape(len(memory), -1).astype(np.float64)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    q = queries.astype(np.float64) / np.linalg.norm(queries, axis=1, keepdims=True)
    scores = q @ keys.T  # (B, N)
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :count]
    return rows, np.take_along_axis(scores, rows, axis=1)

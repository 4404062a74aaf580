"""What the index searches on: the key derived from a document's memory vectors.

A document is n_mem memory vectors of width d; CLaRa's score is the cosine of the
flattened (n_mem * d) vectors of query and document. The key is what FAISS holds:

- ``KeyKind.FLAT_MEMORY``: the L2-normalised flattened memory (n_mem * d dims).
  Inner product on these keys *is* CLaRa's score, so a Flat index ranks exactly
  as the trainer does. Costs n_mem * d * 4 bytes per document in a Flat index
  (128 KiB for Mistral-7B's 8 x 4096): the 1.4 TB problem at 21M passages.
- ``KeyKind.MEAN_POOLED``: the L2-normalised mean over the memory tokens (d dims),
  n_mem times smaller and faster to search, but only an approximation of the
  score: documents whose tokens point different ways look alike once averaged.

Compression is the index's business, not the key's: a factory with PQ
(``"IVF4096,PQ64"``, ``"IVF4096,PQ96x4fs,RFlat"``) stores either key in a few
dozen bytes. Whichever key and factory, the index only *proposes* L candidates;
the trainer re-scores those L exactly on their full memory vectors, so an
approximate key costs recall of the candidate list, never a wrong score.
benchmarks/index.py measures the trade-off (BENCHMARKS.md, "Key choices"). On
100k clustered documents of 8 x 512 memory, re-scoring L=512 candidates found
the exact top-10 with every key; with L=64 it found 0.47 of it from 186-byte PQ
keys and 0.53 from the 512-dim pooled key, against 16 KiB per flattened key:
a cheaper key needs a larger L.

Queries arrive as the query reasoner's flattened memory (B, n_mem * d), the same
for every key kind; ``query_keys`` turns them into the key the index holds.
"""

from __future__ import annotations

import enum

import numpy as np


class KeyKind(str, enum.Enum):
    FLAT_MEMORY = "flat_memory"
    MEAN_POOLED = "mean_pooled"


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """(N, D) -> float32 rows of unit L2 norm (zero rows stay zero)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)  # (N, 1)
    return vectors / np.maximum(norms, 1e-12)


def key_dim(kind: KeyKind, num_memory_tokens: int, hidden_size: int) -> int:
    return num_memory_tokens * hidden_size if kind is KeyKind.FLAT_MEMORY else hidden_size


def memory_keys(memory: np.ndarray, kind: KeyKind) -> np.ndarray:
    """memory (N, n_mem, d) -> keys (N, key_dim) float32, unit norm."""
    if memory.ndim != 3:
        raise ValueError(f"memory must be (documents, memory tokens, hidden), got shape {memory.shape}")
    count, num_memory_tokens, hidden = memory.shape
    if kind is KeyKind.FLAT_MEMORY:
        return normalize_rows(memory.reshape(count, num_memory_tokens * hidden))
    # Mean in float32: fp16 sums of 8+ tokens lose the low bits the ranking needs.
    return normalize_rows(memory.astype(np.float32).mean(axis=1))  # (N, d)


def query_keys(queries: np.ndarray, kind: KeyKind, num_memory_tokens: int, hidden_size: int) -> np.ndarray:
    """Flattened query memory (B, n_mem * d) -> keys (B, key_dim) float32, unit norm."""
    width = num_memory_tokens * hidden_size
    if queries.ndim != 2 or queries.shape[1] != width:
        raise ValueError(
            f"queries must be the flattened query memory, (batch, {num_memory_tokens} x {hidden_size} = {width}), "
            f"got shape {queries.shape}"
        )
    return memory_keys(queries.reshape(len(queries), num_memory_tokens, hidden_size), kind)

"""One FAISS index over memory-shard keys, with the documents' memory vectors.

Plain Python (no Ray). A search returns, for each query, the ids and scores of
its top-L documents *and* their full memory vectors, so the trainer can re-score
the L candidates exactly with the current query reasoner.

Keys are L2-normalised and searched by inner product, so a Flat index gives the
exact cosine ranking of CLaRa's score. Memory vectors stay in one fp16 array
loaded from the shards (the scale issue replaces this with a memory-mapped file).
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np


@dataclass(frozen=True)
class SearchResult:
    doc_ids: np.ndarray  # (B, L) object array of str
    scores: np.ndarray  # (B, L) float32, descending
    memory: np.ndarray  # (B, L, n_mem, d) float16


class IndexShard:
    def __init__(self, doc_ids: list[str], keys: np.ndarray, memory: np.ndarray, factory: str = "Flat"):
        """keys: (N, key_dim) float; memory: (N, n_mem, d) float16."""
        if not (len(doc_ids) == keys.shape[0] == memory.shape[0]):
            raise ValueError(
                f"doc_ids, keys and memory disagree on the number of documents: "
                f"{len(doc_ids)}, {keys.shape[0]}, {memory.shape[0]}"
            )
        if len(doc_ids) == 0:
            raise ValueError("cannot build an index over zero documents")
        keys = np.ascontiguousarray(keys, dtype=np.float32)
        faiss.normalize_L2(keys)
        self.index = faiss.index_factory(keys.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        if not self.index.is_trained:
            self.index.train(keys)
        self.index.add(keys)
        self.doc_ids = np.asarray(doc_ids, dtype=object)
        self.memory = memory
        self.key_dim = keys.shape[1]

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, queries: np.ndarray, num_candidates: int) -> SearchResult:
        """queries: (B, key_dim) -> the top-`num_candidates` documents of each."""
        if queries.ndim != 2 or queries.shape[1] != self.key_dim:
            raise ValueError(f"queries must be (batch, {self.key_dim}), got {queries.shape}")
        if not 1 <= num_candidates <= len(self):
            raise ValueError(f"num_candidates must be in [1, {len(self)}], got {num_candidates}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        faiss.normalize_L2(queries)
        scores, rows = self.index.search(queries, num_candidates)  # (B, L) each
        if (rows < 0).any():
            raise RuntimeError("the index returned fewer candidates than asked for")
        return SearchResult(self.doc_ids[rows], scores, self.memory[rows])

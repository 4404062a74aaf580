"""One FAISS index shard: keys in FAISS, doc ids and memory vectors memory-mapped on disk.

Plain Python (no Ray). A search returns, for each query, the ids and scores of
its top-L documents *and* their full memory vectors, so the trainer can re-score
the L candidates exactly with the current query reasoner.

Keys (see keys.py) are L2-normalised and searched by inner product, so a Flat
index over ``KeyKind.FLAT_MEMORY`` keys gives CLaRa's exact cosine ranking. Any
``faiss.index_factory`` string works: "Flat", "IVF4096,PQ64",
"IVF4096,PQ96x4fs,RFlat", "HNSW32", ...

On disk a shard is one directory (written by ``save``, read by ``load``):
    index.faiss   the FAISS index (``faiss.write_index``; always the CPU form)
    doc_ids.npy   (N,) fixed-width unicode, row r of the index is doc_ids[r]
    memory.npy    (N, n_mem, d) float16, opened with mmap_mode="r": the shard's
                  memory vectors stay on disk and only the rows a search returns
                  are read (the OS page cache keeps the hot ones)
    shard.json    {key_kind, num_documents, num_memory_tokens, hidden_size, factory}
A search is two steps so a sharded index can merge before it reads memory:
``search_rows`` (scores and row numbers) then ``fetch`` (ids and memory of rows);
``search`` does both for a single shard.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from clara_ray.index.device import IndexDevice, resolve_device
from clara_ray.index.keys import KeyKind, memory_keys, query_keys
from clara_ray.training.candidates import SearchResult

INDEX_FILE, DOC_IDS_FILE, MEMORY_FILE, SHARD_FILE = "index.faiss", "doc_ids.npy", "memory.npy", "shard.json"


@dataclass(frozen=True)
class SearchParams:
    """Speed/recall knobs applied to the factory parts that have them (others ignore them)."""

    nprobe: int = 32  # IVF: inverted lists visited per query
    ef_search: int = 128  # HNSW: candidate-list size of the graph search
    refine_k_factor: float = 4.0  # RFlat/Refine: re-rank k_factor * L candidates exactly


def _layers(index: faiss.Index):
    """The index and the indexes it wraps (refine -> base, pre-transform -> inner)."""
    index = faiss.downcast_index(index)
    while True:
        yield index
        if isinstance(index, faiss.IndexRefine):
            index = faiss.downcast_index(index.base_index)
        elif isinstance(index, faiss.IndexPreTransform):
            index = faiss.downcast_index(index.index)
        else:
            return


def apply_search_params(index: faiss.Index, params: SearchParams) -> None:
    for layer in _layers(index):
        if isinstance(layer, faiss.IndexRefine):
            layer.k_factor = float(params.refine_k_factor)
        if isinstance(layer, faiss.IndexHNSW):
            layer.hnsw.efSearch = int(params.ef_search)
        ivf = faiss.try_extract_index_ivf(layer)
        if ivf is not None:
            ivf.nprobe = int(params.nprobe)


def search_index(index: faiss.Index, keys: np.ndarray, k: int, params: SearchParams) -> tuple[np.ndarray, np.ndarray]:
    """index.search with HNSW's efSearch raised to k for this call: a graph search
    keeps only efSearch candidates, so a smaller one returns fewer than k (-1 rows)."""
    hnsw = [layer.hnsw for layer in _layers(index) if isinstance(layer, faiss.IndexHNSW)]
    for graph in hnsw:
        graph.efSearch = max(int(params.ef_search), k)
    return index.search(keys, k)


def check_factory(factory: str, dim: int) -> None:
    """Fail before any work if FAISS cannot build `factory` over `dim`-dim keys."""
    try:
        faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else repr(error)
        raise ValueError(
            f"index.factory={factory!r} is not a FAISS index over {dim}-dim keys: {first_line} "
            "(e.g. PQ<m> needs m to divide the key dimension; see faiss.index_factory)"
        ) from error


def train_and_add(keys: np.ndarray, factory: str, max_training_keys: int, seed: int = 0) -> faiss.Index:
    """Build a CPU index over unit-norm keys (N, D); train on at most `max_training_keys` of them."""
    check_factory(factory, keys.shape[1])
    index = faiss.index_factory(keys.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        sample = keys
        if len(keys) > max_training_keys:
            rows = np.sort(np.random.default_rng(seed).choice(len(keys), max_training_keys, replace=False))
            sample = keys[rows]
        index.train(sample)
    index.add(keys)
    return index


class IndexShard:
    def __init__(
        self,
        index: faiss.Index,
        doc_ids: np.ndarray,
        memory: np.ndarray,
        key_kind: KeyKind = KeyKind.FLAT_MEMORY,
        device: IndexDevice = IndexDevice.CPU,
        params: SearchParams = SearchParams(),
        factory: str = "",
    ):
        """index: a CPU index over N keys; doc_ids (N,); memory (N, n_mem, d) float16 (may be a memmap)."""
        if not (index.ntotal == len(doc_ids) == memory.shape[0]):
            raise ValueError(
                f"index, doc_ids and memory disagree on the number of documents: "
                f"{index.ntotal}, {len(doc_ids)}, {memory.shape[0]}"
            )
        if index.ntotal == 0:
            raise ValueError("cannot serve an index over zero documents")
        self.key_kind = KeyKind(key_kind)
        self.factory = factory
        self.doc_ids = doc_ids
        self.memory = memory
        self.num_memory_tokens, self.hidden_size = memory.shape[1], memory.shape[2]
        self.key_dim = index.d
        apply_search_params(index, params)
        self.params = params
        self.cpu_index = index
        self.device = resolve_device(device, faiss)
        self.index = index
        if self.device is IndexDevice.GPU:
            self.index = self._to_gpu(index, strict=IndexDevice(device) is IndexDevice.GPU)

    def _to_gpu(self, index: faiss.Index, strict: bool) -> faiss.Index:
        self._gpu_resources = faiss.StandardGpuResources()  # must outlive the GPU index
        try:
            return faiss.index_cpu_to_gpu(self._gpu_resources, 0, index)
        except RuntimeError as error:  # e.g. HNSW, which FAISS has no GPU version of
            if strict:
                raise RuntimeError(f"FAISS cannot move index {self.factory!r} to the GPU: {error}") from error
            self.device = IndexDevice.CPU
            return index

    @classmethod
    def build(
        cls,
        doc_ids,
        memory: np.ndarray,
        factory: str = "Flat",
        key_kind: KeyKind = KeyKind.FLAT_MEMORY,
        keys: np.ndarray | None = None,
        device: IndexDevice = IndexDevice.CPU,
        params: SearchParams = SearchParams(),
        max_training_keys: int = 65536,
    ) -> IndexShard:
        """A shard over in-memory (or memory-mapped) memory vectors (N, n_mem, d).
        `keys` (N, key_dim) defaults to ``memory_keys(memory, key_kind)``."""
        keys = memory_keys(memory, key_kind) if keys is None else np.ascontiguousarray(keys, dtype=np.float32)
        if len(keys) != memory.shape[0]:
            raise ValueError(f"{len(keys)} keys for {memory.shape[0]} documents")
        index = train_and_add(keys, factory, max_training_keys)
        return cls(index, np.asarray(doc_ids, dtype=str), memory, key_kind, device, params, factory)

    def save(self, directory: str | Path) -> None:
        """Write the shard's files (memory.npy only when memory is not already that file)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.cpu_index, str(directory / INDEX_FILE))
        np.save(directory / DOC_IDS_FILE, np.asarray(self.doc_ids, dtype=str))
        memory_path = directory / MEMORY_FILE
        if not (isinstance(self.memory, np.memmap) and Path(self.memory.filename) == memory_path.resolve()):
            np.save(memory_path, np.asarray(self.memory, dtype=np.float16))
        meta = {
            "key_kind": self.key_kind.value,
            "num_documents": len(self),
            "num_memory_tokens": self.num_memory_tokens,
            "hidden_size": self.hidden_size,
            "factory": self.factory,
        }
        (directory / SHARD_FILE).write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(
        cls, directory: str | Path, device: IndexDevice = IndexDevice.CPU, params: SearchParams = SearchParams()
    ) -> IndexShard:
        directory = Path(directory)
        missing = [name for name in (INDEX_FILE, DOC_IDS_FILE, MEMORY_FILE, SHARD_FILE) if not (directory / name).exists()]
        if missing:
            raise FileNotFoundError(f"index shard {directory} lacks {missing}: not a complete shard directory")
        meta = json.loads((directory / SHARD_FILE).read_text())
        index = faiss.read_index(str(directory / INDEX_FILE))
        doc_ids = np.load(directory / DOC_IDS_FILE, mmap_mode="r")
        memory = np.load(directory / MEMORY_FILE, mmap_mode="r")  # (N, n_mem, d) float16, stays on disk
        return cls(index, doc_ids, memory, KeyKind(meta["key_kind"]), device, params, meta["factory"])

    def __len__(self) -> int:
        return self.index.ntotal

    def search_rows(self, queries: np.ndarray, num_candidates: int) -> tuple[np.ndarray, np.ndarray]:
        """Flattened query memory (B, n_mem * d) -> scores (B, L) float32 descending and
        rows (B, L) int64 of this shard, L = min(num_candidates, len(self))."""
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
        keys = query_keys(queries, self.key_kind, self.num_memory_tokens, self.hidden_size)  # (B, key_dim)
        scores, rows = search_index(self.index, keys, min(num_candidates, len(self)), self.params)  # (B, L) each
        if (rows < 0).any():
            # IVF with too small an nprobe, or HNSW with too small an efSearch, can find fewer than L.
            raise RuntimeError(
                f"index {self.factory!r} returned fewer than {rows.shape[1]} candidates for some queries: "
                "raise index.nprobe / index.ef_search or lower the number of candidates"
            )
        return scores, rows

    def fetch(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """rows (...) int64 -> doc ids (...) object and memory (..., n_mem, d) float16."""
        rows = np.asarray(rows, dtype=np.int64)
        # Read each distinct row once, in file order: memory-mapped reads stay sequential-ish.
        unique, inverse = np.unique(rows, return_inverse=True)
        memory = np.asarray(self.memory[unique])[inverse.reshape(rows.shape)]  # (..., n_mem, d)
        doc_ids = np.asarray(self.doc_ids[unique]).astype(object)[inverse.reshape(rows.shape)]
        return doc_ids, memory

    def search(self, queries: np.ndarray, num_candidates: int) -> SearchResult:
        """Flattened query memory (B, n_mem * d) -> the top-`num_candidates` documents of each."""
        if num_candidates > len(self):
            raise ValueError(f"num_candidates must be in [1, {len(self)}], got {num_candidates}")
        scores, rows = self.search_rows(queries, num_candidates)
        doc_ids, memory = self.fetch(rows)
        return SearchResult(doc_ids, scores, memory)


def merge_shard_results(scores: list[np.ndarray], rows: list[np.ndarray], first_rows, num_candidates: int):
    """Per-shard (B, L_i) scores (descending) and local rows -> the exact global top-L:
    scores (B, L) float32 and global rows (B, L) int64."""
    batch = scores[0].shape[0]
    padded_scores = np.full((len(scores), batch, num_candidates), -np.inf, dtype=np.float32)  # (S, B, L)
    padded_rows = np.full((len(scores), batch, num_candidates), -1, dtype=np.int64)
    for i, (shard_scores, shard_rows) in enumerate(zip(scores, rows)):
        width = shard_scores.shape[1]  # a shard smaller than L returns all its rows
        padded_scores[i, :, :width] = shard_scores
        padded_rows[i, :, :width] = shard_rows + first_rows[i]
    merged_scores, merged_rows = faiss.merge_knn_results(padded_scores, padded_rows, keep_max=True)
    return merged_scores, merged_rows

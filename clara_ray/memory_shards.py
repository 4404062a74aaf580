"""Memory shards: the on-disk contract between corpus encoding and the index.

A memory-shard directory (written by ``clara_ray.encode.encode_corpus``) holds
    *.parquet      one row per encoded document:
                     doc_id      string
                     memory      fixed_size_list<halffloat>[n_mem * hidden]  (row-major n_mem x hidden)
                     key         fixed_size_list<float>[key_dim]   retrieval key (see key_kind)
                     num_tokens  int32  document tokens fed to the compressor
                     truncated   bool   the document was cut at doc_max_len
                     row_key     string "source:row_number.j": where the document came from
    manifest.json  written last, so its presence marks a complete directory:
                   {format_version, model_fingerprint, num_memory_tokens, hidden_size,
                    memory_dtype, key_kind, key_dim, shards: [{file, rows}], inputs,
                    num_input_documents, num_encoded, num_quarantined, quarantined_by_kind,
                    quarantine_dir, num_truncated, num_tokens}
                   with num_input_documents = num_encoded + num_quarantined.
    quarantine/*.json  JSON Lines of the rows set aside: row_key, source, row_number,
                   reason_kind, reason, raw (absent when nothing was set aside)
    summary.json   the run's counts and timings (``EncodeSummary``)
    compressor_fingerprint.txt  written first: which compressor an unfinished run used
Beside it, ``<dir>.checkpoint/`` holds Ray Data's resume state while a run is
unfinished (deleted when the write completes).

key_kind "flat_memory": the L2-normalised flattened memory, so inner product on
keys equals CLaRa's cosine score exactly.
Plain pyarrow/numpy; Ray is not needed to read or write the format.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
KEY_KIND_FLAT_MEMORY = "flat_memory"


def memory_table(doc_ids, memory: np.ndarray, num_tokens, truncated, row_keys=None) -> pa.Table:
    """Rows of the shard schema from (N, n_mem, d) memory vectors (``row_key``
    column only when ``row_keys`` is given)."""
    count, num_memory_tokens, hidden = memory.shape
    flat = memory.reshape(count, num_memory_tokens * hidden)
    keys = flat.astype(np.float32)
    keys /= np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), 1e-12)
    provenance = {} if row_keys is None else {"row_key": pa.array(list(row_keys), pa.string())}
    return pa.table(
        {
            "doc_id": pa.array(list(doc_ids), pa.string()),
            "memory": pa.FixedSizeListArray.from_arrays(
                pa.array(flat.astype(np.float16).ravel(), pa.float16()), num_memory_tokens * hidden
            ),
            "key": pa.FixedSizeListArray.from_arrays(pa.array(keys.ravel(), pa.float32()), keys.shape[1]),
            "num_tokens": pa.array(np.asarray(num_tokens, dtype=np.int32)),
            "truncated": pa.array(np.asarray(truncated, dtype=bool)),
            **provenance,
        }
    )


@dataclass(frozen=True)
class MemoryShards:
    doc_ids: list[str]
    memory: np.ndarray  # (N, n_mem, d) float16
    keys: np.ndarray  # (N, key_dim) float32
    manifest: dict


def _fixed_size_to_numpy(column: pa.ChunkedArray, width: int, dtype) -> np.ndarray:
    values = [chunk.flatten().to_numpy(zero_copy_only=False) for chunk in column.chunks]
    flat = np.concatenate(values) if values else np.zeros(0, dtype)
    return flat.astype(dtype, copy=False).reshape(-1, width)


def write_manifest(directory: str | Path, files: Sequence[Path] | None = None, check=None, **fields) -> dict:
    """Write manifest.json listing `files` (default: every parquet file in
    `directory`, for a directory written in one go) with their row, token and
    truncation counts. `check(manifest)` may raise to refuse writing it; the
    file is renamed into place, so a reader never sees half a manifest."""
    directory = Path(directory)
    shards, num_truncated, num_tokens = [], 0, 0
    for path in sorted(directory.glob("*.parquet") if files is None else files):
        table = pq.read_table(path, columns=["truncated", "num_tokens"])
        shards.append({"file": path.name, "rows": table.num_rows})
        num_truncated += int(pc.sum(table.column("truncated")).as_py() or 0)
        num_tokens += int(pc.sum(table.column("num_tokens")).as_py() or 0)
    manifest = {"format_version": FORMAT_VERSION, **fields, "shards": shards}
    manifest["num_encoded"] = sum(s["rows"] for s in shards)
    manifest["num_truncated"] = num_truncated
    manifest["num_tokens"] = num_tokens
    if check is not None:
        check(manifest)
    partial = directory / f"{MANIFEST}.partial"
    partial.write_text(json.dumps(manifest, indent=2))
    partial.replace(directory / MANIFEST)
    return manifest


def read_memory_shards(directory: str | Path) -> MemoryShards:
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.exists():
        raise FileNotFoundError(f"{directory} has no {MANIFEST}: not a finished memory-shard directory")
    manifest = json.loads(manifest_path.read_text())
    tables = [pq.read_table(directory / shard["file"]) for shard in manifest["shards"]]
    table = pa.concat_tables(tables) if tables else None
    if table is None or table.num_rows != manifest["num_encoded"]:
        raise ValueError(f"{directory}: shard rows do not match the manifest's num_encoded")
    n_mem, hidden = manifest["num_memory_tokens"], manifest["hidden_size"]
    memory = _fixed_size_to_numpy(table.column("memory"), n_mem * hidden, np.float16).reshape(-1, n_mem, hidden)
    keys = _fixed_size_to_numpy(table.column("key"), manifest["key_dim"], np.float32)
    return MemoryShards(table.column("doc_id").to_pylist(), memory, keys, manifest)

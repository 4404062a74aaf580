"""Index versions on disk: build a new one beside the live one, swap atomically, keep the last few.

Plain Python (no Ray). Layout of an index root directory:

    <index_root>/
      CURRENT                 one line, "v<step>": the live version. Replaced with
                              os.replace, so a reader sees the old or the new name,
                              never a torn one.
      v<step>/                a finished version; it only ever appears complete
                              (built as v<step>.building/, renamed when done)
        manifest.json         {format_version, version, step, factory, key_kind,
                               num_shards, num_documents, key_dim, num_memory_tokens,
                               hidden_size, max_training_keys, build_seconds, created_at,
                               source: {memory_dir, model_fingerprint, num_encoded},
                               shards: [{dir, rows, first_row}]}
        shard-00000/ ...      one IndexShard directory per shard (see shard.py):
                              index.faiss, doc_ids.npy, memory.npy (memory-mapped), shard.json
      v<step>.building/       a build in progress, or the remains of one that crashed or
                              was killed: never read, removed when the next build starts

<step> is the training step whose compressor encoded the memory shards (0 for the
index built before training). Documents are split into ``num_shards`` contiguous
row ranges of the memory-shard directory, in its manifest's file order.

Refresh = ``build_version`` (the live version keeps serving meanwhile) then
``publish`` (the atomic swap of CURRENT) then ``prune_versions`` (keep the newest
``keep`` finished versions, and always the live one). A build that raises or is
killed leaves CURRENT, and so the live version, untouched. Resume: a finished
``v<step>`` is reused by ``find_version`` when its source and settings match.

A build holds one shard's keys in RAM at a time (rows x key_dim float32); memory
vectors stream from Parquet straight into the shard's memory.npy.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from clara_ray.index.device import IndexDevice
from clara_ray.index.keys import KeyKind, key_dim, memory_keys
from clara_ray.index.shard import (
    MEMORY_FILE,
    IndexShard,
    SearchParams,
    check_factory,
    train_and_add,
)
from clara_ray.memory_shards import MANIFEST
from clara_ray.placement import Scheduling

FORMAT_VERSION = 1
CURRENT = "CURRENT"
BUILDING_SUFFIX = ".building"
_VERSION_NAME = re.compile(r"^v(\d+)$")


@dataclass(frozen=True)
class IndexSettings:
    """Plain settings of the index (built from ``config.index`` at the edge, see ``from_config``)."""

    factory: str = "Flat"
    key_kind: KeyKind = KeyKind.FLAT_MEMORY
    num_shards: int = 1
    device: IndexDevice = IndexDevice.AUTO
    search: SearchParams = field(default_factory=SearchParams)
    max_training_keys: int = 65536
    keep_versions: int = 2
    num_cpus_per_shard: float = 1
    num_gpus_per_shard: float = 0
    max_restarts: int = 3  # per shard actor
    search_attempts: int = 3  # whole fan-out searches tried before a search raises
    # Custom resources and scheduling of each shard actor (clara_ray/placement.py).
    resources_per_shard: Mapping[str, float] = field(default_factory=dict)
    scheduling: Scheduling = Scheduling.DEFAULT

    @classmethod
    def from_config(cls, index_config) -> IndexSettings:
        """From a ``clara_ray.config.IndexConfig`` (its fields are validated at load time)."""
        c = index_config
        return cls(
            factory=c.factory, key_kind=c.key_kind, num_shards=c.num_shards, device=c.device,
            search=SearchParams(c.nprobe, c.ef_search, c.refine_k_factor), max_training_keys=c.max_training_keys,
            keep_versions=c.keep_versions, num_cpus_per_shard=c.num_cpus_per_shard,
            num_gpus_per_shard=c.num_gpus_per_shard, max_restarts=c.max_restarts, search_attempts=c.search_attempts,
            resources_per_shard=c.resources_per_shard, scheduling=c.scheduling,
        )


def version_name(step: int) -> str:
    return f"v{step}"


def version_step(path: str | Path) -> int:
    match = _VERSION_NAME.match(Path(path).name)
    if not match:
        raise ValueError(f"{path} is not a version directory (v<step>)")
    return int(match.group(1))


def read_version_manifest(version_dir: str | Path) -> dict:
    path = Path(version_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{version_dir} has no {MANIFEST}: not a finished index version")
    return json.loads(path.read_text())


def list_versions(index_root: str | Path) -> list[Path]:
    """Finished versions (those with a manifest), oldest step first."""
    root = Path(index_root)
    if not root.exists():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _VERSION_NAME.match(p.name) and (p / MANIFEST).exists()]
    return sorted(found, key=version_step)


def current_version(index_root: str | Path) -> Path | None:
    """The live version directory, or None before the first publish."""
    pointer = Path(index_root) / CURRENT
    if not pointer.exists():
        return None
    version = Path(index_root) / pointer.read_text().strip()
    read_version_manifest(version)  # CURRENT only ever names a finished version; check anyway
    return version


def publish(version_dir: str | Path) -> None:
    """Make `version_dir` the live version: an atomic replace of CURRENT."""
    version_dir = Path(version_dir)
    read_version_manifest(version_dir)
    partial = version_dir.parent / f"{CURRENT}.partial"
    with open(partial, "w") as out:
        out.write(version_dir.name + "\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, version_dir.parent / CURRENT)


def prune_versions(index_root: str | Path, keep: int) -> list[Path]:
    """Delete finished versions but the newest `keep` and the live one; returns those deleted."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    live = current_version(index_root)
    versions = list_versions(index_root)
    doomed = [v for v in versions[:-keep] if live is None or v.resolve() != live.resolve()]
    for version in doomed:
        shutil.rmtree(version)
    return doomed


def _source(memory_dir: Path, manifest: dict) -> dict:
    return {
        "memory_dir": str(memory_dir.resolve()),
        "model_fingerprint": manifest.get("model_fingerprint"),
        "num_encoded": manifest["num_encoded"],
    }


def find_version(index_root: str | Path, memory_dir: str | Path, settings: IndexSettings) -> Path | None:
    """The newest finished version built from this memory-shard directory with these settings."""
    memory_dir = Path(memory_dir)
    source = _source(memory_dir, json.loads((memory_dir / MANIFEST).read_text()))
    wanted = {"factory": settings.factory, "key_kind": settings.key_kind.value, "num_shards": settings.num_shards}
    for version in reversed(list_versions(index_root)):
        manifest = read_version_manifest(version)
        if manifest["source"] == source and all(manifest[k] == v for k, v in wanted.items()):
            return version
    return None


def _row_chunks(memory_dir: Path, manifest: dict, start: int, stop: int, with_keys: bool) -> Iterator[tuple]:
    """(doc_ids, memory (b, n_mem, d) float16, keys (b, key_dim) | None) for rows [start, stop)."""
    n_mem, hidden = manifest["num_memory_tokens"], manifest["hidden_size"]
    columns = ["doc_id", "memory"] + (["key"] if with_keys else [])
    first = 0
    for shard in manifest["shards"]:
        file_start, first = first, first + shard["rows"]
        if first <= start or file_start >= stop:
            continue
        row = file_start
        for batch in pq.ParquetFile(memory_dir / shard["file"]).iter_batches(batch_size=4096, columns=columns):
            lo, hi = max(start - row, 0), min(stop - row, batch.num_rows)
            row += batch.num_rows
            if lo >= hi:
                continue
            batch = batch.slice(lo, hi - lo)
            memory = batch.column("memory").flatten().to_numpy(zero_copy_only=False).astype(np.float16, copy=False)
            keys = None
            if with_keys:
                keys = batch.column("key").flatten().to_numpy(zero_copy_only=False).reshape(batch.num_rows, -1)
            yield batch.column("doc_id").to_pylist(), memory.reshape(batch.num_rows, n_mem, hidden), keys


def _build_shard(memory_dir: Path, manifest: dict, start: int, stop: int, out: Path, settings: IndexSettings) -> None:
    out.mkdir(parents=True)
    n_mem, hidden = manifest["num_memory_tokens"], manifest["hidden_size"]
    # The encoder's stored key is the flattened memory normalised before the fp16 cast: use it when it is ours.
    stored_keys = settings.key_kind.value == manifest.get("key_kind")
    memory = np.lib.format.open_memmap(out / MEMORY_FILE, mode="w+", dtype=np.float16, shape=(stop - start, n_mem, hidden))
    doc_ids, keys, row = [], [], 0
    for ids, chunk, chunk_keys in _row_chunks(memory_dir, manifest, start, stop, stored_keys):
        memory[row : row + len(ids)] = chunk
        keys.append(chunk_keys if stored_keys else memory_keys(chunk, settings.key_kind))
        doc_ids.extend(ids)
        row += len(ids)
    if row != stop - start:
        raise ValueError(f"{memory_dir}: expected rows [{start}, {stop}) but read {row}; the shards and manifest disagree")
    memory.flush()
    index = train_and_add(np.concatenate(keys), settings.factory, settings.max_training_keys)
    IndexShard(index, np.asarray(doc_ids, dtype=str), memory, settings.key_kind, IndexDevice.CPU, settings.search,
               settings.factory).save(out)


def build_version(
    memory_dir: str | Path,
    index_root: str | Path,
    step: int,
    settings: IndexSettings,
    on_shard_built: Callable[[int], None] | None = None,
) -> Path:
    """Build v<step> from a finished memory-shard directory; returns its path. Does not publish it.
    `on_shard_built(i)` is called after shard i is on disk (progress)."""
    started = time.time()
    memory_dir, root = Path(memory_dir), Path(index_root)
    manifest_path = memory_dir / MANIFEST
    if not manifest_path.exists():
        raise FileNotFoundError(f"{memory_dir} has no {MANIFEST}: not a finished memory-shard directory")
    manifest = json.loads(manifest_path.read_text())
    final = root / version_name(step)
    if final.exists():
        raise FileExistsError(f"index version {final} already exists: build under a new step")
    num_documents = manifest["num_encoded"]
    if not 1 <= settings.num_shards <= num_documents:
        raise ValueError(f"index.num_shards={settings.num_shards} must be in [1, {num_documents}] (documents in {memory_dir})")
    dim = key_dim(settings.key_kind, manifest["num_memory_tokens"], manifest["hidden_size"])
    check_factory(settings.factory, dim)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"v*{BUILDING_SUFFIX}"):
        shutil.rmtree(stale)
    building = root / (final.name + BUILDING_SUFFIX)
    building.mkdir()
    bounds = np.linspace(0, num_documents, settings.num_shards + 1).astype(int)
    shards = []
    for i, (start, stop) in enumerate(itertools.pairwise(bounds)):
        _build_shard(memory_dir, manifest, int(start), int(stop), building / f"shard-{i:05d}", settings)
        shards.append({"dir": f"shard-{i:05d}", "rows": int(stop - start), "first_row": int(start)})
        if on_shard_built is not None:
            on_shard_built(i)
    version_manifest = {
        "format_version": FORMAT_VERSION, "version": final.name, "step": step, "factory": settings.factory,
        "key_kind": settings.key_kind.value, "num_shards": settings.num_shards, "num_documents": num_documents,
        "key_dim": dim, "num_memory_tokens": manifest["num_memory_tokens"], "hidden_size": manifest["hidden_size"],
        "max_training_keys": settings.max_training_keys, "build_seconds": round(time.time() - started, 3),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": _source(memory_dir, manifest), "shards": shards,
    }
    (building / MANIFEST).write_text(json.dumps(version_manifest, indent=2))
    os.replace(building, final)  # the version appears whole or not at all
    return final


def refresh(memory_dir: str | Path, index_root: str | Path, step: int, settings: IndexSettings) -> Path:
    """Build, publish and prune in one call (no serving: the Ray router does the same around its actors)."""
    version = build_version(memory_dir, index_root, step, settings)
    publish(version)
    prune_versions(index_root, settings.keep_versions)
    return version

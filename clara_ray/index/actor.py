"""The sharded index on Ray: N shard actors behind one named router actor.

Training workers find the router by name and call ``search.remote(queries, L)``
every step, as with a single index; the reply (a ``SearchResult``) carries the
candidates' memory vectors, so workers never read shards.

    router (named, 0 CPUs, threaded) ── search: fan out to every shard actor
      ├─ shard actor 0: IndexShard.load(v<step>/shard-00000)   (CPU/GPU from settings)
      ├─ shard actor 1: ...
      └─ ...

A search is two rounds: every shard returns its top-L scores and rows, the router
merges them exactly (``faiss.merge_knn_results``: with Flat shards the result is
the one a single Flat index over everything gives), then only the shards that
own a winner are asked for those rows' ids and memory vectors.

Faults: a shard actor that dies is restarted by Ray (``max_restarts``) and
reloads its shard from disk; the task in flight is retried by Ray
(``max_task_retries``), and the router retries the whole search
(``search_attempts``) before it raises ``IndexSearchError``. A search never
returns a partial result: it covers every shard or raises.

Refresh (``refresh.remote(memory_dir, step)``, asynchronous for the caller; stage 3's
``clara_ray.index.refresh.RefreshScheduler`` calls it with freshly encoded shards):
build v<step> in a Ray task while the live version serves, start its shard
actors, publish it (atomic swap of CURRENT), route new searches to it, stop the
old actors once their in-flight searches finish, prune old versions. A build or
start that fails leaves the live version serving. See versions.py for the layout.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import psutil
import ray
from ray.exceptions import GetTimeoutError, RayActorError

from clara_ray.index.shard import IndexShard, merge_shard_results
from clara_ray.index.versions import (
    IndexSettings,
    build_version,
    current_version,
    find_version,
    list_versions,
    prune_versions,
    publish,
    read_version_manifest,
    version_name,
    version_step,
)
from clara_ray.placement import actor_options
from clara_ray.training.candidates import SearchResult

SHARD_START_TIMEOUT_S = 600  # shard actors that cannot start (no free CPUs/GPUs) fail a refresh after this


class IndexSearchError(RuntimeError):
    """A search that could not cover every shard, even after retries."""


class ShardServer:
    """Ray actor body: one shard of one index version, loaded from disk (again after a restart)."""

    def __init__(self, shard_dir: str, settings: IndexSettings):
        faiss.omp_set_num_threads(max(1, int(settings.num_cpus_per_shard)))
        self.shard_dir = shard_dir
        self.shard = IndexShard.load(shard_dir, settings.device, settings.search)

    def search_rows(self, queries: np.ndarray, num_candidates: int) -> tuple[np.ndarray, np.ndarray]:
        return self.shard.search_rows(queries, num_candidates)

    def fetch(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.shard.fetch(rows)

    def info(self) -> dict:
        return {"pid": os.getpid(), "shard_dir": self.shard_dir, "num_documents": len(self.shard),
                "device": self.shard.device.value, "rss_bytes": psutil.Process().memory_info().rss}


@dataclass
class _Serving:
    """One live version: its shard actors and how many searches are using them."""

    version: Path
    manifest: dict
    actors: list
    first_rows: np.ndarray  # (num_shards,) global row of each shard's row 0
    in_flight: int = 0


class IndexServer:
    """The named router actor (run with max_concurrency > 1: searches and a refresh overlap)."""

    def __init__(self, index_root: str, settings: IndexSettings, memory_dir: str | None = None, step: int = 0,
                 serve: str | None = None):
        """`serve`: a finished version's name to serve (a resumed stage 3's, from its
        checkpoint) when it is still on disk; else the version of `memory_dir`."""
        self.index_root, self.settings = Path(index_root), settings
        self._lock = threading.Condition()
        self._refresh_lock = threading.Lock()
        wanted = None if serve is None else self.index_root / serve
        version = wanted if wanted is not None and wanted in list_versions(self.index_root) else (
            self._initial_version(memory_dir, step))
        self._serving = self._start(version)
        publish(version)
        prune_versions(self.index_root, settings.keep_versions)

    def _initial_version(self, memory_dir: str | None, step: int) -> Path:
        live = current_version(self.index_root)
        with warnings.catch_warnings():  # Ray 2.60 warns about its own use of a deprecated property here
            warnings.simplefilter("ignore", DeprecationWarning)
            restarted = ray.get_runtime_context().was_current_actor_reconstructed
        # After a restart by Ray, serve what was live (a refresh may have replaced the first version).
        if restarted and live is not None:
            return live
        if memory_dir is None:
            if live is None:
                raise FileNotFoundError(f"{self.index_root} has no live index version and no memory_dir to build one")
            return live
        found = find_version(self.index_root, memory_dir, self.settings)
        if found is not None:
            return found
        step = max([step] + [version_step(v) + 1 for v in list_versions(self.index_root)])
        return build_version(memory_dir, self.index_root, step, self.settings)

    def _start(self, version: Path) -> _Serving:
        manifest = read_version_manifest(version)
        options = {
            "num_cpus": self.settings.num_cpus_per_shard, "num_gpus": self.settings.num_gpus_per_shard,
            "max_restarts": self.settings.max_restarts, "max_task_retries": self.settings.max_restarts,
            **actor_options(self.settings.resources_per_shard, self.settings.scheduling),
        }
        actors = [ray.remote(ShardServer).options(**options).remote(str(version / spec["dir"]), self.settings)
                  for spec in manifest["shards"]]
        try:
            ray.get([actor.info.remote() for actor in actors], timeout=SHARD_START_TIMEOUT_S)
        except GetTimeoutError:
            for actor in actors:
                ray.kill(actor, no_restart=True)
            raise RuntimeError(
                f"{len(actors)} shard actors for {version.name} did not start within {SHARD_START_TIMEOUT_S}s: "
                f"does the cluster have {self.settings.num_cpus_per_shard} CPUs / {self.settings.num_gpus_per_shard} "
                "GPUs free per shard (a refresh runs two versions' actors at once)?"
            ) from None
        except Exception:
            for actor in actors:
                ray.kill(actor, no_restart=True)
            raise
        first_rows = np.array([spec["first_row"] for spec in manifest["shards"]], dtype=np.int64)
        return _Serving(version, manifest, actors, first_rows)

    # ------------------------------------------------------------------ search

    def search(self, queries: np.ndarray, num_candidates: int) -> SearchResult:
        """Flattened query memory (B, n_mem * d) -> the global top-`num_candidates` of each query."""
        with self._lock:
            serving = self._serving
            serving.in_flight += 1
        try:
            total = serving.manifest["num_documents"]
            if not 1 <= num_candidates <= total:
                raise ValueError(f"num_candidates must be in [1, {total}], got {num_candidates}")
            errors = []
            for _ in range(self.settings.search_attempts):
                try:
                    return self._search_once(serving, queries, num_candidates)
                except RayActorError as error:  # a shard died; Ray restarts it from disk
                    errors.append(f"{type(error).__name__}: {str(error).splitlines()[0]}")
            raise IndexSearchError(
                f"search over {serving.version.name} lost a shard on all {len(errors)} attempts "
                f"(index.search_attempts); last errors: {errors}"
            )
        finally:
            with self._lock:
                serving.in_flight -= 1
                self._lock.notify_all()

    def _search_once(self, serving: _Serving, queries: np.ndarray, num_candidates: int) -> SearchResult:
        queries_ref = ray.put(np.ascontiguousarray(queries, dtype=np.float32))
        replies = ray.get([actor.search_rows.remote(queries_ref, num_candidates) for actor in serving.actors])
        if len(replies) != len(serving.actors):
            raise IndexSearchError(f"{len(replies)} of {len(serving.actors)} shards answered")
        scores, rows = merge_shard_results(
            [r[0] for r in replies], [r[1] for r in replies], serving.first_rows, num_candidates
        )  # (B, L) each, global rows
        if (rows < 0).any():
            raise IndexSearchError("the shards returned fewer candidates than asked for")
        owner = np.searchsorted(serving.first_rows, rows, side="right") - 1  # (B, L) shard of each winner
        wanted = {i: owner == i for i in np.unique(owner)}
        fetched = ray.get([serving.actors[i].fetch.remote(rows[mask] - serving.first_rows[i])
                           for i, mask in wanted.items()])
        doc_ids = np.empty(rows.shape, dtype=object)
        memory = None
        for (_, mask), (shard_ids, shard_memory) in zip(wanted.items(), fetched):
            if memory is None:
                memory = np.empty(rows.shape + shard_memory.shape[1:], dtype=shard_memory.dtype)  # (B, L, n, d)
            doc_ids[mask], memory[mask] = shard_ids, shard_memory
        return SearchResult(doc_ids, scores, memory)

    # ----------------------------------------------------------------- refresh

    def refresh(self, memory_dir: str, step: int) -> dict:
        """Build v<step> from `memory_dir` and swap to it; returns {"version": the live
        version's name, "build_seconds", "swap_seconds" (new actors started, CURRENT
        replaced, old actors drained)}. Raises (and the live version keeps serving) if
        the build or the new actors fail."""
        with self._refresh_lock:
            started = time.perf_counter()
            version = self.index_root / version_name(step)
            # A rerun of a refresh whose version was built from these shards reuses it.
            if not (version in list_versions(self.index_root)
                    and read_version_manifest(version)["source"]["memory_dir"] == str(Path(memory_dir).resolve())):
                build = ray.remote(build_version).options(num_cpus=self.settings.num_cpus_per_shard, max_retries=0)
                version = Path(ray.get(build.remote(memory_dir, str(self.index_root), step, self.settings)))
            built = time.perf_counter()
            fresh = self._start(version)
            publish(version)
            with self._lock:
                old, self._serving = self._serving, fresh
                # Searches already running on the old actors finish there; new ones go to the fresh actors.
                self._lock.wait_for(lambda: old.in_flight == 0, timeout=SHARD_START_TIMEOUT_S)
            for actor in old.actors:
                ray.kill(actor, no_restart=True)
            swapped = time.perf_counter()
            prune_versions(self.index_root, self.settings.keep_versions)
            return {"version": version.name, "build_seconds": built - started, "swap_seconds": swapped - built}

    def swap_resources(self) -> dict[str, float]:
        """What a refresh's swap needs free: its new shard actors start while the old
        ones still serve (the build task before them needs less)."""
        n = self.settings.num_shards
        custom = {name: n * amount for name, amount in self.settings.resources_per_shard.items()}
        return {"CPU": n * self.settings.num_cpus_per_shard, "GPU": n * self.settings.num_gpus_per_shard, **custom}

    def memory_dirs(self) -> list[str]:
        """The memory-shard directories the finished versions on disk were built from."""
        return [read_version_manifest(v)["source"]["memory_dir"] for v in list_versions(self.index_root)]

    # -------------------------------------------------------------------- info

    def info(self) -> dict:
        serving = self._serving
        return {
            "version": serving.version.name,
            "num_documents": serving.manifest["num_documents"],
            "num_shards": len(serving.actors),
            "key_dim": serving.manifest["key_dim"],
            "key_kind": serving.manifest["key_kind"],
            "factory": serving.manifest["factory"],
            "model_fingerprint": serving.manifest["source"]["model_fingerprint"],
            "step": serving.manifest["step"],
            "memory_dir": serving.manifest["source"]["memory_dir"],
        }

    def shard_actors(self) -> list:
        """Handles of the live version's shard actors (for health checks and fault tests)."""
        return list(self._serving.actors)


def index_actor_name(run_dir: str | Path) -> str:
    """The router's name for one run: runs (and sweep trials) on one cluster never share one."""
    run_dir = Path(run_dir).resolve()
    return f"clara-index-{run_dir.name}-{hashlib.sha1(str(run_dir).encode()).hexdigest()[:8]}"


class IndexActorCandidates:
    """Stage 3's candidate source (``clara_ray.training.candidates``) over the router
    actor; it holds the handle, so it travels to Ray Train workers as it is."""

    def __init__(self, router):
        self.router = router

    @property
    def version(self) -> str:
        """The live index version (recorded in training checkpoints)."""
        return ray.get(self.router.info.remote())["version"]

    def candidates(self, query_keys: np.ndarray, num_candidates: int, question_ids=()) -> SearchResult:
        return ray.get(self.router.search.remote(np.ascontiguousarray(query_keys, dtype=np.float32), num_candidates))


def _wait_for_name(name: str, timeout_s: float = 60.0) -> None:
    """An actor of a killed driver dies a moment after it (its owner); one that is
    still there after `timeout_s` belongs to a live driver."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get_actor(name)
        except ValueError:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"an index actor named {name!r} is running on this cluster: another driver of the same run is alive"
            )
        time.sleep(0.5)


def start_index_actor(
    shard_dir: str,
    name: str,
    *,
    settings: IndexSettings | None = None,
    index_root: str | None = None,
    step: int = 0,
    serve: str | None = None,
):
    """Start the named index router over the memory shards in `shard_dir` and wait
    until every shard actor has loaded. Builds index version v<step> under `index_root`
    (default: an ``index`` directory beside `shard_dir`) unless a matching one is on
    disk, or serves version `serve` when it is on disk (a resumed stage 3 goes on with
    the version its checkpoint recorded). The router lives as long as the driver that
    started it; a live one of the same name (another driver of the same run) is an
    error, never replaced."""
    settings = settings or IndexSettings()
    index_root = index_root or str(Path(shard_dir).resolve().parent / "index")
    _wait_for_name(name)
    # The router only coordinates (0 CPUs); it must answer searches while a refresh builds.
    router = ray.remote(IndexServer).options(name=name, num_cpus=0, max_concurrency=16, max_restarts=2)
    actor = router.remote(index_root, settings, shard_dir, step, serve)
    ray.get(actor.info.remote())
    return actor

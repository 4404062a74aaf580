"""Refreshing the index while stage 3 trains the compressor (``stage3.compressor: trainable``).

    scheduler = start_refresh_scheduler(router, RefreshPlan(...), name)       # the driver
    if ray.get(scheduler.reserve.remote(step)):                               # rank 0 of the loop, then at once
        scheduler.start.remote(step, snapshot_dir, probe_keys)                 # (the snapshot written in between)
    scheduler.request_final.remote(step, model_dir)                            # the driver, after stage 3
    ray.get(scheduler.drain.remote())                                         # the driver, after stage 3
    ray.get(scheduler.status.remote())                                        # what happened, for metrics

A refresh of step s: the training loop writes a snapshot of the model at step s
(``snapshot_dir``) and asks for a refresh; the scheduler then, in its own thread
while training goes on,

1. encodes the corpus with the snapshot's compressor into
   ``<refresh_root>/memory-v<s>``: the documents of the first encoding (the Ray Data
   job of ``clara_ray/encode.py``), re-encoded shard by shard by the run's long-lived
   encoder actors (``refresh_encoder.py``, ``encode.*`` settings), which keep the base
   model loaded and swap in the snapshot's adapters;
2. builds index version ``v<s>`` from those shards and swaps it in atomically
   (``IndexServer.refresh``: the live version serves until the swap);
3. measures how much the top-L changed: the probe queries sent with the request
   (the query reasoner's keys of a fixed batch of training questions at step s),
   searched on the old version and on the new one;
4. removes the snapshot, and memory shards whose version the router pruned
   (``index.keep_versions``).

At most one refresh is in flight. A request that arrives while one runs is
skipped and logged (training never waits), except the final one (after the last
step), which runs once the one in flight is done: the evaluation reads the index
of the final compressor, and ``drain`` waits for it. A refresh that fails (its
encode task killed, a build that raises) leaves the live version serving and is
logged with its error; the next request tries again, with fresh encoders.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import ray

from clara_ray.encode import EncodeSettings
from clara_ray.index.refresh_encoder import RefreshEncoder, RefreshEncoders
from clara_ray.memory_shards import MANIFEST
from clara_ray.modeling.checkpoint import MANIFEST as MODEL_MANIFEST

SNAPSHOTS = "snapshots"
_MEMORY_DIR = re.compile(r"^memory-v(\d+)$")


@dataclass(frozen=True)
class RefreshPlan:
    """What a refresh encodes, with what, and where it writes."""

    source_memory_dir: str  # the first encoding of the corpus: which documents, in which shards
    documents_path: str  # the run's document table (data/documents.arrow): their texts by id
    encode: EncodeSettings  # the run's encode.* (max_actors encoders are kept)
    refresh_root: str  # memory-v<s>/ and snapshots/ live here
    num_candidates: int  # L, for the top-L overlap

    def memory_dir(self, step: int) -> Path:
        return Path(self.refresh_root) / f"memory-v{step}"

    def snapshot_dir(self, step: int) -> Path:
        return Path(self.refresh_root) / SNAPSHOTS / f"step-{step}"


@dataclass
class RefreshEvent:
    """One refresh, as the status and the run report show it."""

    step: int
    outcome: str  # "swapped" | "failed"
    requested_at: float  # time.time()
    encode_seconds: float = 0.0
    build_seconds: float = 0.0
    swap_seconds: float = 0.0
    version: str | None = None
    top_l_overlap: float | None = None  # mean share of the probe queries' top-L kept by the swap
    error: str | None = None


@dataclass(frozen=True)
class _Request:
    step: int
    snapshot_dir: str
    probe_keys: np.ndarray | None
    keep_snapshot: bool  # the final refresh reads the stage's own model directory


@dataclass
class _State:
    live_step: int
    events: list[RefreshEvent] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    running: int | None = None
    reserved: bool = False  # `running` is reserved, its `start` not yet called
    final: _Request | None = None  # a final request waiting for its turn


def _fingerprint(model_dir: str | Path) -> str:
    return json.loads((Path(model_dir) / MODEL_MANIFEST).read_text())["compressor_fingerprint"]


class RefreshScheduler:
    """Ray actor body (threaded: requests and status answer while a refresh runs).

    `encoder_class` is the encoders' actor body (``RefreshEncoder``; a test passes one
    that is killed midway)."""

    def __init__(self, router, plan: RefreshPlan, live_step: int = 0, encoder_class: type = RefreshEncoder):
        self.router, self.plan = router, plan
        self.encoders = RefreshEncoders(plan.source_memory_dir, plan.documents_path, plan.encode, encoder_class)
        self._lock = threading.Condition()
        self._state = _State(live_step=live_step)

    # --------------------------------------------------------------- requests

    def reserve(self, step: int) -> bool:
        """The loop's first call at a refresh step: True if the refresh of `step` may
        start (its `start` follows, with the snapshot); False, and the step counted as
        skipped, if one is in flight."""
        with self._lock:
            if self._state.running is not None:
                self._state.skipped.append(step)
                print(f"[refresh] step {step}: skipped, the refresh of step {self._state.running} is still running",
                      flush=True)
                return False
            self._state.running, self._state.reserved = step, True
            return True

    def release(self) -> None:
        """Drop a reservation whose `start` never came (the loop that made it died in
        between; a restarted loop calls this first)."""
        with self._lock:
            if self._state.reserved:
                self._state.running, self._state.reserved = None, False
                self._lock.notify_all()

    def start(self, step: int, snapshot_dir: str, probe_keys: np.ndarray | None = None) -> None:
        """Run the refresh `reserve(step)` made room for."""
        with self._lock:
            if self._state.running != step or not self._state.reserved:
                raise RuntimeError(f"refresh of step {step} started without reserve({step})")
            self._state.reserved = False
        threading.Thread(target=self._run, args=(_Request(step, snapshot_dir, probe_keys, False),), daemon=True).start()

    def request_final(self, step: int, model_dir: str) -> str:
        """The refresh after the last step, from the stage's own model directory (kept):
        "started", or "queued" behind the one in flight."""
        request = _Request(step, model_dir, None, keep_snapshot=True)
        with self._lock:
            if self._state.running is not None:
                self._state.final = request
                return "queued"
            self._state.running = step
        threading.Thread(target=self._run, args=(request,), daemon=True).start()
        return "started"

    def drain(self, timeout_s: float | None = None) -> dict:
        """Wait until no refresh runs or waits; returns the status."""
        with self._lock:
            self._lock.wait_for(lambda: self._state.running is None and self._state.final is None, timeout=timeout_s)
        return self.status()

    def status(self) -> dict:
        with self._lock:
            state = self._state
            return {"live_step": state.live_step, "running": state.running, "skipped": list(state.skipped),
                    "events": [asdict(e) for e in state.events],
                    "swapped": sum(e.outcome == "swapped" for e in state.events),
                    "failed": sum(e.outcome == "failed" for e in state.events)}

    # ---------------------------------------------------------------- refresh

    def _run(self, request: _Request) -> None:
        while request is not None:
            event = self._refresh(request)
            with self._lock:
                self._state.events.append(event)
                if event.outcome == "swapped":
                    self._state.live_step = request.step
                request, self._state.final = self._state.final, None
                self._state.running = None if request is None else request.step
                self._lock.notify_all()

    def _refresh(self, request: _Request) -> RefreshEvent:
        step, snapshot_dir, probe_keys = request.step, request.snapshot_dir, request.probe_keys
        event = RefreshEvent(step=step, outcome="failed", requested_at=time.time())
        memory_dir = self.plan.memory_dir(step)
        try:
            started = time.perf_counter()
            if not self._finished_encoding(memory_dir, snapshot_dir):
                self.encoders.encode(snapshot_dir, memory_dir)
            event.encode_seconds = time.perf_counter() - started
            self._make_room_for_the_swap()
            before = self._top_l(probe_keys)
            timing = ray.get(self.router.refresh.remote(str(memory_dir), step))
            event.version, event.build_seconds, event.swap_seconds = (timing["version"], timing["build_seconds"],
                                                                     timing["swap_seconds"])
            after = self._top_l(probe_keys)
            if before is not None and after is not None:
                event.top_l_overlap = float(np.mean([len(set(b) & set(a)) / len(b) for b, a in zip(before, after)]))
            event.outcome = "swapped"
            print(f"[refresh] step {step}: {event.version} live (encode {event.encode_seconds:.1f}s, "
                  f"build {event.build_seconds:.1f}s, swap {event.swap_seconds:.1f}s, top-L overlap "
                  f"{event.top_l_overlap})", flush=True)
            self._prune_memory(step)
        except Exception as error:  # the live version keeps serving; the next request retries
            event.error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            print(f"[refresh] step {step}: failed, the live version keeps serving ({event.error})", flush=True)
        finally:
            if not request.keep_snapshot:
                shutil.rmtree(snapshot_dir, ignore_errors=True)
        return event

    def _make_room_for_the_swap(self) -> None:
        """The encoders keep their resources between refreshes; where the cluster has
        too few left for the swap's new shard actors, they give theirs up (and the next
        refresh starts them again) rather than wait for each other for ever."""
        needed = ray.get(self.router.swap_resources.remote())
        free = ray.available_resources()
        if any(free.get(resource, 0.0) < amount for resource, amount in needed.items() if amount > 0):
            print(f"[refresh] the encoders free their resources for the swap ({needed} needed, "
                  f"{ {r: free.get(r, 0.0) for r in needed} } free)", flush=True)
            self.encoders.close()

    @staticmethod
    def _finished_encoding(memory_dir: Path, snapshot_dir: str) -> bool:
        """A resumed run's refresh of the same step and compressor can keep its shards."""
        manifest = memory_dir / MANIFEST
        return manifest.exists() and json.loads(manifest.read_text()).get("model_fingerprint") == _fingerprint(snapshot_dir)

    def _top_l(self, probe_keys: np.ndarray | None) -> list[list[str]] | None:
        if probe_keys is None or len(probe_keys) == 0:
            return None
        found = ray.get(self.router.search.remote(probe_keys, self.plan.num_candidates))
        return [list(row) for row in found.doc_ids]

    def _prune_memory(self, step: int) -> None:
        """Memory shards (and encode checkpoints) of earlier steps whose version the
        router has pruned, or never built (a failed refresh)."""
        kept = {Path(v).resolve() for v in ray.get(self.router.memory_dirs.remote())}
        for path in Path(self.plan.refresh_root).iterdir():
            match = _MEMORY_DIR.match(path.name)
            if match and int(match.group(1)) < step and path.resolve() not in kept:
                shutil.rmtree(path, ignore_errors=True)


def start_refresh_scheduler(router, plan: RefreshPlan, name: str, live_step: int = 0,
                            encoder_class: type = RefreshEncoder):
    """The run's scheduler actor (0 CPUs: it only coordinates; its encoders ask for their own)."""
    actor = ray.remote(RefreshScheduler).options(name=name, num_cpus=0, max_concurrency=8)
    scheduler = actor.remote(router, plan, live_step, encoder_class)
    ray.get(scheduler.status.remote())
    return scheduler


def refresh_scheduler_name(run_dir: str | Path) -> str:
    """The scheduler's actor name for one run (beside the run's index router's)."""
    from clara_ray.index.actor import index_actor_name

    return index_actor_name(run_dir).replace("clara-index-", "clara-refresh-", 1)

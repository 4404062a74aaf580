"""Progress of the long steps: a bar on a terminal, periodic lines otherwise.

Bars (tqdm, on stderr) when stderr is a terminal; otherwise (a job's log, a pipe, CI)
a line every ``every_s`` seconds, so a log shows where a long step stands without a
line per batch. ``CLARA_RAY_PROGRESS=bars|lines`` overrides the choice.

Training stages run on Ray Train workers, whose output reaches the driver as log
lines. Rank 0 writes where it stands to a small JSON file in the stage's storage
(``write_stage_progress``, at most every half second) and the driver draws the bar
from that file (``StageBar``); in lines mode rank 0 prints its progress lines (with
every metric) instead, as it always did.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

PROGRESS_ENV = "CLARA_RAY_PROGRESS"


def use_bars() -> bool:
    """Bars on a terminal; ``CLARA_RAY_PROGRESS=bars`` or ``lines`` decides otherwise."""
    choice = os.environ.get(PROGRESS_ENV, "auto").strip().lower()
    if choice in ("bars", "lines"):
        return choice == "bars"
    return sys.stderr.isatty()


def _stderr_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Progress:
    """`done` of `total` units of one step. A tqdm bar when `bars`, else a line
    through `log` every `every_s` seconds (a step shorter than that prints none:
    its own 'done in' line says enough)."""

    def __init__(self, description: str, total: int, unit: str = "it", every_s: float = 30.0,
                 log: Callable[[str], None] = _stderr_line, bars: bool | None = None):
        self.description, self.total, self.unit, self.every_s, self.log = description, total, unit, every_s, log
        self.done, self.started = 0, time.perf_counter()
        self._last_line, self._status = self.started, ""
        self._bar = None
        if use_bars() if bars is None else bars:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=description, unit=unit, dynamic_ncols=True, leave=False, file=sys.stderr)

    def set(self, done: int, status: str = "") -> None:
        """`done` units so far (never fewer than before); `status`: a short note, e.g. the loss."""
        done = min(max(done, self.done), self.total)
        if self._bar is not None:
            if status and status != self._status:
                self._bar.set_postfix_str(status, refresh=False)  # drawn by the update
            self._bar.update(done - self.done)  # 0 too: tqdm redraws once its interval has passed
        self.done, self._status = done, status or self._status
        now = time.perf_counter()
        if self._bar is None and now - self._last_line >= self.every_s and self.done < self.total:
            self._last_line = now
            self.log(self.line())

    def update(self, count: int = 1, status: str = "") -> None:
        self.set(self.done + count, status)

    def line(self) -> str:
        elapsed = time.perf_counter() - self.started
        eta = f", eta {elapsed / self.done * (self.total - self.done):.0f}s" if 0 < self.done < self.total else ""
        status = f" {self._status}" if self._status else ""
        return (f"[{self.description}] {self.done}/{self.total} {self.unit} ({100 * self.done / max(self.total, 1):.0f}%)"
                f"{status} | {elapsed:.0f}s elapsed{eta}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------- training stages

PROGRESS_FILE = "progress.json"


def write_stage_progress(path: str | Path, step: int, total: int, status: str) -> None:
    """Rank 0's place in its stage, replaced whole (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.partial")
    partial.write_text(json.dumps({"step": step, "total": total, "status": status}))
    partial.replace(path)


def read_stage_progress(path: str | Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):  # not written yet, or storage briefly unreadable
        return None


class StageBar:
    """The bar of a training stage on the driver, drawn from rank 0's progress file
    while `trainer.fit()` runs (a no-op in lines mode)."""

    def __init__(self, path: str | Path, stage: str, total: int, poll_s: float = 0.5):
        self.path, self.stage, self.total, self.poll_s = Path(path), stage, total, poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.path.unlink(missing_ok=True)  # a bar of this run only, not of a stage before it

    @property
    def active(self) -> bool:
        return self._thread is not None

    def __enter__(self) -> StageBar:
        if use_bars():
            self._thread = threading.Thread(target=self._draw, name=f"{self.stage}-progress", daemon=True)
            self._thread.start()
        return self

    def _draw(self) -> None:
        with Progress(self.stage, self.total, unit="steps", bars=True) as bar:
            while not self._stop.wait(self.poll_s):
                state = read_stage_progress(self.path)
                if state is not None:
                    bar.set(state["step"], state.get("status", ""))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

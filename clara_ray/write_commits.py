"""Which Parquet files of an interrupted, checkpointed Ray Data write are whole.

Ray Data's checkpointed write (``ray.data.checkpoint``, a two-phase commit) keeps
one record per write task in the checkpoint directory:

    <checkpoint>/<base>.pending.parquet   written before the task writes its data files
    <checkpoint>/<base>.parquet           the same record renamed once they are complete

and the task's data files are ``<output>/<base>*.parquet``. A data file is
*committed* when a committed record's ``<base>`` is a prefix of its name; that is
the only state in which it is known to be complete. A data file under a pending
record is the remains of a task killed mid-write (maybe without its footer, maybe
empty); a data file under no record was not written by this write at all (or by a
task whose record a recovery already removed). Ray Data removes the pending kind
itself, but only once the next run has started executing: anything that lists the
output before then must apply the same rule, which ``settle_interrupted_write`` does.

Plain Python and pyarrow (local file system); Ray is not needed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PENDING_SUFFIX = ".pending.parquet"
DATA_SUFFIX = ".parquet"


@dataclass(frozen=True)
class WriteState:
    committed: list[Path]  # whole data files, in name order
    uncommitted: list[Path]  # under a pending record, or under none
    unreadable: list[Path]  # committed, yet with no readable Parquet footer (a lost write)
    pending_records: list[Path]
    records_of_unreadable: list[Path]  # their committed records: the rows must be written again


def _record_bases(checkpoint_dir: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """(committed base -> record, pending base -> record)."""
    committed, pending = {}, {}
    if checkpoint_dir.is_dir():
        for record in checkpoint_dir.iterdir():
            if not record.is_file():
                continue
            if record.name.endswith(PENDING_SUFFIX):
                pending[record.name[: -len(PENDING_SUFFIX)]] = record
            elif record.name.endswith(DATA_SUFFIX):
                committed[record.name[: -len(DATA_SUFFIX)]] = record
    return committed, pending


def _base_of(name: str, bases: dict[str, Path]) -> str | None:
    """The base in `bases` that is a prefix of `name` (bases never prefix each other)."""
    for end in range(1, len(name) + 1):
        if name[:end] in bases:
            return name[:end]
    return None


def _readable(path: Path) -> bool:
    try:
        pq.ParquetFile(path).metadata  # noqa: B018 - reading the footer is the check
    except (pa.ArrowInvalid, OSError):
        return False
    return True


def inspect_write(output_dir: str | Path, checkpoint_dir: str | Path) -> WriteState:
    """Sort the ``*.parquet`` files directly in `output_dir` by the commit rule above.
    One task may write several files under its base: when one of them is unreadable,
    all of them count as unreadable (the record covers their rows together)."""
    committed_bases, pending_bases = _record_bases(Path(checkpoint_dir))
    uncommitted, by_base = [], {}
    for path in sorted(Path(output_dir).glob(f"*{DATA_SUFFIX}")):
        base = _base_of(path.name, committed_bases)
        if base is None:
            uncommitted.append(path)
        else:
            by_base.setdefault(base, []).append(path)
    committed, unreadable, unreadable_records = [], [], []
    for base, paths in by_base.items():
        if all(_readable(path) for path in paths):
            committed.extend(paths)
        else:
            unreadable.extend(paths)
            unreadable_records.append(committed_bases[base])
    return WriteState(sorted(committed), uncommitted, sorted(unreadable), sorted(pending_bases.values()),
                      sorted(unreadable_records))


def settle_interrupted_write(output_dir: str | Path, checkpoint_dir: str | Path, log: Callable[[str], None] = print) -> list[Path]:
    """Before a checkpointed write resumes into `output_dir`: delete every data file
    that is not committed and the pending records; delete committed files that
    cannot be read together with their records, so their rows are written again.
    Returns the committed files, which are all that is left."""
    state = inspect_write(output_dir, checkpoint_dir)
    for path in state.uncommitted:
        log(f"[encode] removing {path.name}: its write was never committed (an interrupted earlier run)")
        path.unlink()
    for path in state.unreadable:
        log(f"[encode] removing {path.name}: committed but unreadable; its rows will be encoded again")
        path.unlink()
    for record in state.pending_records + state.records_of_unreadable:
        record.unlink()
    return state.committed


def committed_rows(paths: list[Path]) -> int:
    return sum(pq.ParquetFile(path).metadata.num_rows for path in paths)

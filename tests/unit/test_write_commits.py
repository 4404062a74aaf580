"""The commit rule of a checkpointed Ray Data write, on files made by hand (no Ray)."""

import pyarrow as pa
import pyarrow.parquet as pq

from clara_ray.write_commits import committed_rows, inspect_write, settle_interrupted_write


def _data(path, rows: int) -> None:
    pq.write_table(pa.table({"doc_id": [f"d{i}" for i in range(rows)]}), path)


def _truncated(path, rows: int) -> None:
    _data(path, rows)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _layout(tmp_path):
    out, records = tmp_path / "out", tmp_path / "out.checkpoint"
    out.mkdir()
    records.mkdir()
    _data(out / "w_000000.parquet", 5)  # committed
    _data(records / "w_000000.parquet", 5)
    _truncated(out / "w_000001.parquet", 7)  # killed mid-write
    _data(records / "w_000001.pending.parquet", 7)
    (out / "w_000002.parquet").write_bytes(b"")  # killed right after creating the file
    _data(records / "w_000002.pending.parquet", 3)
    _data(out / "w_000003.parquet", 4)  # written, never committed (no record)
    _truncated(out / "w_000004.parquet", 6)  # committed, then lost (e.g. power cut before the data was flushed)
    _data(records / "w_000004.parquet", 6)
    _data(out / "w_000005-0.parquet", 2)  # one task, two files: one of them lost
    _truncated(out / "w_000005-1.parquet", 2)
    _data(records / "w_000005.parquet", 4)
    _data(out / "w_000006-0.parquet", 2)  # one task, two whole files
    _data(out / "w_000006-1.parquet", 3)
    _data(records / "w_000006.parquet", 5)
    (out / "quarantine").mkdir()  # not a shard
    return out, records


def test_inspect_sorts_files_by_their_commit_records(tmp_path):
    out, records = _layout(tmp_path)
    state = inspect_write(out, records)
    assert [p.name for p in state.committed] == ["w_000000.parquet", "w_000006-0.parquet", "w_000006-1.parquet"]
    assert [p.name for p in state.uncommitted] == ["w_000001.parquet", "w_000002.parquet", "w_000003.parquet"]
    assert [p.name for p in state.unreadable] == ["w_000004.parquet", "w_000005-0.parquet", "w_000005-1.parquet"]
    assert [p.name for p in state.pending_records] == ["w_000001.pending.parquet", "w_000002.pending.parquet"]
    assert [p.name for p in state.records_of_unreadable] == ["w_000004.parquet", "w_000005.parquet"]
    assert committed_rows(state.committed) == 10


def test_settle_leaves_only_whole_committed_shards_and_their_records(tmp_path):
    out, records = _layout(tmp_path)
    messages = []
    kept = settle_interrupted_write(out, records, messages.append)
    assert sorted(p.name for p in out.glob("*.parquet")) == [p.name for p in kept]
    assert committed_rows(kept) == 10
    # The lost committed writes lose their records too, so their rows are written again.
    assert sorted(p.name for p in records.iterdir()) == ["w_000000.parquet", "w_000006.parquet"]
    assert len(messages) == 6
    assert settle_interrupted_write(out, records, messages.append) == kept  # idempotent
    assert len(messages) == 6


def test_without_a_checkpoint_nothing_counts_as_committed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _data(out / "w_000000.parquet", 5)
    state = inspect_write(out, tmp_path / "missing.checkpoint")
    assert state.committed == [] and [p.name for p in state.uncommitted] == ["w_000000.parquet"]

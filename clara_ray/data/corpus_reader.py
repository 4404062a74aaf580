"""Read corpus files as a lazy, streaming Ray Dataset of validated rows.

    rows = read_corpus_rows(["s3://bucket/psgs_w100.tsv"], on_bad_row=BadRowPolicy.QUARANTINE)
    duplicates = find_duplicate_ids(rows)            # small dict, the only thing collected
    rows = mark_duplicate_ids(rows, duplicates, BadRowPolicy.QUARANTINE)
    counts = count_corpus_rows(rows)                 # a Ray aggregation, not a collect
    documents = good_rows(rows)                      # -> map_batches(compressor actor pool)
    quarantined_rows(rows).write_json(...)           # what was set aside, and why

Line formats (jsonl, dpr_tsv, flashrag, clara) are read by ``_LineDatasource``,
which streams each file as raw byte lines with their physical line numbers and
parses them in blocks of bounded size, in the read task. Every row gets a
``row_key`` ("source:row_number.j"), unique and stable across reruns: the id a
checkpointed write resumes by (see ``clara_ray/encode.py``).
Compressed line files (``.gz``, ``.bz2``, ``.zst``, ``.lz4``) are decompressed
on the fly by pyarrow. Parquet is read in batches of rows and validated
during the read. Columns are documented in ``corpus_rows.py``.

Nothing runs until the dataset is consumed; with ``BadRowPolicy.FAIL`` a
``BadInputError`` is raised then, naming the file, row and reason of the first
bad row of the batch where one was found. Ray Data wraps it in its
``UserCodeException``, whose message holds the ``BadInputError`` text; set
``DataContext.get_current().raise_original_map_exception = True`` to receive
the ``BadInputError`` itself (a picklable subclass, ``CorpusRowError``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data.aggregate import Count, Min
from ray.data.datasource import FileBasedDatasource
from ray.data.expressions import col

from clara_ray.data.corpus_rows import (
    DEFAULT_MAX_LINE_BYTES,
    CorpusFormat,
    CorpusRowCounts,
    detect_corpus_format,
    iterate_lines,
    mark_duplicates,
    order_key,
    parse_line_batch,
    parse_order_key,
    parse_parquet_batch,
)
from clara_ray.data.formats import BadRowPolicy

# Explicit types: a batch whose rows are all good has only nulls in reason/raw,
# and Arrow would otherwise type those columns as null, clashing with other blocks.
ROW_SCHEMA = pa.schema(
    [
        ("row_key", pa.string()),
        ("source", pa.string()),
        ("row_number", pa.int64()),
        ("doc_id", pa.string()),
        ("text", pa.string()),
        ("title", pa.string()),
        ("reason_kind", pa.string()),
        ("reason", pa.string()),
        ("raw", pa.string()),
    ]
)
DEFAULT_ROWS_PER_BLOCK = 4096
_BYTES_PER_BLOCK = 16 * 1024 * 1024
_READ_CHUNK_BYTES = 1024 * 1024


def _with_row_keys(columns: dict[str, list]) -> dict[str, list]:
    """Add ``row_key`` = "source:row_number.j", unique per output row and stable
    across reruns (j numbers the documents of one line: a clara line holds several).

    It is the id Ray Data's checkpointing resumes by, so it must exist at read time.
    """
    keys, previous, index = [], None, 0
    for source, row_number in zip(columns["source"], columns["row_number"]):
        index = index + 1 if (source, row_number) == previous else 0
        previous = (source, row_number)
        keys.append(f"{source}:{row_number}.{index}")
    return {"row_key": keys, **columns}


class _LineDatasource(FileBasedDatasource):
    """Each file as parsed blocks of ``ROW_SCHEMA`` rows.

    Lines are parsed in the read task, not in a later ``map_batches``: rows then
    carry their ``row_key`` from the read on, which checkpointed (resumable)
    writes need. One file is one read task, so a single huge file parses on one
    core; that is still far faster than encoding it.
    """

    def __init__(
        self,
        paths: list[str],
        *,
        corpus_format: CorpusFormat,
        on_bad_row: BadRowPolicy,
        rows_per_block: int,
        max_line_bytes: int,
        **kwargs,
    ):
        super().__init__(paths, **kwargs)
        self._corpus_format = corpus_format
        self._on_bad_row = on_bad_row
        self._rows_per_block = rows_per_block
        self._max_line_bytes = max_line_bytes

    def _read_stream(self, stream: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        chunks = iter(lambda: stream.read(_READ_CHUNK_BYTES), b"")
        row_numbers: list[int] = []
        lines: list[bytes] = []
        too_long: list[bool] = []
        size = 0
        for row_number, line, cut in iterate_lines(chunks, self._max_line_bytes):
            row_numbers.append(row_number)
            lines.append(line)
            too_long.append(cut)
            size += len(line)
            if len(lines) >= self._rows_per_block or size >= _BYTES_PER_BLOCK:
                yield self._parse(path, row_numbers, lines, too_long)
                row_numbers, lines, too_long, size = [], [], [], 0
        if lines:
            yield self._parse(path, row_numbers, lines, too_long)

    def _parse(
        self, path: str, row_numbers: list[int], lines: list[bytes], too_long: list[bool]
    ) -> pa.Table:
        batch = {"source": [path] * len(lines), "row_number": row_numbers, "line": lines, "line_too_long": too_long}
        rows = parse_line_batch(batch, self._corpus_format, self._on_bad_row)
        return pa.Table.from_pydict(_with_row_keys(rows), schema=ROW_SCHEMA)


class _ParquetDatasource(FileBasedDatasource):
    """Each parquet file as validated rows, numbered by their 1-based index in the file.

    Validation happens here rather than in ``map_batches`` because the ``id``
    column may be integers in one file and strings in the next, and blocks of
    different types cannot be batched together.
    """

    def __init__(
        self, paths: list[str], *, rows_per_block: int, on_bad_row: BadRowPolicy, **kwargs
    ):
        super().__init__(paths, **kwargs)
        self._rows_per_block = rows_per_block
        self._on_bad_row = on_bad_row

    def _open_input_source(self, filesystem, path: str, **open_args) -> pa.NativeFile:
        # Parquet keeps its metadata in a footer: it needs a seekable file, not a stream.
        return filesystem.open_input_file(path)

    def _read_stream(self, file: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        parquet_file = pq.ParquetFile(file)
        names = parquet_file.schema_arrow.names
        missing = [name for name in ("id", "text") if name not in names]
        if missing:
            raise ValueError(
                f"{path}: a parquet corpus needs the columns 'id' and 'text' (and may have "
                f"'title'); missing {missing}, found {names}"
            )
        columns = [name for name in ("id", "text", "title") if name in names]
        next_row_number = 1
        for record_batch in parquet_file.iter_batches(
            batch_size=self._rows_per_block, columns=columns
        ):
            count = record_batch.num_rows
            batch = {name: record_batch.column(name).to_pylist() for name in columns}
            batch["source"] = [path] * count
            batch["row_number"] = list(range(next_row_number, next_row_number + count))
            next_row_number += count
            rows = parse_parquet_batch(batch, self._on_bad_row)
            yield pa.Table.from_pydict(_with_row_keys(rows), schema=ROW_SCHEMA)


def read_corpus_rows(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    corpus_format: CorpusFormat | None = None,
    on_bad_row: BadRowPolicy = BadRowPolicy.FAIL,
    *,
    filesystem: pa.fs.FileSystem | None = None,
    rows_per_block: int = DEFAULT_ROWS_PER_BLOCK,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> ray.data.Dataset:
    """A lazy Dataset of ``ROW_SCHEMA`` rows, good and bad, for files or directories.

    ``corpus_format`` is detected from the file extensions when not given (all
    paths must agree; directories, flashrag and clara need it). ``filesystem``
    is passed to Ray Data as is (for s3://, gs://, ... paths).
    """
    path_list = (
        [os.fspath(paths)]
        if isinstance(paths, (str, os.PathLike))
        else [os.fspath(p) for p in paths]
    )
    if not path_list:
        raise ValueError("read_corpus_rows needs at least one path")
    if not isinstance(on_bad_row, BadRowPolicy):
        raise TypeError(f"on_bad_row must be a BadRowPolicy, got {on_bad_row!r}")
    formats = {detect_corpus_format(path, corpus_format) for path in path_list}
    if len(formats) > 1:
        names = sorted(found.value for found in formats)
        raise ValueError(f"paths have different corpus formats {names}; read them separately")
    (found_format,) = formats
    if found_format is CorpusFormat.PARQUET:
        source = _ParquetDatasource(
            path_list, filesystem=filesystem, rows_per_block=rows_per_block, on_bad_row=on_bad_row
        )
        return ray.data.read_datasource(source)
    source = _LineDatasource(
        path_list,
        corpus_format=found_format,
        on_bad_row=on_bad_row,
        filesystem=filesystem,
        rows_per_block=rows_per_block,
        max_line_bytes=max_line_bytes,
    )
    return ray.data.read_datasource(source)


def good_rows(rows: ray.data.Dataset) -> ray.data.Dataset:
    return rows.filter(expr=col("reason").is_null())


def quarantined_rows(rows: ray.data.Dataset) -> ray.data.Dataset:
    return rows.filter(expr=col("reason").is_not_null())


# ---------------------------------------------------------------------------
# Duplicate ids


def _good_row_keys(table: pa.Table) -> pa.Table:
    good = table.filter(pc.is_null(table["reason"]))
    keys = [
        order_key(source, row_number)
        for source, row_number in zip(good["source"].to_pylist(), good["row_number"].to_pylist())
    ]
    return pa.table({"doc_id": good["doc_id"], "first_at": pa.array(keys, pa.string())})


def find_duplicate_ids(
    rows: ray.data.Dataset, num_partitions: int | None = None
) -> dict[str, tuple[str, int]]:
    """For each id held by more than one good row: ``(source, row_number)`` of the kept one.

    The kept occurrence is the first by ``(source, row_number)``. A groupby
    (hash shuffle into ``num_partitions``, Ray Data's default when None) runs
    on the cluster; only the duplicated ids reach the driver. With one partition
    (a corpus of less than one partition's worth of ids) the driver groups the ids
    itself: the same result without the seconds a shuffle takes to start.
    """
    keys = rows.map_batches(_good_row_keys, batch_format="pyarrow", batch_size=None)
    if num_partitions == 1:
        tables = [table for table in ray.get(keys.to_arrow_refs()) if table.num_rows]
        if not tables:
            return {}
        grouped = pa.concat_tables(tables).group_by("doc_id").aggregate([("doc_id", "count"), ("first_at", "min")])
        repeated = grouped.filter(pc.greater(grouped["doc_id_count"], 1))
        return {doc_id: parse_order_key(first) for doc_id, first in
                zip(repeated["doc_id"].to_pylist(), repeated["first_at_min"].to_pylist())}
    grouped = (
        keys
        .groupby("doc_id", num_partitions=num_partitions)
        .aggregate(
            Count(alias_name="occurrences"),
            # The default zero is float("inf"), which cannot be compared with strings.
            Min("first_at", alias_name="first_at", zero_factory=lambda: "\U0010ffff"),
        )
        .filter(expr=col("occurrences") > 1)
    )
    return {row["doc_id"]: parse_order_key(row["first_at"]) for row in grouped.take_all()}


def _mark_block(
    table: pa.Table, duplicates: Mapping[str, tuple[str, int]], on_bad_row: BadRowPolicy
) -> pa.Table:
    return pa.Table.from_pydict(
        mark_duplicates(table.to_pydict(), duplicates, on_bad_row), schema=ROW_SCHEMA
    )


def mark_duplicate_ids(
    rows: ray.data.Dataset,
    duplicates: Mapping[str, tuple[str, int]],
    on_bad_row: BadRowPolicy = BadRowPolicy.FAIL,
) -> ray.data.Dataset:
    """``rows`` with every non-kept occurrence of a duplicated id turned into a bad row."""
    if not duplicates:
        return rows
    return rows.map_batches(
        _mark_block,
        fn_kwargs={"duplicates": dict(duplicates), "on_bad_row": on_bad_row},
        batch_format="pyarrow",
        batch_size=None,
    )


# ---------------------------------------------------------------------------
# Counts


def count_corpus_rows(rows: ray.data.Dataset) -> CorpusRowCounts:
    """Input, good and quarantined rows (by ``BadRowKind`` value), counted on the cluster.

    Counted by kind, not by reason: reasons name ids and positions, so nearly
    every one is unique. Each block is counted where it is read, a few rows per
    block reach the driver: a Ray Data aggregate would start its hash-shuffle
    actors for this, ~10 s of CPU even for a hundred rows.
    """
    by_kind: dict[str | None, int] = {}
    for row in rows.map_batches(_count_kinds, batch_format="pyarrow", batch_size=None).iter_rows():
        by_kind[row["kind"]] = by_kind.get(row["kind"], 0) + row["rows"]
    num_input_rows = sum(by_kind.values())
    bad = {kind: count for kind, count in by_kind.items() if kind is not None}
    return CorpusRowCounts(
        num_input_rows=num_input_rows,
        num_good_rows=num_input_rows - sum(bad.values()),
        quarantined_by_kind=bad,
    )


def _count_kinds(block: pa.Table) -> pa.Table:
    """One row per reason kind in `block` (null: good rows) and its number of rows."""
    counts = pc.value_counts(block["reason_kind"])  # nulls counted too, as a null value
    return pa.table({"kind": counts.field("values"), "rows": counts.field("counts")})

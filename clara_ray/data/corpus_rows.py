"""Corpus rows for encoding at scale: parse and validate batches of raw rows (no Ray here).

The Ray side (``corpus_reader.py``) streams files as raw rows and calls these
functions inside ``map_batches``; everything here works on plain column dicts
(``dict[str, list]``) so it can be tested by hand.

Output columns (``ROW_COLUMNS``), one output row per document:

- ``source``: the file the row came from, as Ray Data resolved the path.
- ``row_number``: 1-based physical line number (blank lines included, a skipped
  header too), or for parquet the 1-based row index within the file. A ``clara``
  line holds several documents, which share its row number.
- ``doc_id``, ``text``, ``title``: the document; ``None`` on bad rows (``title``
  is ``None`` when absent or blank).
- ``reason_kind``: ``None`` on good rows, else a ``BadRowKind`` value (a short
  fixed string, used for counting).
- ``reason``: ``None`` on good rows, else a short human reason, e.g.
  ``field 'text' is empty``.
- ``raw``: ``None`` on good rows, else what the row held, capped at
  ``RAW_MAX_CHARS``: the line decoded with undecodable bytes replaced by U+FFFD,
  a JSON rendering of a parquet row, of a ``clara`` document, or of a
  duplicate's parsed document.

Line formats share the rules of ``formats.py``: each line is decoded on its own
(a leading byte-order mark is fine), blank lines are skipped and not counted.
"""

from __future__ import annotations

import csv
import enum
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from clara_ray.data.rows import (
    BadInputError,
    BadRowKind,
    BadRowPolicy,
    RowError,
    check_policy,
    decode,
    identifier,
    json_object,
    non_empty_string,
    optional_title,
    require,
)


class CorpusFormat(enum.Enum):
    JSONL = "jsonl"  # {"id", "text", optional "title"} per line
    PARQUET = "parquet"  # columns id, text, optional title
    DPR_TSV = "dpr_tsv"  # DPR psgs_w100.tsv: id \t "text" \t title
    FLASHRAG = "flashrag"  # {"id", "contents": "title\ntext"} per line
    CLARA = "clara"  # CLaRa training JSONL: documents under "docs"


class CorpusRowError(BadInputError):
    """``BadInputError`` that survives pickling, so it can travel back from a Ray worker."""

    def __reduce__(self):
        return type(self), (self.path, self.line_number, self.reason)


ROW_COLUMNS = ("source", "row_number", "doc_id", "text", "title", "reason_kind", "reason", "raw")
RAW_MAX_CHARS = 2000
DEFAULT_MAX_LINE_BYTES = 8 * 1024 * 1024
DPR_HEADER = ["id", "text", "title"]
# CLaRa's own loader takes the first of these keys whose value is a list.
CLARA_DOCUMENT_KEYS = ("docs", "context", "content")

_EXTENSION_FORMATS = {
    ".jsonl": CorpusFormat.JSONL,
    ".json": CorpusFormat.JSONL,
    ".parquet": CorpusFormat.PARQUET,
    ".tsv": CorpusFormat.DPR_TSV,
}
# Compression Ray Data infers from the file name and undoes while streaming.
_COMPRESSION_EXTENSIONS = (".gz", ".bz2", ".zst", ".lz4")


def detect_corpus_format(path: str, corpus_format: CorpusFormat | None = None) -> CorpusFormat:
    """The explicit ``corpus_format`` if given, else the one the file extension names."""
    if corpus_format is not None:
        if not isinstance(corpus_format, CorpusFormat):
            raise TypeError(f"corpus_format must be a CorpusFormat, got {corpus_format!r}")
        return corpus_format
    suffixes = [suffix.lower() for suffix in PurePosixPath(str(path)).suffixes]
    compressed = bool(suffixes) and suffixes[-1] in _COMPRESSION_EXTENSIONS
    if compressed:
        suffixes.pop()
    detected = _EXTENSION_FORMATS.get(suffixes[-1]) if suffixes else None
    if compressed and detected is CorpusFormat.PARQUET:
        raise ValueError(
            f"{path}: parquet compresses its pages itself; give the plain .parquet file"
        )
    if detected is None:
        known = ", ".join(sorted(_EXTENSION_FORMATS))
        raise ValueError(
            f"cannot tell the corpus format of {path} from its extension (known: {known}); "
            f"pass corpus_format=CorpusFormat.<one of {[f.name for f in CorpusFormat]}>. "
            "flashrag and clara files always need it."
        )
    return detected


def clara_document_id(text: str) -> str:
    """Id of a CLaRa document: its content hash, so reruns, moved files and repeats agree."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


# ---------------------------------------------------------------------------
# Splitting a byte stream into physical lines


def iterate_lines(
    chunks: Iterable[bytes], max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
) -> Iterator[tuple[int, bytes, bool]]:
    """Yield ``(row_number, line, too_long)`` for the non-blank lines of a byte stream.

    Lines are split on ``\\n`` only, their trailing ``\\r`` dropped and a leading
    BOM removed from line 1; bytes are not decoded (a bad byte spoils one row,
    not the file). A line longer than ``max_line_bytes`` comes out cut to that
    length with ``too_long`` set, so memory stays bounded whatever the input.
    """
    row_number = 0
    pieces: list[bytes] = []  # the current line's bytes so far, across chunks
    size = 0
    for chunk in chunks:
        *ended, rest = chunk.split(b"\n")
        for piece in ended:
            if size <= max_line_bytes:
                pieces.append(piece)
                size += len(piece)
            row_number += 1
            line = _finish_line(row_number, b"".join(pieces), size, max_line_bytes)
            if line is not None:
                yield line
            pieces, size = [], 0
        if size <= max_line_bytes:  # past the limit, drop bytes until the next newline
            pieces.append(rest)
            size += len(rest)
    if size:  # a last line without a newline after it
        line = _finish_line(row_number + 1, b"".join(pieces), size, max_line_bytes)
        if line is not None:
            yield line


def _finish_line(
    row_number: int, line: bytes, size: int, max_line_bytes: int
) -> tuple[int, bytes, bool] | None:
    if size > max_line_bytes:
        return row_number, line[:max_line_bytes], True
    if row_number == 1 and line.startswith(b"\xef\xbb\xbf"):
        line = line[3:]
    line = line.rstrip(b"\r")
    if not line.strip():
        return None
    return row_number, line, False


# ---------------------------------------------------------------------------
# Parsed rows (field validation is ``rows.py``'s, shared with the QA readers)


@dataclass(frozen=True)
class ParsedDocument:
    doc_id: str
    text: str
    title: str | None


@dataclass(frozen=True)
class RejectedDocument:
    """A bad document inside a good line (a ``clara`` line holds several documents)."""

    problem: RowError
    raw: str


# ---------------------------------------------------------------------------
# One parser per line format: line bytes -> documents (or raises RowError)


def _parse_jsonl(line: bytes, row_number: int, source: str) -> list[ParsedDocument | RejectedDocument]:
    row = json_object(line)
    return [
        ParsedDocument(
            doc_id=identifier(require(row, "id"), "field 'id'"),
            text=non_empty_string(require(row, "text"), "field 'text'"),
            title=optional_title(row.get("title")),
        )
    ]


def _parse_dpr_tsv(line: bytes, row_number: int, source: str) -> list[ParsedDocument | RejectedDocument]:
    decoded = decode(line)
    if '"' not in decoded:
        fields = decoded.split("\t")  # what the csv module would give, at twice the speed
    else:
        try:
            fields = next(csv.reader([decoded], delimiter="\t", quotechar='"', strict=True))
        except csv.Error as error:
            raise RowError(BadRowKind.MALFORMED_TSV, f"malformed TSV quoting ({error})") from None
    if fields == DPR_HEADER:
        if row_number == 1:
            return []  # the header names the columns; it is not a row
        raise RowError(BadRowKind.MISPLACED_HEADER, "header line 'id, text, title' below line 1")
    if len(fields) != 3:
        raise RowError(
            BadRowKind.WRONG_COLUMN_COUNT,
            f"expected 3 tab-separated columns (id, text, title), got {len(fields)}",
        )
    doc_id, text, title = fields
    return [
        ParsedDocument(
            doc_id=non_empty_string(doc_id, "column 'id'"),
            text=non_empty_string(text, "column 'text'"),
            title=optional_title(title, "column 'title'"),
        )
    ]


def _parse_flashrag(line: bytes, row_number: int, source: str) -> list[ParsedDocument | RejectedDocument]:
    row = json_object(line)
    doc_id = identifier(require(row, "id"), "field 'id'")
    contents = non_empty_string(require(row, "contents"), "field 'contents'")
    if "\n" not in contents:
        raise RowError(
            BadRowKind.NO_TITLE_LINE,
            "field 'contents' has no line break: expected 'title\\ntext' ('\\ntext' for no title)",
        )
    title, text = contents.split("\n", 1)
    if not text.strip():
        raise RowError(BadRowKind.EMPTY_FIELD, "field 'contents' has no text after the title line")
    return [ParsedDocument(doc_id=doc_id, text=text, title=optional_title(title))]


def _parse_clara(line: bytes, row_number: int, source: str) -> list[ParsedDocument | RejectedDocument]:
    return clara_documents(json_object(line), row_number, source)


def clara_documents(row: dict[str, Any], row_number: int, source: str) -> list[ParsedDocument | RejectedDocument]:
    """A CLaRa row's documents, one result per position of its document list (the QA
    readers map ``pos_index`` through it); raises ``RowError`` when there is no list."""
    key = next((key for key in CLARA_DOCUMENT_KEYS if row.get(key) is not None), "docs")
    documents = require(row, key)
    if not isinstance(documents, list):
        raise RowError(
            BadRowKind.WRONG_TYPE, f"field '{key}' must be a list, got {type(documents).__name__}"
        )
    if not documents:
        raise RowError(BadRowKind.EMPTY_FIELD, f"field '{key}' is an empty list")
    results: list[ParsedDocument | RejectedDocument] = []
    first_position: dict[str, int] = {}
    for position, value in enumerate(documents):
        name = f"{key}[{position}]"
        try:
            text = non_empty_string(value, name)
            doc_id = clara_document_id(text)
            # A repeat inside one line must be caught here: the line-level duplicate
            # pass only tells rows apart by (source, row_number).
            if doc_id in first_position:
                raise RowError(
                    BadRowKind.DUPLICATE_ID,
                    f"{name}: duplicate id '{doc_id}' (first at {source}:{row_number}, "
                    f"{key}[{first_position[doc_id]}])",
                )
        except RowError as problem:
            results.append(RejectedDocument(problem, _cap(json.dumps(value, ensure_ascii=False))))
            continue
        first_position[doc_id] = position
        results.append(ParsedDocument(doc_id=doc_id, text=text, title=None))
    return results


_LINE_PARSERS = {
    CorpusFormat.JSONL: _parse_jsonl,
    CorpusFormat.DPR_TSV: _parse_dpr_tsv,
    CorpusFormat.FLASHRAG: _parse_flashrag,
    CorpusFormat.CLARA: _parse_clara,
}


# ---------------------------------------------------------------------------
# Batches


def _empty_columns() -> dict[str, list]:
    return {name: [] for name in ROW_COLUMNS}


def _cap(text: str) -> str:
    return text[:RAW_MAX_CHARS]


def _append_good(
    columns: dict[str, list], source: str, row_number: int, document: ParsedDocument
) -> None:
    values = (source, row_number, document.doc_id, document.text, document.title, None, None, None)
    for name, value in zip(ROW_COLUMNS, values):
        columns[name].append(value)


def _append_bad(
    columns: dict[str, list], source: str, row_number: int, problem: RowError, raw: str
) -> None:
    values = (source, row_number, None, None, None, problem.kind.value, problem.reason, _cap(raw))
    for name, value in zip(ROW_COLUMNS, values):
        columns[name].append(value)


def parse_line_batch(
    batch: Mapping[str, list],
    corpus_format: CorpusFormat,
    on_bad_row: BadRowPolicy = BadRowPolicy.FAIL,
) -> dict[str, list]:
    """Raw lines -> ``ROW_COLUMNS``.

    ``batch`` holds equal-length lists ``source`` (str), ``row_number`` (int),
    ``line`` (bytes, as ``iterate_lines`` yields them) and optionally
    ``line_too_long`` (bool). With ``BadRowPolicy.FAIL`` the batch's first bad
    row raises ``BadInputError``.
    """
    parse = _LINE_PARSERS.get(corpus_format)
    if parse is None:
        raise ValueError(f"{corpus_format} is not a line format")
    too_long = batch.get("line_too_long") or [False] * len(batch["line"])
    columns = _empty_columns()
    for source, row_number, line, cut in zip(
        batch["source"], batch["row_number"], batch["line"], too_long
    ):
        try:
            if cut:
                raise RowError(BadRowKind.LINE_TOO_LONG, f"line longer than {len(line)} bytes")
            results = parse(line, row_number, source)
        except RowError as problem:
            # 4 bytes per character at most: enough for RAW_MAX_CHARS, and a
            # megabyte-long line is not decoded whole just to be cut.
            raw = line[: RAW_MAX_CHARS * 4].decode("utf-8", errors="replace")
            _append_bad(columns, source, row_number, problem, raw)
            continue
        for result in results:
            if isinstance(result, RejectedDocument):
                _append_bad(columns, source, row_number, result.problem, result.raw)
            else:
                _append_good(columns, source, row_number, result)
    return _apply_policy(columns, on_bad_row)


def parse_parquet_batch(
    batch: Mapping[str, list], on_bad_row: BadRowPolicy = BadRowPolicy.FAIL
) -> dict[str, list]:
    """Parquet values -> ``ROW_COLUMNS``.

    ``batch`` holds lists ``source``, ``row_number`` (1-based row index within
    the file), ``id``, ``text`` and optionally ``title``, as Python values.
    """
    titles = batch.get("title") or [None] * len(batch["id"])
    columns = _empty_columns()
    for source, row_number, doc_id, text, title in zip(
        batch["source"], batch["row_number"], batch["id"], batch["text"], titles
    ):
        row = {"id": doc_id, "text": text, "title": title}
        try:
            document = ParsedDocument(
                doc_id=identifier(require(row, "id"), "column 'id'"),
                text=non_empty_string(require(row, "text"), "column 'text'"),
                title=optional_title(title, "column 'title'"),
            )
        except RowError as problem:
            _append_bad(columns, source, row_number, problem, _render(row))
            continue
        _append_good(columns, source, row_number, document)
    return _apply_policy(columns, on_bad_row)


def _render(row: dict[str, Any]) -> str:
    return _cap(json.dumps(row, ensure_ascii=False, default=repr))


def _apply_policy(columns: dict[str, list], on_bad_row: BadRowPolicy) -> dict[str, list]:
    check_policy(on_bad_row)
    if on_bad_row is BadRowPolicy.FAIL:
        for index, reason in enumerate(columns["reason"]):
            if reason is not None:
                raise CorpusRowError(columns["source"][index], columns["row_number"][index], reason)
    return columns


# ---------------------------------------------------------------------------
# Duplicate ids: the first occurrence by (source, row_number) is kept


def order_key(source: str, row_number: int) -> str:
    """A string whose sort order is the order of ``(source, row_number)``.

    NUL sorts below every character a path can hold and the row number is
    zero-padded, so a plain string minimum (what Ray Data's ``Min`` computes)
    finds the first occurrence.
    """
    return f"{source}\x00{row_number:020d}"


def parse_order_key(key: str) -> tuple[str, int]:
    source, row_number = key.rsplit("\x00", 1)
    return source, int(row_number)


def mark_duplicates(
    batch: Mapping[str, list],
    duplicates: Mapping[str, tuple[str, int]],
    on_bad_row: BadRowPolicy = BadRowPolicy.FAIL,
) -> dict[str, list]:
    """Turn every good row whose id is in ``duplicates`` but which is not the kept one bad.

    ``duplicates`` maps an id to the ``(source, row_number)`` of the occurrence
    that is kept (``find_duplicate_ids`` in ``corpus_reader.py``). The marked
    row's document moves into ``raw`` as JSON.
    """
    columns = {name: list(values) for name, values in batch.items()}  # extra columns pass through
    for index, doc_id in enumerate(columns["doc_id"]):
        if columns["reason"][index] is not None or doc_id not in duplicates:
            continue
        kept_source, kept_row = duplicates[doc_id]
        if (columns["source"][index], columns["row_number"][index]) == (kept_source, kept_row):
            continue
        document = {"id": doc_id, "text": columns["text"][index], "title": columns["title"][index]}
        columns["doc_id"][index] = columns["text"][index] = columns["title"][index] = None
        columns["reason_kind"][index] = BadRowKind.DUPLICATE_ID.value
        columns["reason"][index] = f"duplicate id '{doc_id}' (first at {kept_source}:{kept_row})"
        columns["raw"][index] = _render(document)
    return _apply_policy(columns, on_bad_row)


# ---------------------------------------------------------------------------
# Counts


@dataclass(frozen=True)
class CorpusRowCounts:
    """How many rows a corpus read saw, kept and set aside (by ``BadRowKind`` value)."""

    num_input_rows: int
    num_good_rows: int
    quarantined_by_kind: dict[str, int] = field(default_factory=dict)

    @property
    def num_quarantined_rows(self) -> int:
        return sum(self.quarantined_by_kind.values())

    def __post_init__(self) -> None:
        if self.num_input_rows != self.num_good_rows + self.num_quarantined_rows:
            raise ValueError(
                f"num_input_rows={self.num_input_rows} but {self.num_good_rows} good rows "
                f"+ {self.num_quarantined_rows} quarantined rows"
            )

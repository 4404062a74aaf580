"""User file formats: corpus and QA sets as JSON Lines, read with validation.

Corpus JSONL (``corpus.jsonl``): one JSON object per line.

    {"id": "d00042", "text": "Zorvan Kellit grew up in Marlow.", "title": "Zorvan Kellit"}

- ``id``: string (an integer is accepted and converted to its decimal string);
  must not be empty or whitespace-only; unique within the file.
- ``text``: non-empty string (not whitespace-only).
- ``title``: optional string or null (a blank title reads as null).

QA JSONL (``train_qa.jsonl``, ``test_qa.jsonl``): one JSON object per line.

    {"id": "q7", "question": "Where was Zorvan Kellit born?", "answers": ["Marlow"],
     "gold_doc_ids": ["d00042"]}

- ``question``: non-empty string (not whitespace-only).
- ``answers``: non-empty list of non-empty strings; any of them counts as correct.
- ``id``: optional string or integer; defaults to ``q{line_number}``; unique within the file.
- ``gold_doc_ids``: optional list of corpus ids (strings or integers) of the
  documents that hold the answer. Used only for evaluation (Recall@k), never
  for training the retriever.

Rules shared by both formats (validation is ``rows.py``'s; the corpus is parsed by
``corpus_rows.py``, the same code ``clara-ray encode`` runs in Ray Data, so both see
the same bad rows with the same reasons; ``read_corpus`` reads its other formats too):

- Files are UTF-8 (a leading byte-order mark is allowed). Each line is decoded on
  its own, so one undecodable line is one bad row, not a broken file.
- Blank or whitespace-only lines are skipped and are not counted as rows.
- Keys other than the ones above are ignored.
- Line numbers are 1-based physical line numbers, blank lines included, so they
  match what an editor shows.
- A bad row (malformed JSON, not an object, a missing, empty or wrongly typed
  field, undecodable bytes, a duplicate id) is handled by a ``BadRowPolicy``:
  ``FAIL`` raises ``BadInputError`` naming the file, line and reason;
  ``QUARANTINE`` sets the row aside in ``LoadResult.quarantined``. For duplicate
  ids the first occurrence wins and later ones are bad rows.
- Always ``LoadResult.num_input_rows == len(records) + len(quarantined)``.

Quarantine JSONL (written by ``write_quarantine``): one object per set-aside row,
``{"line_number": 12, "reason": "missing field 'text'", "raw": "<the line>"}``,
where ``raw`` is the line decoded with undecodable bytes replaced by U+FFFD. A QA row
set aside after reading because its answer does not fit ``model.answer_max_len``
(clara_ray/data/lengths.py) has ``line_number`` null and the parsed row as ``raw``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pyarrow.parquet as pq

from clara_ray.data.corpus_rows import (
    ROW_COLUMNS,
    CorpusFormat,
    iterate_lines,
    parse_line_batch,
    parse_parquet_batch,
)
from clara_ray.data.rows import (
    BadInputError,
    BadRowKind,
    BadRowPolicy,
    LoadResult,
    QuarantinedRow,
    RowError,
    check_policy,
    identifier,
    json_object,
    non_empty_string,
    require,
    value_list,
)
from clara_ray.errors import DataError


class _HasId(Protocol):
    @property
    def id(self) -> str: ...


T = TypeVar("T", bound=_HasId)

_BATCH_LINES = 1024  # lines parsed per call of the corpus row parser
_READ_BYTES = 1 << 20


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    title: str | None = None


@dataclass(frozen=True)
class QAExample:
    id: str
    question: str
    answers: list[str]
    gold_doc_ids: list[str] = field(default_factory=list)


def file_lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """``(line_number, line, too_long)`` of a file's non-blank lines (see ``iterate_lines``)."""
    with path.open("rb") as handle:
        yield from iterate_lines(iter(lambda: handle.read(_READ_BYTES), b""))


# ---------------------------------------------------------------------------
# Corpus: the corpus row parser that Ray Data's encoding uses, run in this process


def read_corpus(
    path: str | Path,
    on_bad_row: BadRowPolicy = BadRowPolicy.FAIL,
    corpus_format: CorpusFormat = CorpusFormat.JSONL,
) -> LoadResult[Document]:
    """Read a corpus file whole (JSONL as in the module docstring, or any ``CorpusFormat``).

    Rows are validated by ``corpus_rows`` exactly as ``clara-ray encode`` validates
    them, with the same reasons; a duplicate id is a bad row, the first occurrence
    wins. A ``clara`` line holds several documents: each counts as a row.
    """
    check_policy(on_bad_row)
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such corpus file: {path}")
    records: list[Document] = []
    quarantined: list[QuarantinedRow] = []
    first_line: dict[str, int] = {}
    for columns, lines in _parsed_batches(path, corpus_format):
        for source, line_number, doc_id, text, title, _, reason, raw in zip(*(columns[c] for c in ROW_COLUMNS)):
            if reason is None and doc_id in first_line:
                reason = f"duplicate id '{doc_id}' (first at line {first_line[doc_id]})"
                raw = lines.get(line_number) or json.dumps(text, ensure_ascii=False)
            if reason is not None:
                if on_bad_row is BadRowPolicy.FAIL:
                    raise BadInputError(path, line_number, reason)
                quarantined.append(QuarantinedRow(line_number, reason, raw))
                continue
            first_line[doc_id] = line_number
            records.append(Document(doc_id, text, title))
    return LoadResult(records, quarantined, num_input_rows=len(records) + len(quarantined))


def _parsed_batches(path: Path, corpus_format: CorpusFormat) -> Iterator[tuple[dict[str, list], dict[int, str]]]:
    """``ROW_COLUMNS`` batches, with the decoded line of each single-document line (for duplicates' raw)."""
    if corpus_format is CorpusFormat.PARQUET:
        row_number = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=_BATCH_LINES):
            values = batch.to_pydict()
            count = batch.num_rows
            values.update(source=[str(path)] * count, row_number=list(range(row_number + 1, row_number + count + 1)))
            row_number += count
            yield parse_parquet_batch(values, BadRowPolicy.QUARANTINE), {}
        return
    single = corpus_format is not CorpusFormat.CLARA
    batch: list[tuple[int, bytes, bool]] = []
    for line in [*file_lines(path), None]:
        if line is not None:
            batch.append(line)
        if batch and (line is None or len(batch) == _BATCH_LINES):
            numbers, raw_lines, too_long = (list(column) for column in zip(*batch))
            parsed = parse_line_batch(
                {"source": [str(path)] * len(batch), "row_number": numbers, "line": raw_lines, "line_too_long": too_long},
                corpus_format, BadRowPolicy.QUARANTINE,
            )
            decoded = {n: b.decode("utf-8", errors="replace") for n, b in zip(numbers, raw_lines)} if single else {}
            yield parsed, decoded
            batch = []


# ---------------------------------------------------------------------------
# QA JSONL


def _parse_qa(row: dict[str, Any], line_number: int) -> QAExample:
    question = non_empty_string(require(row, "question"), "field 'question'")
    answers = value_list(require(row, "answers"), "answers", non_empty_string, allow_empty=False)
    example_id = row.get("id")
    example_id = f"q{line_number}" if example_id is None else identifier(example_id, "field 'id'")
    gold = row.get("gold_doc_ids")
    gold_doc_ids = [] if gold is None else value_list(gold, "gold_doc_ids", identifier)
    return QAExample(id=example_id, question=question, answers=answers, gold_doc_ids=gold_doc_ids)


def read_jsonl_rows(
    path: str | Path,
    parse_row: Callable[[dict[str, Any], int], list[T | RowError]],
    on_bad_row: BadRowPolicy,
) -> LoadResult[T]:
    """Records of a JSONL file, `parse_row(object, line_number)` giving each line's records
    (a ``RowError`` in place of a bad one, or raising it for the whole line); a line that
    cannot be read is one bad row, and so is each bad record and each record whose id an
    earlier one has."""
    path = Path(path)
    check_policy(on_bad_row)
    if not path.is_file():
        raise DataError(f"no such file: {path}")
    records: list[T] = []
    quarantined: list[QuarantinedRow] = []
    seen_ids: set[str] = set()

    def set_aside(line_number: int, reason: str, raw: bytes) -> None:
        if on_bad_row is BadRowPolicy.FAIL:
            raise BadInputError(path, line_number, reason)
        quarantined.append(QuarantinedRow(line_number, reason, raw.decode("utf-8", errors="replace")))

    for line_number, raw_bytes, too_long in file_lines(path):
        try:
            if too_long:
                raise RowError(BadRowKind.LINE_TOO_LONG, f"line longer than {len(raw_bytes)} bytes")
            parsed = parse_row(json_object(raw_bytes), line_number)
        except RowError as error:
            set_aside(line_number, error.reason, raw_bytes)
            continue
        for record in parsed:
            if isinstance(record, RowError):  # one bad record of a line that holds several
                set_aside(line_number, record.reason, raw_bytes)
                continue
            if record.id in seen_ids:
                set_aside(line_number, f"duplicate id '{record.id}'", raw_bytes)
                continue
            seen_ids.add(record.id)
            records.append(record)
    return LoadResult(records, quarantined, num_input_rows=len(records) + len(quarantined))


def read_qa(
    path: str | Path, on_bad_row: BadRowPolicy = BadRowPolicy.FAIL
) -> LoadResult[QAExample]:
    """Read a QA JSONL file (format in the module docstring)."""
    return read_jsonl_rows(path, lambda row, line_number: [_parse_qa(row, line_number)], on_bad_row)


# ---------------------------------------------------------------------------
# Writing


def _write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Written beside `path` and renamed into place: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.partial")
    with partial.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    partial.replace(path)
    return path


def write_corpus(path: str | Path, documents: Iterable[Document]) -> Path:
    def to_row(document: Document) -> dict[str, Any]:
        row: dict[str, Any] = {"id": document.id, "text": document.text}
        if document.title is not None:
            row["title"] = document.title
        return row

    return _write_jsonl(path, (to_row(document) for document in documents))


def write_qa(path: str | Path, examples: Iterable[QAExample]) -> Path:
    return _write_jsonl(
        path,
        (
            {
                "id": example.id,
                "question": example.question,
                "answers": list(example.answers),
                "gold_doc_ids": list(example.gold_doc_ids),
            }
            for example in examples
        ),
    )


def write_quarantine(path: str | Path, rows: Iterable[QuarantinedRow]) -> Path:
    return _write_jsonl(
        path,
        ({"line_number": row.line_number, "reason": row.reason, "raw": row.raw} for row in rows),
    )

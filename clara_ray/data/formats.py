"""User file formats: corpus and QA sets as JSON Lines, read with validation.

Corpus JSONL (``corpus.jsonl``): one JSON object per line.

    {"id": "d00042", "text": "Zorvan Kellit grew up in Marlow.", "title": "Zorvan Kellit"}

- ``id``: string (an integer is accepted and converted to its decimal string);
  must not be empty or whitespace-only; unique within the file.
- ``text``: non-empty string (not whitespace-only).
- ``title``: optional string or null.

QA JSONL (``train_qa.jsonl``, ``test_qa.jsonl``): one JSON object per line.

    {"id": "q7", "question": "Where was Zorvan Kellit born?", "answers": ["Marlow"],
     "gold_doc_ids": ["d00042"]}

- ``question``: non-empty string (not whitespace-only).
- ``answers``: non-empty list of non-empty strings; any of them counts as correct.
- ``id``: optional string or integer; defaults to ``q{line_number}``; unique within the file.
- ``gold_doc_ids``: optional list of corpus ids (strings or integers) of the
  documents that hold the answer. Used only for evaluation (Recall@k), never
  for training the retriever.

Rules shared by both formats:

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

import enum
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from clara_ray.errors import DataError


class _HasId(Protocol):
    @property
    def id(self) -> str: ...


T = TypeVar("T", bound=_HasId)


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


class BadRowPolicy(enum.Enum):
    QUARANTINE = "quarantine"
    FAIL = "fail"


class BadInputError(DataError):
    """A row of a user file is invalid; the message names file, line and reason."""

    def __init__(self, path: Path, line_number: int, reason: str):
        self.path = path
        self.line_number = line_number
        self.reason = reason
        super().__init__(
            f"{path}, line {line_number}: {reason}. Fix the row, or set data.on_bad_row=quarantine "
            f"to set bad rows aside."
        )


@dataclass(frozen=True)
class QuarantinedRow:
    line_number: int | None  # None: a valid row set aside later (its answer too long); raw is then the row read
    reason: str
    raw: str


@dataclass(frozen=True)
class LoadResult(Generic[T]):
    records: list[T]
    quarantined: list[QuarantinedRow]
    num_input_rows: int

    def __post_init__(self) -> None:
        if self.num_input_rows != len(self.records) + len(self.quarantined):
            raise ValueError(
                f"num_input_rows={self.num_input_rows} but {len(self.records)} records "
                f"+ {len(self.quarantined)} quarantined rows"
            )


class _RowError(Exception):
    """Raised by row parsers; carries the reason only (the reader adds file and line)."""


# ---------------------------------------------------------------------------
# Field validation


def _require_field(row: dict[str, Any], key: str) -> Any:
    if key not in row or row[key] is None:
        raise _RowError(f"missing field '{key}'")
    return row[key]


def _non_empty_string(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise _RowError(f"field '{key}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _RowError(f"field '{key}' is empty")
    return value


def _identifier(value: Any, key: str) -> str:
    # bool is a subclass of int; true/false are never meant as ids.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return _non_empty_string(value, key)


def _string_list(value: Any, key: str, item: Callable[[Any, str], str]) -> list[str]:
    if not isinstance(value, list):
        raise _RowError(f"field '{key}' must be a list, got {type(value).__name__}")
    return [item(element, f"{key}[{index}]") for index, element in enumerate(value)]


def _parse_document(row: dict[str, Any], line_number: int) -> Document:
    title = row.get("title")
    if title is not None and not isinstance(title, str):
        raise _RowError(f"field 'title' must be a string or null, got {type(title).__name__}")
    return Document(
        id=_identifier(_require_field(row, "id"), "id"),
        text=_non_empty_string(_require_field(row, "text"), "text"),
        title=title,
    )


def _parse_qa(row: dict[str, Any], line_number: int) -> QAExample:
    question = _non_empty_string(_require_field(row, "question"), "question")
    answers = _string_list(_require_field(row, "answers"), "answers", _non_empty_string)
    if not answers:
        raise _RowError("field 'answers' is an empty list")
    example_id = row.get("id")
    example_id = f"q{line_number}" if example_id is None else _identifier(example_id, "id")
    gold = row.get("gold_doc_ids")
    gold_doc_ids = [] if gold is None else _string_list(gold, "gold_doc_ids", _identifier)
    return QAExample(id=example_id, question=question, answers=answers, gold_doc_ids=gold_doc_ids)


# ---------------------------------------------------------------------------
# Reading


def _read_jsonl(
    path: str | Path,
    parse_row: Callable[[dict[str, Any], int], T],
    on_bad_row: BadRowPolicy,
) -> LoadResult[T]:
    path = Path(path)
    if not isinstance(on_bad_row, BadRowPolicy):
        raise TypeError(f"on_bad_row must be a BadRowPolicy, got {on_bad_row!r}")
    records: list[T] = []
    quarantined: list[QuarantinedRow] = []
    seen_ids: set[str] = set()
    with path.open("rb") as handle:
        for line_number, raw_bytes in enumerate(handle, start=1):
            if line_number == 1 and raw_bytes.startswith(b"\xef\xbb\xbf"):
                raw_bytes = raw_bytes[3:]
            raw_bytes = raw_bytes.rstrip(b"\r\n")
            if not raw_bytes.strip():
                continue
            try:
                record = parse_row(_decode_object(raw_bytes), line_number)
                if record.id in seen_ids:
                    raise _RowError(f"duplicate id '{record.id}'")
            except _RowError as error:
                if on_bad_row is BadRowPolicy.FAIL:
                    raise BadInputError(path, line_number, str(error)) from None
                raw = raw_bytes.decode("utf-8", errors="replace")
                quarantined.append(QuarantinedRow(line_number, str(error), raw))
                continue
            seen_ids.add(record.id)
            records.append(record)
    return LoadResult(records, quarantined, num_input_rows=len(records) + len(quarantined))


def _decode_object(raw_bytes: bytes) -> dict[str, Any]:
    try:
        text = raw_bytes.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _RowError(f"invalid UTF-8 at byte {error.start}") from None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as error:
        raise _RowError(f"malformed JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(row, dict):
        raise _RowError(f"expected a JSON object, got {type(row).__name__}")
    return row


def read_corpus(
    path: str | Path, on_bad_row: BadRowPolicy = BadRowPolicy.FAIL
) -> LoadResult[Document]:
    """Read a corpus JSONL file (format in the module docstring)."""
    return _read_jsonl(path, _parse_document, on_bad_row)


def read_qa(
    path: str | Path, on_bad_row: BadRowPolicy = BadRowPolicy.FAIL
) -> LoadResult[QAExample]:
    """Read a QA JSONL file (format in the module docstring)."""
    return _read_jsonl(path, _parse_qa, on_bad_row)


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

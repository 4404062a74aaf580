"""Row validation shared by every reader: corpus rows (``corpus_rows.py``, in-process and
in Ray Data), our QA JSONL (``formats.py``) and the QA sets of other projects
(``qa_formats.py``). One place decides what a bad row is and how its reason reads.

A validator raises ``RowError(kind, reason)``; the reader adds the file and the row
and applies the ``BadRowPolicy``: ``FAIL`` raises ``BadInputError``, ``QUARANTINE``
sets the row aside with its reason (``QuarantinedRow``) so that the counts
reconcile (``LoadResult``: rows in = records + quarantined).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from clara_ray.errors import DataError

T = TypeVar("T")


class BadRowPolicy(enum.Enum):
    QUARANTINE = "quarantine"
    FAIL = "fail"


class BadInputError(DataError):
    """A row of a user file is invalid; the message names file, line and reason."""

    def __init__(self, path: Path | str, line_number: int | None, reason: str):
        self.path = path
        self.line_number = line_number
        self.reason = reason
        where = f"{path}, line {line_number}" if line_number is not None else str(path)
        super().__init__(
            f"{where}: {reason}. Fix the row, or set data.on_bad_row=quarantine to set bad rows aside."
        )


class BadRowKind(enum.Enum):
    INVALID_UTF8 = "invalid UTF-8"
    LINE_TOO_LONG = "line too long"
    MALFORMED_JSON = "malformed JSON"
    NOT_AN_OBJECT = "not a JSON object"
    MALFORMED_TSV = "malformed TSV"
    WRONG_COLUMN_COUNT = "wrong number of columns"
    MISPLACED_HEADER = "header line below the top"
    MISSING_FIELD = "missing field"
    WRONG_TYPE = "wrong type"
    EMPTY_FIELD = "empty field"
    NO_TITLE_LINE = "contents without title line"
    DUPLICATE_ID = "duplicate id"
    BAD_VALUE = "bad value"  # well-typed but unusable, e.g. a pos_index outside docs


class RowError(Exception):
    """Raised by validators with the kind and reason; the caller adds file and row."""

    def __init__(self, kind: BadRowKind, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


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


def check_policy(on_bad_row: BadRowPolicy) -> None:
    if not isinstance(on_bad_row, BadRowPolicy):
        raise TypeError(f"on_bad_row must be a BadRowPolicy, got {on_bad_row!r}")


# ---------------------------------------------------------------------------
# Field validators: `name` is how the reason names the value, e.g. "field 'text'"


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def require(row: dict[str, Any], key: str) -> Any:
    if row.get(key) is None:
        raise RowError(BadRowKind.MISSING_FIELD, f"missing field '{key}'")
    return row[key]


def non_empty_string(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise RowError(BadRowKind.WRONG_TYPE, f"{name} must be a string, got {type_name(value)}")
    if not value.strip():
        raise RowError(BadRowKind.EMPTY_FIELD, f"{name} is empty")
    return value


def identifier(value: Any, name: str) -> str:
    # bool is a subclass of int; true/false are never meant as ids.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return non_empty_string(value, name)


def optional_title(value: Any, name: str = "field 'title'") -> str | None:
    """A title, or None when absent or blank."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise RowError(BadRowKind.WRONG_TYPE, f"{name} must be a string or null, got {type(value).__name__}")
    return value if value.strip() else None


def value_list(value: Any, key: str, item: Callable[[Any, str], T], allow_empty: bool = True) -> list[T]:
    """Field `key` as a JSON list whose elements pass `item` (named "field 'key[i]'")."""
    if not isinstance(value, list):
        raise RowError(BadRowKind.WRONG_TYPE, f"field '{key}' must be a list, got {type_name(value)}")
    if not value and not allow_empty:
        raise RowError(BadRowKind.EMPTY_FIELD, f"field '{key}' is an empty list")
    return [item(element, f"field '{key}[{index}]'") for index, element in enumerate(value)]


def decode(line: bytes) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RowError(BadRowKind.INVALID_UTF8, f"invalid UTF-8 at byte {error.start}") from None


def json_object(line: bytes) -> dict[str, Any]:
    try:
        row = json.loads(decode(line))
    except json.JSONDecodeError as error:
        raise RowError(
            BadRowKind.MALFORMED_JSON, f"malformed JSON ({error.msg} at column {error.colno})"
        ) from None
    if not isinstance(row, dict):
        raise RowError(BadRowKind.NOT_AN_OBJECT, f"expected a JSON object, got {type(row).__name__}")
    return row

"""QA sets in other projects' formats, read into ``QAExample`` rows (and the documents they embed).

Formats (``QAFormat``), checked against the files and loaders they come from:

- ``jsonl``: ours (``formats.py``); the corpus is a separate file.
- ``clara_pretrain``: CLaRa's stage-1 data (apple/ml-clara ``example/pretrain_data.jsonl``):
  ``{"data_type": "qa", "question": [...], "answers": [...], "docs": [...]}``, parallel
  question/answer lists (a single string each is accepted too). Gold documents of a
  question: every document of its row.
- ``clara_instruction``: CLaRa's stage-2 data: ``{"question", "docs", "gold_answer",
  "answer"}``; ``gold_answer`` is the reference (``answer`` is a generated one, read
  only when there is no ``gold_answer``). Gold documents: ``pos_index`` when the row
  has one, else none (its documents are retrieved, not known to hold the answer).
- ``clara_end_to_end``: CLaRa's stage-3 data: ``{"question", "docs", "answer",
  "pos_index"}``; ``pos_index`` (required) lists 0-based positions in ``docs`` of the
  gold documents.
  For the three CLaRa formats the documents sit under the first of ``docs`` /
  ``context`` / ``content`` that is a list (CLaRa's loader's order), and the
  reference answer is the first of ``gold_answer``, ``answers``, ``golden_answers``,
  ``answer`` present.
- ``flashrag``: FlashRAG's datasets: ``{"id", "question", "golden_answers": [...]}``;
  no gold documents (Recall@k needs them; answer metrics do not). The corpus is a
  separate file (``--corpus-format flashrag``: ``{"id", "contents": "title\\ntext"}``).
- ``hotpotqa``: HotpotQA's original JSON, one array of ``{"_id", "question", "answer",
  "context": [[title, [sentence, ...]], ...], "supporting_facts": [[title, i], ...]}``.
  A document is a context paragraph (title, its sentences joined); gold documents are
  the paragraphs whose title a supporting fact names.

Embedded documents get content ids, the corpus reader's rule (``corpus_rows``):
``clara_document_id(text)`` for CLaRa documents (the ids ``clara-ray encode --format
clara`` gives the same file), ``clara_document_id("title\\ntext")`` for HotpotQA's. A
document seen again (same id) is merged, and counted in ``num_repeated_documents``.

Counts reconcile as everywhere (``LoadResult``): a row is one question, except that
a line (a HotpotQA array element) that cannot be split into questions is one row.
An embedded document that is bad (e.g. an empty string) is set aside on the corpus
side; a question left with no gold document because of it is a bad row. Line numbers
of HotpotQA rows are 1-based positions in the array.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clara_ray.data.corpus_rows import CLARA_DOCUMENT_KEYS, ParsedDocument, clara_document_id, clara_documents
from clara_ray.data.formats import Document, QAExample, read_jsonl_rows, read_qa
from clara_ray.data.rows import (
    BadInputError,
    BadRowKind,
    BadRowPolicy,
    LoadResult,
    QuarantinedRow,
    RowError,
    check_policy,
    identifier,
    non_empty_string,
    require,
    value_list,
)
from clara_ray.errors import DataError


class QAFormat(enum.Enum):
    JSONL = "jsonl"
    CLARA_PRETRAIN = "clara_pretrain"
    CLARA_INSTRUCTION = "clara_instruction"
    CLARA_END_TO_END = "clara_end_to_end"
    FLASHRAG = "flashrag"
    HOTPOTQA = "hotpotqa"

    @property
    def embeds_documents(self) -> bool:
        return self in _EMBEDDING


_EMBEDDING = {QAFormat.CLARA_PRETRAIN, QAFormat.CLARA_INSTRUCTION, QAFormat.CLARA_END_TO_END, QAFormat.HOTPOTQA}
_ANSWER_KEYS = ("gold_answer", "answers", "golden_answers", "answer")


def qa_format_named(name: str) -> QAFormat:
    try:
        return QAFormat(name)
    except ValueError:
        raise DataError(f"unknown QA format {name!r}; one of {[f.value for f in QAFormat]}") from None


@dataclass(frozen=True)
class QASet:
    questions: LoadResult[QAExample]
    documents: LoadResult[Document] | None  # None: the format keeps its corpus in another file
    num_repeated_documents: int = 0


class _Documents:
    """Embedded documents, merged by id, bad ones set aside with their line."""

    def __init__(self, on_bad_row: BadRowPolicy, path: Path):
        self.on_bad_row, self.path = on_bad_row, path
        self.records: dict[str, Document] = {}
        self.quarantined: list[QuarantinedRow] = []
        self.num_repeats = 0

    def add(self, document: Document) -> str:
        if document.id in self.records:
            self.num_repeats += 1
        else:
            self.records[document.id] = document
        return document.id

    def reject(self, line_number: int, reason: str, raw: str) -> None:
        if self.on_bad_row is BadRowPolicy.FAIL:
            raise BadInputError(self.path, line_number, reason)
        self.quarantined.append(QuarantinedRow(line_number, reason, raw))

    def result(self) -> LoadResult[Document]:
        records = list(self.records.values())
        return LoadResult(records, self.quarantined, len(records) + len(self.quarantined))


# ---------------------------------------------------------------------------
# CLaRa


def _answer_list(value: Any, key: str) -> list[str]:
    if isinstance(value, list):
        return value_list(value, key, non_empty_string, allow_empty=False)
    return [non_empty_string(value, f"field '{key}'")]


def _reference_answers(row: dict[str, Any]) -> list[str]:
    key = next((key for key in _ANSWER_KEYS if row.get(key) is not None), None)
    if key is None:
        raise RowError(BadRowKind.MISSING_FIELD, f"missing answer: none of {list(_ANSWER_KEYS)}")
    return _answer_list(row[key], key)


def _clara_position_ids(row: dict[str, Any], line_number: int, documents: _Documents) -> list[str | None]:
    """The id of the document at each position of the row's list (None: set aside)."""
    ids: list[str | None] = []
    results = clara_documents(row, line_number, str(documents.path))
    texts = row[next(key for key in CLARA_DOCUMENT_KEYS if row.get(key) is not None)]
    for result, text in zip(results, texts):
        if isinstance(result, ParsedDocument):
            ids.append(documents.add(Document(result.doc_id, result.text)))
        elif result.problem.kind is BadRowKind.DUPLICATE_ID:  # the same text twice in one row
            ids.append(documents.add(Document(clara_document_id(text), text)))
        else:
            documents.reject(line_number, result.problem.reason, result.raw)
            ids.append(None)
    return ids


def _gold(ids: list[str]) -> list[str]:
    if not ids:
        raise RowError(BadRowKind.BAD_VALUE, "no gold document left: its documents were set aside")
    return list(dict.fromkeys(ids))


def _clara_pretrain_row(row: dict[str, Any], line_number: int, documents: _Documents) -> list[QAExample | RowError]:
    gold = [doc_id for doc_id in _clara_position_ids(row, line_number, documents) if doc_id is not None]
    if row.get("data_type") == "paraphrase":
        raise RowError(BadRowKind.BAD_VALUE, "data_type 'paraphrase' rows hold no question")
    questions, answers = require(row, "question"), require(row, "answers")
    if isinstance(questions, str):
        questions, answers = [questions], [answers]
    if not isinstance(questions, list) or not isinstance(answers, list):
        raise RowError(BadRowKind.WRONG_TYPE, "fields 'question' and 'answers' must be parallel lists")
    if len(questions) != len(answers):
        raise RowError(BadRowKind.BAD_VALUE, f"{len(questions)} questions but {len(answers)} answers")
    examples: list[QAExample | RowError] = []
    for k, (question, answer) in enumerate(zip(questions, answers)):
        try:
            examples.append(QAExample(
                f"q{line_number}-{k}",
                non_empty_string(question, f"field 'question[{k}]'"),
                _answer_list(answer, f"answers[{k}]"),
                _gold(gold),
            ))
        except RowError as error:
            examples.append(error)
    return examples


def _clara_single_row(
    row: dict[str, Any], line_number: int, documents: _Documents, need_positions: bool
) -> list[QAExample | RowError]:
    position_ids = _clara_position_ids(row, line_number, documents)
    question = non_empty_string(require(row, "question"), "field 'question'")
    answers = _reference_answers(row)
    positions = row.get("pos_index")
    if positions is None and need_positions:
        raise RowError(BadRowKind.MISSING_FIELD, "missing field 'pos_index'")
    gold: list[str] = []
    if positions is not None:
        for position in value_list(positions, "pos_index", _position(len(position_ids))):
            if position_ids[position] is not None:
                gold.append(position_ids[position])
        gold = _gold(gold) if positions else []
    example_id = row.get("id")
    example_id = f"q{line_number}" if example_id is None else identifier(example_id, "field 'id'")
    return [QAExample(example_id, question, answers, gold)]


def _position(num_documents: int) -> Callable[[Any, str], int]:
    def check(value: Any, name: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise RowError(BadRowKind.WRONG_TYPE, f"{name} must be an integer, got {type(value).__name__}")
        if not 0 <= value < num_documents:
            raise RowError(BadRowKind.BAD_VALUE, f"{name} = {value} is outside docs (0..{num_documents - 1})")
        return value

    return check


# ---------------------------------------------------------------------------
# FlashRAG and HotpotQA


def _flashrag_row(row: dict[str, Any], line_number: int) -> list[QAExample | RowError]:
    example_id = row.get("id")
    example_id = f"q{line_number}" if example_id is None else identifier(example_id, "field 'id'")
    question = non_empty_string(require(row, "question"), "field 'question'")
    answers = value_list(require(row, "golden_answers"), "golden_answers", non_empty_string, allow_empty=False)
    return [QAExample(example_id, question, answers)]


def _hotpot_paragraph(value: Any, name: str) -> Document:
    if not (isinstance(value, list) and len(value) == 2):
        raise RowError(BadRowKind.WRONG_TYPE, f"{name} must be [title, [sentence, ...]]")
    title, sentences = non_empty_string(value[0], f"{name}[0]"), value[1]
    if not isinstance(sentences, list) or not all(isinstance(sentence, str) for sentence in sentences):
        raise RowError(BadRowKind.WRONG_TYPE, f"{name}[1] must be a list of sentences (strings)")
    text = non_empty_string("".join(sentences).strip(), f"{name}[1]")
    return Document(clara_document_id(f"{title}\n{text}"), text, title)


def _hotpot_fact_title(value: Any, name: str) -> str:
    if not (isinstance(value, list) and len(value) == 2):
        raise RowError(BadRowKind.WRONG_TYPE, f"{name} must be [title, sentence index]")
    return non_empty_string(value[0], f"{name}[0]")


def _hotpot_row(row: dict[str, Any], line_number: int, documents: _Documents) -> list[QAExample | RowError]:
    example_id = row.get("_id", row.get("id"))
    example_id = f"q{line_number}" if example_id is None else identifier(example_id, "field '_id'")
    question = non_empty_string(require(row, "question"), "field 'question'")
    answers = _answer_list(require(row, "answer"), "answer")
    paragraphs = value_list(require(row, "context"), "context", _hotpot_paragraph, allow_empty=False)
    titles = set(value_list(require(row, "supporting_facts"), "supporting_facts", _hotpot_fact_title))
    gold = [documents.add(p) for p in paragraphs if p.title in titles]
    for paragraph in paragraphs:
        if paragraph.title not in titles:
            documents.add(paragraph)
    return [QAExample(example_id, question, answers, gold)]


def _read_hotpotqa(path: Path, on_bad_row: BadRowPolicy, documents: _Documents) -> LoadResult[QAExample]:
    try:
        items = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: not a HotpotQA JSON file ({error})") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: HotpotQA's JSON is one array of questions, got a {type(items).__name__}")
    records: list[QAExample] = []
    quarantined: list[QuarantinedRow] = []
    seen: set[str] = set()
    for position, item in enumerate(items, start=1):
        try:
            if not isinstance(item, dict):
                raise RowError(BadRowKind.NOT_AN_OBJECT, f"expected a JSON object, got {type(item).__name__}")
            (example,) = _hotpot_row(item, position, documents)
            if example.id in seen:
                raise RowError(BadRowKind.DUPLICATE_ID, f"duplicate id '{example.id}'")
        except RowError as error:
            if on_bad_row is BadRowPolicy.FAIL:
                raise BadInputError(path, position, error.reason) from None
            quarantined.append(QuarantinedRow(position, error.reason, json.dumps(item, ensure_ascii=False)[:2000]))
            continue
        seen.add(example.id)
        records.append(example)
    return LoadResult(records, quarantined, len(records) + len(quarantined))


# ---------------------------------------------------------------------------


def read_qa_set(path: str | Path, qa_format: QAFormat, on_bad_row: BadRowPolicy = BadRowPolicy.QUARANTINE) -> QASet:
    """The questions of a QA file in `qa_format`, and the documents it embeds."""
    check_policy(on_bad_row)
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such QA file: {path}")
    documents = _Documents(on_bad_row, path)
    if qa_format is QAFormat.JSONL:
        questions = read_qa(path, on_bad_row)
    elif qa_format is QAFormat.FLASHRAG:
        questions = read_jsonl_rows(path, _flashrag_row, on_bad_row)
    elif qa_format is QAFormat.HOTPOTQA:
        questions = _read_hotpotqa(path, on_bad_row, documents)
    else:
        parse = {
            QAFormat.CLARA_PRETRAIN: lambda row, n: _clara_pretrain_row(row, n, documents),
            QAFormat.CLARA_INSTRUCTION: lambda row, n: _clara_single_row(row, n, documents, need_positions=False),
            QAFormat.CLARA_END_TO_END: lambda row, n: _clara_single_row(row, n, documents, need_positions=True),
        }[qa_format]
        questions = read_jsonl_rows(path, parse, on_bad_row)
    if not questions.records:
        first = f" (line {questions.quarantined[0].line_number}: {questions.quarantined[0].reason})" if questions.quarantined else ""
        raise DataError(
            f"{path}: no question reads as {qa_format.value}{first}; is the format right? "
            f"(one of {[f.value for f in QAFormat]})"
        )
    if not qa_format.embeds_documents:
        return QASet(questions, None)
    return QASet(questions, documents.result(), documents.num_repeats)

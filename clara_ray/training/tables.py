"""The training data of a run as Arrow files, written once by the driver and read
by whoever needs rows (no Ray here):

    data/documents.arrow        id, text, title   the corpus, in the order examples refer to
                                                  (text as the compressor reads it, title included)
    data/stage1_examples.arrow  document, question, answer, neighbours, rivals
    data/stage2_examples.arrow  the same columns (QA examples only)
    data/stage3_questions.arrow question_id, question, answer, gold_doc_ids

Examples name documents by their row in ``documents.arrow`` (an int), so an
example is a few dozen bytes whatever the documents' length. Readers memory-map
the files (Arrow IPC, uncompressed): a worker touches only the pages of the rows
it reads, and the processes of a node share those pages instead of each holding
a copy of the corpus. The draw plan (``training.data``) turns example rows into
each worker's micro-batches through Ray Data; a step then reads the texts of the
1-5 documents an example needs from ``DocumentTable``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa

from clara_ray.training.examples import QuestionBatch, Stage1Example

DOCUMENTS = "documents.arrow"

_EXAMPLE_SCHEMA = pa.schema([
    ("document", pa.int64()),
    ("question", pa.string()),
    ("answer", pa.string()),
    ("neighbours", pa.list_(pa.int64())),
    ("rivals", pa.list_(pa.int64())),
    ("rival_answers", pa.list_(pa.string())),
])
_QUESTION_SCHEMA = pa.schema([
    ("question_id", pa.string()),
    ("question", pa.string()),
    ("answer", pa.string()),
    ("gold_doc_ids", pa.list_(pa.string())),
])


def _write(path: Path, table: pa.Table) -> Path:
    """Whole or not at all: written beside its place, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with pa.OSFile(str(partial), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=64 * 1024)
    os.replace(partial, path)
    return path


def read_table(path: str | os.PathLike) -> pa.Table:
    """The file's rows, memory-mapped (no copy)."""
    return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()


def write_documents(path: str | os.PathLike, documents: dict[str, str],
                    titles: dict[str, str | None] | None = None) -> Path:
    """id, text (what the compressor reads: ``document_input``, title included) and
    title (null where a document has none) of every document."""
    titles = titles or {}
    return _write(Path(path), pa.table({"id": list(documents), "text": list(documents.values()),
                                        "title": pa.array([titles.get(d) for d in documents], pa.string())}))


def write_examples(path: str | os.PathLike, examples: list[Stage1Example]) -> Path:
    return _write(Path(path), pa.Table.from_pylist([
        {"document": e.document, "question": e.question, "answer": e.answer,
         "neighbours": list(e.neighbours), "rivals": list(e.rivals), "rival_answers": list(e.rival_answers)}
        for e in examples
    ], schema=_EXAMPLE_SCHEMA))


def write_questions(path: str | os.PathLike, questions: QuestionBatch) -> Path:
    gold = questions.gold_doc_ids or [()] * len(questions)
    return _write(Path(path), pa.table({
        "question_id": questions.question_ids, "question": questions.questions, "answer": questions.answers,
        "gold_doc_ids": [list(g) for g in gold],
    }, schema=_QUESTION_SCHEMA))


def example_from_row(row: dict) -> Stage1Example:
    return Stage1Example(row["document"], row["question"], row["answer"], tuple(row["neighbours"]), tuple(row["rivals"]),
                         tuple(row["rival_answers"]))


def questions_from_rows(rows: list[dict]) -> QuestionBatch:
    gold = [tuple(r["gold_doc_ids"]) for r in rows]
    return QuestionBatch([r["question_id"] for r in rows], [r["question"] for r in rows], [r["answer"] for r in rows],
                         gold if any(gold) else None)


def read_examples(path: str | os.PathLike) -> list[Stage1Example]:
    return [example_from_row(row) for row in read_table(path).to_pylist()]


def read_answer_pool(path: str | os.PathLike) -> list[str]:
    """``batches.answer_pool`` of an examples file, reading only its answer column."""
    return sorted(set(read_table(path).column("answer").drop_null().to_pylist()))


class DocumentTable:
    """The corpus's texts by row, memory-mapped: ``table[i]`` is document i's text."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self._text = read_table(path).column("text")
        self._row_of: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self._text)

    def __getitem__(self, row: int) -> str:
        return self._text[row].as_py()

    def texts_of(self, doc_ids: list[str]) -> list[str]:
        """Texts by document id (the id -> row map is built on the first call)."""
        if self._row_of is None:
            self._row_of = {d: i for i, d in enumerate(read_table(self.path).column("id").to_pylist())}
        return [self[self._row_of[d]] for d in doc_ids]

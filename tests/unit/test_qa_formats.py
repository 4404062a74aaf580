"""QA readers for CLaRa's, FlashRAG's and HotpotQA's formats: gold ids, counts, bad rows."""

import json

import pytest

from clara_ray.data.corpus_rows import clara_document_id
from clara_ray.data.formats import BadInputError, BadRowPolicy
from clara_ray.data.qa_formats import QAFormat, qa_format_named, read_qa_set
from clara_ray.errors import DataError

QUARANTINE = BadRowPolicy.QUARANTINE


def _jsonl(path, rows) -> str:
    path.write_text("\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows) + "\n")
    return path


def test_clara_pretrain_gold_is_every_document_of_the_row(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [
        {"data_type": "qa", "question": ["Who?", "When?"], "answers": ["Ada", "1843"], "docs": ["Ada wrote notes in 1843."]},
        {"data_type": "qa", "question": ["Where?"], "answers": ["Marlow"], "docs": ["Born in Marlow.", "A second page."]},
        "{not json",
        {"data_type": "qa", "question": ["A?", "B?"], "answers": ["a"], "docs": ["x y"]},  # lengths differ
        {"data_type": "qa", "question": ["Fine?", ""], "answers": ["yes", "no"], "docs": ["Ada wrote notes in 1843."]},
        {"data_type": "qa", "question": ["Empty doc?"], "answers": ["z"], "docs": ["  ", "Kept text."]},
    ])
    loaded = read_qa_set(path, QAFormat.CLARA_PRETRAIN, QUARANTINE)
    questions, documents = loaded.questions, loaded.documents
    ada = clara_document_id("Ada wrote notes in 1843.")
    assert [(q.id, q.answers, q.gold_doc_ids) for q in questions.records[:3]] == [
        ("q1-0", ["Ada"], [ada]), ("q1-1", ["1843"], [ada]),
        ("q2-0", ["Marlow"], [clara_document_id("Born in Marlow."), clara_document_id("A second page.")]),
    ]
    # Rows are questions; a line that cannot be split into questions is one row.
    assert [r.line_number for r in questions.quarantined] == [3, 4, 5]
    assert "question[1]' is empty" in questions.quarantined[2].reason
    assert questions.num_input_rows == len(questions.records) + len(questions.quarantined) == 8
    # Documents: merged by content id (row 5 repeats row 1's), the blank one set aside;
    # a line whose questions are bad still gives its documents, as `encode --format clara` does.
    assert loaded.num_repeated_documents == 1
    assert len(documents.records) == 5 and [r.line_number for r in documents.quarantined] == [6]
    assert questions.records[-1].gold_doc_ids == [clara_document_id("Kept text.")]


def test_clara_instruction_and_end_to_end(tmp_path):
    docs = ["First passage.", "Second passage.", "Third passage."]
    ids = [clara_document_id(d) for d in docs]
    instruction = _jsonl(tmp_path / "i.jsonl", [
        {"question": "Q1?", "docs": docs, "gold_answer": "Ref", "answer": "A generated answer"},
        {"question": "Q2?", "docs": docs, "answer": "Only generated"},
        {"question": "Q3?", "docs": docs},
    ])
    loaded = read_qa_set(instruction, QAFormat.CLARA_INSTRUCTION, QUARANTINE)
    assert [(q.answers, q.gold_doc_ids) for q in loaded.questions.records] == [(["Ref"], []), (["Only generated"], [])]
    assert "missing answer" in loaded.questions.quarantined[0].reason
    assert len(loaded.documents.records) == 3 and loaded.num_repeated_documents == 6

    end_to_end = _jsonl(tmp_path / "e.jsonl", [
        {"question": "Q1?", "docs": docs, "answer": "A", "pos_index": [2, 0]},
        {"question": "Q2?", "docs": docs, "answer": "B"},
        {"question": "Q3?", "docs": docs, "answer": "C", "pos_index": [3]},
        {"question": "Q4?", "context": docs, "answer": "D", "pos_index": [1]},
    ])
    loaded = read_qa_set(end_to_end, QAFormat.CLARA_END_TO_END, QUARANTINE)
    assert [q.gold_doc_ids for q in loaded.questions.records] == [[ids[2], ids[0]], [ids[1]]]
    reasons = [r.reason for r in loaded.questions.quarantined]
    assert "missing field 'pos_index'" in reasons[0] and "outside docs" in reasons[1]
    assert loaded.questions.num_input_rows == 4


def test_flashrag_has_no_embedded_corpus(tmp_path):
    path = _jsonl(tmp_path / "f.jsonl", [
        {"id": "test_0", "question": "who?", "golden_answers": ["Ada", "Ada Lovelace"], "metadata": {}},
        {"id": "test_1", "question": "when?", "golden_answers": []},
        {"id": "test_0", "question": "dup?", "golden_answers": ["x"]},
    ])
    loaded = read_qa_set(path, QAFormat.FLASHRAG, QUARANTINE)
    assert loaded.documents is None
    assert [(q.id, q.answers, q.gold_doc_ids) for q in loaded.questions.records] == [("test_0", ["Ada", "Ada Lovelace"], [])]
    assert ["empty list" in r.reason or "duplicate id" in r.reason for r in loaded.questions.quarantined] == [True, True]


def test_hotpotqa_paragraphs_and_supporting_facts(tmp_path):
    item = {
        "_id": "5a8b", "question": "Which came first?", "answer": "Alpha", "type": "comparison", "level": "hard",
        "context": [["Alpha", ["Alpha is old.", " It began in 1900."]], ["Beta", ["Beta is new."]],
                    ["Gamma", ["Unrelated."]]],
        "supporting_facts": [["Alpha", 0], ["Beta", 0]],
    }
    second = dict(item, _id="5a8c", supporting_facts=[["Gamma", 0]])
    bad = dict(item, _id="5a8d", context="not a list")
    path = tmp_path / "hotpot.json"
    path.write_text(json.dumps([item, second, bad]))
    loaded = read_qa_set(path, QAFormat.HOTPOTQA, QUARANTINE)
    alpha = clara_document_id("Alpha\nAlpha is old. It began in 1900.")
    first, other = loaded.questions.records
    assert first.gold_doc_ids == [alpha, clara_document_id("Beta\nBeta is new.")]
    assert other.gold_doc_ids == [clara_document_id("Gamma\nUnrelated.")]
    assert [d.title for d in loaded.documents.records] == ["Alpha", "Beta", "Gamma"]
    assert loaded.documents.records[0].text == "Alpha is old. It began in 1900."
    assert loaded.num_repeated_documents == 3
    assert loaded.questions.quarantined[0].line_number == 3 and loaded.questions.num_input_rows == 3
    with pytest.raises(BadInputError, match="context"):
        read_qa_set(path, QAFormat.HOTPOTQA, BadRowPolicy.FAIL)


def test_user_mistakes_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="no such QA file"):
        read_qa_set(tmp_path / "missing.jsonl", QAFormat.JSONL)
    flashrag = _jsonl(tmp_path / "f.jsonl", [{"id": "a", "question": "q?", "golden_answers": ["x"]}])
    with pytest.raises(DataError, match="is the format right"):
        read_qa_set(flashrag, QAFormat.CLARA_PRETRAIN)
    with pytest.raises(DataError, match="unknown QA format"):
        qa_format_named("squad")

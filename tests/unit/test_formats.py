import json

import pytest

from clara_ray.data.formats import (
    BadInputError,
    BadRowPolicy,
    Document,
    LoadResult,
    QAExample,
    QuarantinedRow,
    read_corpus,
    read_qa,
    write_corpus,
    write_qa,
    write_quarantine,
)


def _write_lines(path, lines: list[bytes | str]) -> None:
    encoded = [line.encode() if isinstance(line, str) else line for line in lines]
    path.write_bytes(b"\n".join(encoded) + b"\n")


def test_corpus_round_trip(tmp_path):
    documents = [
        Document("d1", "Plain text."),
        Document("d2", "Ünïcode text — ok", title="A title"),
    ]
    path = write_corpus(tmp_path / "sub" / "corpus.jsonl", documents)
    result = read_corpus(path, BadRowPolicy.FAIL)
    assert result.records == documents
    assert result.quarantined == [] and result.num_input_rows == 2


def test_qa_round_trip(tmp_path):
    examples = [
        QAExample("q1", "Who?", ["Ada", "Ada Lovelace"], gold_doc_ids=["d1"]),
        QAExample("q2", "When?", ["1843"]),
    ]
    path = write_qa(tmp_path / "qa.jsonl", examples)
    assert read_qa(path, BadRowPolicy.FAIL).records == examples


def test_integer_ids_become_strings_and_qa_id_defaults_to_line_number(tmp_path):
    _write_lines(tmp_path / "c.jsonl", ['{"id": 7, "text": "seven"}'])
    assert read_corpus(tmp_path / "c.jsonl").records == [Document("7", "seven")]
    _write_lines(
        tmp_path / "q.jsonl",
        ["", '{"question": "Q?", "answers": ["A"], "gold_doc_ids": [7]}'],
    )
    assert read_qa(tmp_path / "q.jsonl").records == [QAExample("q2", "Q?", ["A"], ["7"])]


def test_blank_lines_are_skipped_and_not_counted(tmp_path):
    _write_lines(
        tmp_path / "c.jsonl",
        ['{"id": "a", "text": "x"}', "", "   \t", '{"id": "b", "text": "y"}\r'],
    )
    result = read_corpus(tmp_path / "c.jsonl", BadRowPolicy.QUARANTINE)
    assert [document.id for document in result.records] == ["a", "b"]
    assert result.num_input_rows == 2 and result.quarantined == []


def test_byte_order_mark_is_accepted(tmp_path):
    (tmp_path / "c.jsonl").write_bytes(b'\xef\xbb\xbf{"id": "a", "text": "x"}\n')
    assert read_corpus(tmp_path / "c.jsonl").records == [Document("a", "x")]


BAD_CORPUS_ROWS = [
    (b"{not json", "malformed JSON"),
    (b'["a", "b"]', "expected a JSON object"),
    (b'{"text": "no id"}', "missing field 'id'"),
    (b'{"id": "  ", "text": "blank id"}', "field 'id' is empty"),
    (b'{"id": true, "text": "bool id"}', "field 'id' must be a string"),
    (b'{"id": "x1"}', "missing field 'text'"),
    (b'{"id": "x2", "text": " \\n "}', "field 'text' is empty"),
    (b'{"id": "x3", "text": 5}', "field 'text' must be a string"),
    (b'{"id": "x4", "text": "t", "title": 3}', "field 'title' must be a string or null"),
    (b'{"id": "x5", "text": "caf\xe9"}', "invalid UTF-8"),
    (b'{"id": "good", "text": "again"}', "duplicate id 'good'"),
]


def _bad_corpus(tmp_path):
    lines = [b'{"id": "good", "text": "first wins"}'] + [row for row, _ in BAD_CORPUS_ROWS]
    _write_lines(tmp_path / "corpus.jsonl", lines)
    return tmp_path / "corpus.jsonl"


def test_bad_corpus_rows_are_quarantined_with_reasons(tmp_path):
    result = read_corpus(_bad_corpus(tmp_path), BadRowPolicy.QUARANTINE)
    assert result.records == [Document("good", "first wins")]
    assert result.num_input_rows == len(result.records) + len(result.quarantined) == 12
    assert [row.line_number for row in result.quarantined] == list(range(2, 13))
    for row, (raw, expected_reason) in zip(result.quarantined, BAD_CORPUS_ROWS):
        assert expected_reason in row.reason
        assert row.raw == raw.decode("utf-8", errors="replace")


def test_fail_policy_names_file_line_and_reason(tmp_path):
    path = _bad_corpus(tmp_path)
    with pytest.raises(BadInputError) as raised:
        read_corpus(path, BadRowPolicy.FAIL)
    message = str(raised.value)
    assert str(path) in message and "line 2" in message and "malformed JSON" in message
    assert raised.value.line_number == 2


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ('{"answers": ["a"]}', "missing field 'question'"),
        ('{"question": "", "answers": ["a"]}', "field 'question' is empty"),
        ('{"question": "Q?"}', "missing field 'answers'"),
        ('{"question": "Q?", "answers": []}', "empty list"),
        ('{"question": "Q?", "answers": "a"}', "field 'answers' must be a list"),
        ('{"question": "Q?", "answers": ["a", " "]}', "field 'answers[1]' is empty"),
        ('{"question": "Q?", "answers": [1]}', "field 'answers[0]' must be a string"),
        (
            '{"question": "Q?", "answers": ["a"], "gold_doc_ids": "d1"}',
            "field 'gold_doc_ids' must be a list",
        ),
        ('{"question": "Q?", "answers": ["a"], "id": ""}', "field 'id' is empty"),
    ],
)
def test_bad_qa_rows(tmp_path, row, reason):
    _write_lines(tmp_path / "qa.jsonl", ['{"id": "ok", "question": "Q?", "answers": ["a"]}', row])
    result = read_qa(tmp_path / "qa.jsonl", BadRowPolicy.QUARANTINE)
    assert [example.id for example in result.records] == ["ok"]
    (quarantined,) = result.quarantined
    assert quarantined.line_number == 2 and reason in quarantined.reason
    with pytest.raises(BadInputError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        read_qa(tmp_path / "qa.jsonl", BadRowPolicy.FAIL)


def test_duplicate_qa_id_from_default_collides(tmp_path):
    _write_lines(
        tmp_path / "qa.jsonl",
        [
            '{"id": "q2", "question": "A?", "answers": ["a"]}',
            '{"question": "B?", "answers": ["b"]}',
        ],
    )
    result = read_qa(tmp_path / "qa.jsonl", BadRowPolicy.QUARANTINE)
    assert [example.question for example in result.records] == ["A?"]
    assert result.quarantined[0].reason == "duplicate id 'q2'"


def test_write_quarantine(tmp_path):
    rows = [
        QuarantinedRow(3, "malformed JSON", "{oops"),
        QuarantinedRow(9, "duplicate id 'x'", "é"),
    ]
    path = write_quarantine(tmp_path / "quarantine.jsonl", rows)
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert lines == [
        {"line_number": 3, "reason": "malformed JSON", "raw": "{oops"},
        {"line_number": 9, "reason": "duplicate id 'x'", "raw": "é"},
    ]


def test_load_result_checks_its_counts():
    with pytest.raises(ValueError):
        LoadResult(records=[Document("a", "x")], quarantined=[], num_input_rows=2)


def test_policy_must_be_an_enum(tmp_path):
    _write_lines(tmp_path / "c.jsonl", ['{"id": "a", "text": "x"}'])
    with pytest.raises(TypeError):
        read_corpus(tmp_path / "c.jsonl", "quarantine")

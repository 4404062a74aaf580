"""Corpus row parsing without Ray: formats, every bad-row kind, policies, duplicates, counts."""

import hashlib
import json

import pytest

from clara_ray.data.corpus_rows import (
    RAW_MAX_CHARS,
    ROW_COLUMNS,
    BadRowKind,
    CorpusFormat,
    CorpusRowCounts,
    CorpusRowError,
    clara_document_id,
    detect_corpus_format,
    iterate_lines,
    mark_duplicates,
    order_key,
    parse_line_batch,
    parse_order_key,
    parse_parquet_batch,
)
from clara_ray.data.formats import BadInputError, BadRowPolicy

QUARANTINE = BadRowPolicy.QUARANTINE


def _parse(corpus_format: CorpusFormat, lines: list[bytes], policy=QUARANTINE) -> list[dict]:
    """Parse lines numbered 1, 2, ... of a file called 'f' and return the rows as dicts."""
    batch = {
        "source": ["f"] * len(lines),
        "row_number": list(range(1, len(lines) + 1)),
        "line": lines,
    }
    columns = parse_line_batch(batch, corpus_format, policy)
    return [dict(zip(ROW_COLUMNS, values)) for values in zip(*(columns[n] for n in ROW_COLUMNS))]


def _good(row: dict) -> tuple:
    assert row["reason"] is None and row["reason_kind"] is None and row["raw"] is None, row
    return row["doc_id"], row["text"], row["title"]


def _bad(row: dict) -> tuple:
    assert row["doc_id"] is None and row["text"] is None and row["raw"] is not None, row
    return row["reason_kind"], row["reason"]


# ---------------------------------------------------------------------------
# Format detection


@pytest.mark.parametrize(
    "path, expected",
    [
        ("corpus.jsonl", CorpusFormat.JSONL),
        ("s3://bucket/dir/corpus.JSON", CorpusFormat.JSONL),
        ("corpus.jsonl.gz", CorpusFormat.JSONL),
        ("part-0.parquet", CorpusFormat.PARQUET),
        ("/data/psgs_w100.tsv", CorpusFormat.DPR_TSV),
        ("psgs_w100.tsv.gz", CorpusFormat.DPR_TSV),
    ],
)
def test_format_is_detected_from_the_extension(path, expected):
    assert detect_corpus_format(path) is expected


def test_explicit_format_overrides_the_extension():
    assert detect_corpus_format("wiki.jsonl", CorpusFormat.FLASHRAG) is CorpusFormat.FLASHRAG
    assert detect_corpus_format("some/dir", CorpusFormat.CLARA) is CorpusFormat.CLARA


@pytest.mark.parametrize("path", ["corpus.txt", "some/dir", "corpus.csv", "corpus.parquet.gz"])
def test_unknown_extension_asks_for_an_explicit_format(path):
    with pytest.raises(ValueError, match=r"\.parquet|corpus_format"):
        detect_corpus_format(path)


def test_format_must_be_the_enum():
    with pytest.raises(TypeError, match="CorpusFormat"):
        detect_corpus_format("corpus.jsonl", "jsonl")


# ---------------------------------------------------------------------------
# Lines


def test_lines_keep_physical_numbers_across_chunks_and_skip_blanks():
    data = b"\xef\xbb\xbfone\r\n\n  \t\ntwo\n\xff\xfe\nlast without newline"
    expected = [(1, b"one", False), (4, b"two", False), (5, b"\xff\xfe", False)]
    expected.append((6, b"last without newline", False))
    for chunk_size in (1, 2, 3, 7, len(data)):
        chunks = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]
        assert list(iterate_lines(chunks)) == expected, chunk_size


def test_a_line_over_the_limit_is_cut_and_flagged_and_the_next_line_is_whole():
    data = b"a" * 25 + b"\nshort\n" + b"b" * 11
    chunks = [data[i : i + 4] for i in range(0, len(data), 4)]
    assert list(iterate_lines(chunks, max_line_bytes=10)) == [
        (1, b"a" * 10, True),
        (2, b"short", False),
        (3, b"b" * 10, True),
    ]


def test_a_too_long_line_is_a_bad_row():
    batch = {"source": ["f"], "row_number": [3], "line": [b"x" * 10], "line_too_long": [True]}
    columns = parse_line_batch(batch, CorpusFormat.JSONL, QUARANTINE)
    assert columns["reason_kind"] == [BadRowKind.LINE_TOO_LONG.value]
    assert columns["reason"] == ["line longer than 10 bytes"]


# ---------------------------------------------------------------------------
# Each format on a small hand-written file


def test_jsonl_rows():
    rows = _parse(
        CorpusFormat.JSONL,
        [
            b'{"id": "d1", "text": "Plain text.", "title": "A title"}',
            b'{"id": 7, "text": "Integer id", "title": null, "extra": 1}',
            '{"id": "d3", "text": "Ünïcode — ok", "title": "  "}'.encode(),
        ],
    )
    assert [_good(row) for row in rows] == [
        ("d1", "Plain text.", "A title"),
        ("7", "Integer id", None),
        ("d3", "Ünïcode — ok", None),
    ]
    assert [(row["source"], row["row_number"]) for row in rows] == [("f", 1), ("f", 2), ("f", 3)]


def test_dpr_tsv_rows_header_and_quoting():
    rows = _parse(
        CorpusFormat.DPR_TSV,
        [
            b"id\ttext\ttitle",
            '1\t"Aaron Aaron ( or ; ""Ahärôn"") is a prophet"\tAaron'.encode(),
            b'2\tUnquoted text, with a comma\tTitle with "quote" inside',
            b'3\t"Text with a\ttab inside quotes"\t',
        ],
    )
    assert [_good(row) for row in rows] == [
        ("1", 'Aaron Aaron ( or ; "Ahärôn") is a prophet', "Aaron"),
        ("2", "Unquoted text, with a comma", 'Title with "quote" inside'),
        ("3", "Text with a\ttab inside quotes", None),
    ]
    assert [row["row_number"] for row in rows] == [2, 3, 4]


def test_flashrag_rows_split_title_from_text():
    rows = _parse(
        CorpusFormat.FLASHRAG,
        [
            json.dumps({"id": "0", "contents": '"Aaron"\nAaron Aaron is a prophet.'}).encode(),
            json.dumps({"id": 1, "contents": "Title\nFirst line.\nSecond line."}).encode(),
            json.dumps({"id": "2", "contents": "\nText without a title."}).encode(),
        ],
    )
    assert [_good(row) for row in rows] == [
        ("0", "Aaron Aaron is a prophet.", '"Aaron"'),
        ("1", "First line.\nSecond line.", "Title"),
        ("2", "Text without a title.", None),
    ]


def test_clara_rows_one_per_document_with_content_hash_ids():
    line = {
        "data_type": "qa",
        "question": ["Who?"],
        "answers": ["Ada"],
        "docs": ["First document.", "Second document."],
    }
    rows = _parse(
        CorpusFormat.CLARA,
        [json.dumps(line).encode(), json.dumps({"context": ["Third document."]}).encode()],
    )
    texts = ["First document.", "Second document.", "Third document."]
    assert [_good(row) for row in rows] == [(clara_document_id(t), t, None) for t in texts]
    assert [row["row_number"] for row in rows] == [1, 1, 2]
    expected_id = hashlib.sha256(b"First document.").hexdigest()[:32]
    assert rows[0]["doc_id"] == expected_id  # stable across runs and machines


def test_parquet_rows():
    batch = {
        "source": ["p"] * 3,
        "row_number": [1, 2, 3],
        "id": ["a", 5, "c"],
        "text": ["Text a", "Text five", "Text c"],
        "title": ["Title", None, ""],
    }
    columns = parse_parquet_batch(batch, QUARANTINE)
    assert list(zip(columns["doc_id"], columns["text"], columns["title"])) == [
        ("a", "Text a", "Title"),
        ("5", "Text five", None),
        ("c", "Text c", None),
    ]


# ---------------------------------------------------------------------------
# Every bad-row kind, with its reason

JSONL_BAD_LINES = [
    (b"{not json", BadRowKind.MALFORMED_JSON, "malformed JSON (Expecting property name"),
    (b'["a", "b"]', BadRowKind.NOT_AN_OBJECT, "expected a JSON object, got list"),
    (b'"just a string"', BadRowKind.NOT_AN_OBJECT, "expected a JSON object, got str"),
    (b'{"text": "no id"}', BadRowKind.MISSING_FIELD, "missing field 'id'"),
    (b'{"id": null, "text": "null id"}', BadRowKind.MISSING_FIELD, "missing field 'id'"),
    (b'{"id": "x1"}', BadRowKind.MISSING_FIELD, "missing field 'text'"),
    (b'{"id": true, "text": "t"}', BadRowKind.WRONG_TYPE, "field 'id' must be a string, got bool"),
    (b'{"id": 1.5, "text": "t"}', BadRowKind.WRONG_TYPE, "field 'id' must be a string, got float"),
    (b'{"id": "x", "text": 5}', BadRowKind.WRONG_TYPE, "field 'text' must be a string, got int"),
    (b'{"id": "x", "text": "t", "title": 3}', BadRowKind.WRONG_TYPE, "field 'title' must be"),
    (b'{"id": "  ", "text": "t"}', BadRowKind.EMPTY_FIELD, "field 'id' is empty"),
    (b'{"id": "x", "text": ""}', BadRowKind.EMPTY_FIELD, "field 'text' is empty"),
    (b'{"id": "x", "text": " \\n\\t "}', BadRowKind.EMPTY_FIELD, "field 'text' is empty"),
    (b'{"id": "x", "text": "caf\xe9"}', BadRowKind.INVALID_UTF8, "invalid UTF-8 at byte 24"),
]


@pytest.mark.parametrize("line, kind, reason", JSONL_BAD_LINES)
def test_jsonl_bad_rows(line, kind, reason):
    (row,) = _parse(CorpusFormat.JSONL, [b'{"id": "ok", "text": "fine"}', line])[1:]
    assert row["source"] == "f" and row["row_number"] == 2
    found_kind, found_reason = _bad(row)
    assert found_kind == kind.value and found_reason.startswith(reason)
    assert row["raw"] == line.decode("utf-8", errors="replace")


DPR_BAD_LINES = [
    (b"1\tonly two", BadRowKind.WRONG_COLUMN_COUNT, "expected 3 tab-separated columns"),
    (b"1\ta\tb\tc", BadRowKind.WRONG_COLUMN_COUNT, "expected 3 tab-separated columns"),
    (b'1\t"closed"then more\tT', BadRowKind.MALFORMED_TSV, "malformed TSV quoting"),
    (b'1\t"never closed\tT', BadRowKind.MALFORMED_TSV, "malformed TSV quoting"),
    (b"id\ttext\ttitle", BadRowKind.MISPLACED_HEADER, "header line"),
    (b"\tText\tT", BadRowKind.EMPTY_FIELD, "column 'id' is empty"),
    (b'1\t" "\tT', BadRowKind.EMPTY_FIELD, "column 'text' is empty"),
    (b"1\tcaf\xe9\tT", BadRowKind.INVALID_UTF8, "invalid UTF-8 at byte 5"),
]


@pytest.mark.parametrize("line, kind, reason", DPR_BAD_LINES)
def test_dpr_tsv_bad_rows(line, kind, reason):
    (row,) = _parse(CorpusFormat.DPR_TSV, [b"id\ttext\ttitle", line])
    assert row["row_number"] == 2
    found_kind, found_reason = _bad(row)
    assert found_kind == kind.value and found_reason.startswith(reason)


FLASHRAG_BAD_LINES = [
    (b'{"id": "1", "contents": "no newline"}', BadRowKind.NO_TITLE_LINE, "field 'contents' has no"),
    (b'{"id": "1", "contents": "Title\\n  "}', BadRowKind.EMPTY_FIELD, "field 'contents' has no"),
    (b'{"id": "1", "text": "wrong key"}', BadRowKind.MISSING_FIELD, "missing field 'contents'"),
    (b'{"contents": "T\\ntext"}', BadRowKind.MISSING_FIELD, "missing field 'id'"),
    (b'{"id": "1", "contents": ["T", "x"]}', BadRowKind.WRONG_TYPE, "field 'contents' must be"),
    (b"[]", BadRowKind.NOT_AN_OBJECT, "expected a JSON object"),
]


@pytest.mark.parametrize("line, kind, reason", FLASHRAG_BAD_LINES)
def test_flashrag_bad_rows(line, kind, reason):
    (row,) = _parse(CorpusFormat.FLASHRAG, [line])
    found_kind, found_reason = _bad(row)
    assert found_kind == kind.value and found_reason.startswith(reason)


MALFORMED_AT_COLUMN_2 = (
    "malformed JSON (Expecting property name enclosed in double quotes at column 2)"
)


def test_clara_bad_documents_and_lines():
    rows = _parse(
        CorpusFormat.CLARA,
        [
            json.dumps({"docs": ["Good.", "", 7, "Good.", None]}).encode(),
            b'{"docs": []}',
            b'{"docs": "not a list"}',
            b'{"question": "no documents"}',
            b"{broken",
        ],
    )
    good_id = clara_document_id("Good.")
    assert _good(rows[0]) == (good_id, "Good.", None)
    assert [(row["row_number"], _bad(row)) for row in rows[1:]] == [
        (1, (BadRowKind.EMPTY_FIELD.value, "docs[1] is empty")),
        (1, (BadRowKind.WRONG_TYPE.value, "docs[2] must be a string, got int")),
        (
            1,
            (
                BadRowKind.DUPLICATE_ID.value,
                f"docs[3]: duplicate id '{good_id}' (first at f:1, docs[0])",
            ),
        ),
        (1, (BadRowKind.WRONG_TYPE.value, "docs[4] must be a string, got null")),
        (2, (BadRowKind.EMPTY_FIELD.value, "field 'docs' is an empty list")),
        (3, (BadRowKind.WRONG_TYPE.value, "field 'docs' must be a list, got str")),
        (4, (BadRowKind.MISSING_FIELD.value, "missing field 'docs'")),
        (5, (BadRowKind.MALFORMED_JSON.value, MALFORMED_AT_COLUMN_2)),
    ]
    # A bad document's raw is that document, not its line.
    assert [row["raw"] for row in rows[1:3]] == ['""', "7"]


def test_parquet_bad_rows():
    batch = {
        "source": ["p"] * 5,
        "row_number": [1, 2, 3, 4, 5],
        "id": [None, 2.0, "c", "d", "  "],
        "text": ["t", "t", None, "t", "t"],
        "title": [None, None, None, 9, None],
    }
    columns = parse_parquet_batch(batch, QUARANTINE)
    assert list(zip(columns["reason_kind"], columns["reason"])) == [
        (BadRowKind.MISSING_FIELD.value, "missing field 'id'"),
        (BadRowKind.WRONG_TYPE.value, "column 'id' must be a string, got float"),
        (BadRowKind.MISSING_FIELD.value, "missing field 'text'"),
        (BadRowKind.WRONG_TYPE.value, "column 'title' must be a string or null, got int"),
        (BadRowKind.EMPTY_FIELD.value, "column 'id' is empty"),
    ]
    assert json.loads(columns["raw"][1]) == {"id": 2.0, "text": "t", "title": None}


def test_raw_is_capped():
    (row,) = _parse(CorpusFormat.JSONL, [b"{" + b"x" * 5000])
    assert len(row["raw"]) == RAW_MAX_CHARS


# ---------------------------------------------------------------------------
# FAIL policy


def test_fail_policy_raises_on_the_first_bad_row_naming_file_row_and_reason():
    with pytest.raises(BadInputError, match=r"^f, line 2: missing field 'text'\.") as caught:
        _parse(
            CorpusFormat.JSONL,
            [b'{"id": "a", "text": "fine"}', b'{"id": "b"}', b"{broken"],
            BadRowPolicy.FAIL,
        )
    assert (caught.value.path, caught.value.line_number) == ("f", 2)
    assert caught.value.reason == "missing field 'text'"


def test_fail_policy_error_survives_pickling():
    import pickle

    error = pickle.loads(
        pickle.dumps(CorpusRowError("s3/bucket/c.jsonl", 9, "field 'id' is empty"))
    )
    assert isinstance(error, BadInputError) and error.line_number == 9
    assert "s3/bucket/c.jsonl, line 9: field 'id' is empty" in str(error)


def test_fail_policy_passes_good_batches_and_header():
    rows = _parse(CorpusFormat.DPR_TSV, [b"id\ttext\ttitle", b"1\ttext\tT"], BadRowPolicy.FAIL)
    assert [_good(row) for row in rows] == [("1", "text", "T")]


def test_policy_must_be_the_enum():
    with pytest.raises(TypeError, match="BadRowPolicy"):
        _parse(CorpusFormat.JSONL, [b'{"id": "a", "text": "t"}'], "quarantine")


# ---------------------------------------------------------------------------
# Duplicates and counts


def test_order_key_sorts_like_source_then_row_number():
    locations = [("a.jsonl", 10), ("a.jsonl", 9), ("a.jsonl.2", 1), ("a", 99), ("b", 1)]
    keys = [order_key(source, row) for source, row in locations]
    assert [parse_order_key(key) for key in sorted(keys)] == sorted(locations)


def test_mark_duplicates_turns_every_occurrence_but_the_kept_one_bad():
    batch = {
        "source": ["a", "a", "b", "b"],
        "row_number": [1, 2, 1, 2],
        "doc_id": ["x", "y", "x", None],
        "text": ["first x", "only y", "second x", None],
        "title": ["T", None, None, None],
        "reason_kind": [None, None, None, BadRowKind.EMPTY_FIELD.value],
        "reason": [None, None, None, "field 'text' is empty"],
        "raw": [None, None, None, "{}"],
    }
    marked = mark_duplicates(batch, {"x": ("a", 1)}, QUARANTINE)
    assert marked["doc_id"] == ["x", "y", None, None]
    assert marked["reason_kind"] == [None, None, BadRowKind.DUPLICATE_ID.value, "empty field"]
    assert marked["reason"][2] == "duplicate id 'x' (first at a:1)"
    assert json.loads(marked["raw"][2]) == {"id": "x", "text": "second x", "title": None}
    assert batch["doc_id"] == ["x", "y", "x", None]  # the input is left alone
    with pytest.raises(BadInputError, match=r"^b, line 1: duplicate id 'x' \(first at a:1\)"):
        mark_duplicates(batch, {"x": ("a", 1)}, BadRowPolicy.FAIL)


def test_counts_must_reconcile():
    counts = CorpusRowCounts(5, 3, {"malformed JSON": 1, "duplicate id": 1})
    assert counts.num_quarantined_rows == 2
    with pytest.raises(ValueError, match="num_input_rows=6"):
        CorpusRowCounts(6, 3, {"malformed JSON": 1})

"""Corpus readers on local Ray: every format end to end, FAIL policy, a mixed corpus reconciled."""

import gzip
import json
import random
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clara_ray.data.corpus_reader import (
    count_corpus_rows,
    find_duplicate_ids,
    good_rows,
    mark_duplicate_ids,
    quarantined_rows,
    read_corpus_rows,
)
from clara_ray.data.corpus_rows import BadRowKind, CorpusFormat, clara_document_id
from clara_ray.data.formats import BadInputError, BadRowPolicy

pytestmark = pytest.mark.ray

QUARANTINE = BadRowPolicy.QUARANTINE


def _rows(dataset) -> list[dict]:
    return sorted(dataset.take_all(), key=lambda row: (row["source"], row["row_number"]))


def _documents(dataset) -> list[tuple]:
    return [(row["doc_id"], row["text"], row["title"]) for row in _rows(good_rows(dataset))]


def test_jsonl_including_gzip(local_ray, tmp_path):
    plain = tmp_path / "a.jsonl"
    plain.write_bytes(
        b'\xef\xbb\xbf{"id": "d1", "text": "One.", "title": "T1"}\r\n\n{"id": 2, "text": "Two."}\n'
    )
    with gzip.open(tmp_path / "b.jsonl.gz", "wb") as handle:
        handle.write(b'{"id": "d3", "text": "Three."}\n')
    rows = _rows(read_corpus_rows([plain, tmp_path / "b.jsonl.gz"]))
    assert [(row["doc_id"], row["text"], row["title"]) for row in rows] == [
        ("d1", "One.", "T1"),
        ("2", "Two.", None),
        ("d3", "Three.", None),
    ]
    assert [(row["source"], row["row_number"]) for row in rows] == [
        (str(plain), 1),
        (str(plain), 3),
        (str(tmp_path / "b.jsonl.gz"), 1),
    ]


def test_dpr_tsv(local_ray, tmp_path):
    path = tmp_path / "psgs_w100.tsv"
    path.write_text(
        "id\ttext\ttitle\n"
        '1\t"Aaron Aaron ( or ; ""Ahärôn"") is a prophet"\tAaron\n'
        "2\tPlain text\tB\n"
        "3\tmissing a column\n",
        encoding="utf-8",
    )
    rows = _rows(read_corpus_rows(path, on_bad_row=QUARANTINE))
    assert [(row["doc_id"], row["text"], row["title"]) for row in rows[:2]] == [
        ("1", 'Aaron Aaron ( or ; "Ahärôn") is a prophet', "Aaron"),
        ("2", "Plain text", "B"),
    ]
    assert [(row["row_number"], row["reason_kind"]) for row in rows] == [
        (2, None),
        (3, None),
        (4, BadRowKind.WRONG_COLUMN_COUNT.value),
    ]


def test_flashrag_and_clara_need_their_format(local_ray, tmp_path):
    flashrag = tmp_path / "wiki.jsonl"
    flashrag.write_text(json.dumps({"id": "0", "contents": '"Aaron"\nAaron is a prophet.'}) + "\n")
    assert _documents(read_corpus_rows(flashrag, CorpusFormat.FLASHRAG)) == [
        ("0", "Aaron is a prophet.", '"Aaron"')
    ]
    clara = tmp_path / "pretrain_data.jsonl"
    line = {"data_type": "qa", "question": ["Q?"], "answers": ["A"], "docs": ["Doc one.", "Doc 2."]}
    clara.write_text(json.dumps(line) + "\n")
    assert set(_documents(read_corpus_rows(clara, CorpusFormat.CLARA))) == {
        (clara_document_id("Doc one."), "Doc one.", None),
        (clara_document_id("Doc 2."), "Doc 2.", None),
    }


def test_parquet_rows_are_numbered_within_each_file(local_ray, tmp_path):
    pq.write_table(
        pa.table({"id": [10, 11, 12], "text": ["Ten.", "", "Twelve."], "title": ["T", None, None]}),
        tmp_path / "a.parquet",
        row_group_size=2,
    )
    pq.write_table(pa.table({"id": ["x"], "text": ["Ex."]}), tmp_path / "b.parquet")
    rows = _rows(read_corpus_rows(tmp_path, CorpusFormat.PARQUET, QUARANTINE, rows_per_block=2))
    assert [(row["row_number"], row["doc_id"], row["title"], row["reason"]) for row in rows] == [
        (1, "10", "T", None),
        (2, None, None, "column 'text' is empty"),
        (3, "12", None, None),
        (1, "x", None, None),
    ]
    pq.write_table(pa.table({"id": ["x"], "body": ["no text column"]}), tmp_path / "c.parquet")
    with pytest.raises(Exception, match="needs the columns 'id' and 'text'"):
        read_corpus_rows(tmp_path / "c.parquet").take_all()


def test_fail_policy_raises_when_the_dataset_is_consumed(local_ray, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "text": "  "}\n')
    rows = read_corpus_rows(path)  # lazy: nothing is read yet
    with pytest.raises(Exception, match=r"c\.jsonl, line 2: field 'text' is empty"):
        rows.take_all()

    context = local_ray.data.DataContext.get_current()
    context.raise_original_map_exception = True
    try:
        with pytest.raises(BadInputError) as caught:
            read_corpus_rows(path).take_all()
    finally:
        context.raise_original_map_exception = False
    assert (caught.value.line_number, caught.value.reason) == (2, "field 'text' is empty")


# ---------------------------------------------------------------------------
# A few thousand mixed rows over two files reconcile exactly

LONG_LINE_LIMIT = 2048
BAD_LINES = {
    BadRowKind.MALFORMED_JSON: b'{"id": "m", "text": ',
    BadRowKind.NOT_AN_OBJECT: b'["not", "an", "object"]',
    BadRowKind.MISSING_FIELD: b'{"text": "no id"}',
    BadRowKind.WRONG_TYPE: b'{"id": 1.5, "text": "float id"}',
    BadRowKind.EMPTY_FIELD: b'{"id": "e", "text": " "}',
    BadRowKind.INVALID_UTF8: b'{"id": "u", "text": "caf\xe9"}',
    BadRowKind.LINE_TOO_LONG: b'{"id": "l", "text": "' + b"x" * (2 * LONG_LINE_LIMIT) + b'"}',
}


def _write_mixed_corpus(directory, seed: int = 0):
    """Two JSONL files of mixed rows; returns paths and what the reader must find."""
    rng = random.Random(seed)
    bad: dict[tuple[str, int], str] = {}  # (source, row) -> BadRowKind value
    kept: dict[str, tuple[str, int]] = {}  # id -> where its first good row is
    repeats: list[tuple[tuple[str, int], str]] = []  # (source, row) and id of each repeat
    kinds = list(BAD_LINES)
    paths = [directory / "part-a.jsonl", directory / "part-b.jsonl"]
    for file_index, path in enumerate(paths):
        lines = []
        for index in range(1500):
            row = (str(path), len(lines) + 1)
            draw = rng.random()
            if draw < 0.04:
                lines.append(rng.choice([b"", b"   ", b"\t"]))  # blank: not a row
                continue
            if draw < 0.12:
                kind = kinds[index % len(kinds)]
                lines.append(BAD_LINES[kind])
                bad[row] = kind.value
                continue
            if draw < 0.17 and kept:
                doc_id = rng.choice(sorted(kept))  # a repeat, later in (source, row) order
                bad[row] = BadRowKind.DUPLICATE_ID.value
                repeats.append((row, doc_id))
            else:
                doc_id = f"f{file_index}-{index}"
                kept[doc_id] = row
            document = {"id": doc_id, "text": f"Text of {doc_id} at {row[1]}."}
            if rng.random() < 0.5:
                document["title"] = f"Title {doc_id}"
            lines.append(json.dumps(document).encode())
        separator = b"\n" if file_index == 0 else b"\r\n"
        path.write_bytes(b"\xef\xbb\xbf" + separator.join(lines) + separator)
    return paths, bad, kept, repeats


def test_mixed_corpus_reconciles_exactly(local_ray, tmp_path):
    paths, expected_bad, expected_kept, repeats = _write_mixed_corpus(tmp_path)
    first_file, second_file = (str(path) for path in paths)
    # Repeats within a file and across the two files both occur.
    assert {(row[0], expected_kept[doc_id][0]) for row, doc_id in repeats} >= {
        (first_file, first_file),
        (second_file, first_file),
    }
    assert set(expected_bad.values()) == {kind.value for kind in BadRowKind} - {
        BadRowKind.MALFORMED_TSV.value,
        BadRowKind.WRONG_COLUMN_COUNT.value,
        BadRowKind.MISPLACED_HEADER.value,
        BadRowKind.NO_TITLE_LINE.value,
        BadRowKind.BAD_VALUE.value,  # QA rows only (clara_ray/data/qa_formats.py): no corpus line has one
    }
    rows = read_corpus_rows(
        paths, on_bad_row=QUARANTINE, rows_per_block=200, max_line_bytes=LONG_LINE_LIMIT
    ).materialize()

    duplicates = find_duplicate_ids(rows, num_partitions=2)  # a shuffle on the cluster
    assert duplicates == {doc_id: expected_kept[doc_id] for _, doc_id in repeats}
    assert find_duplicate_ids(rows, num_partitions=1) == duplicates  # grouped in the driver
    rows = mark_duplicate_ids(rows, duplicates, QUARANTINE).materialize()

    counts = count_corpus_rows(rows)
    assert counts.num_input_rows == counts.num_good_rows + counts.num_quarantined_rows
    assert counts.num_input_rows == len(expected_bad) + len(expected_kept)
    assert counts.num_good_rows == len(expected_kept)
    assert counts.quarantined_by_kind == dict(Counter(expected_bad.values()))

    quarantined = _rows(quarantined_rows(rows))
    assert {(row["source"], row["row_number"]): row["reason_kind"] for row in quarantined} == (
        expected_bad
    )
    assert all(row["reason"] and row["raw"] is not None for row in quarantined)
    good = _rows(good_rows(rows))
    assert {row["doc_id"]: (row["source"], row["row_number"]) for row in good} == expected_kept
    assert len(good) == len(expected_kept)  # no id twice among good rows

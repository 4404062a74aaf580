"""CLaRa's own QA data (apple/ml-clara, ``example/pretrain_data.jsonl``) as our corpus and QA files.

    python -m clara_ray.data.clara_format pretrain_data.jsonl data/clara --test-fraction 0.2
    clara-ray demo --corpus data/clara/corpus.jsonl --train-qa data/clara/train_qa.jsonl --test-qa data/clara/test_qa.jsonl

Each input row holds ``docs`` (the documents the questions were written from)
and parallel lists ``question`` / ``answers`` (one answer string per question).
Every document becomes a corpus row ``c<row>-<k>``; every question a QA row whose
gold documents are its row's documents. Rows are split by document: the
questions of a seeded ``test_fraction`` of the rows are the test set, so a test
question always asks about documents no training question came from. Rows that
cannot be read are counted and skipped with their reason on stderr; the counts
printed at the end reconcile (rows in = rows used + rows skipped).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from clara_ray.data.formats import Document, QAExample, write_corpus, write_qa


def convert(path: Path, out_dir: Path, test_fraction: float = 0.2, seed: int = 0) -> dict:
    documents: list[Document] = []
    groups: list[list[QAExample]] = []  # the questions of each input row
    skipped: list[tuple[int, str]] = []
    with path.open(encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            skipped.append((number, "empty line"))
            continue
        try:
            row = json.loads(line)
            questions, answers, docs = row["question"], row["answers"], row["docs"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            skipped.append((number, f"not a CLaRa QA row: {error!r}"))
            continue
        if isinstance(questions, str):
            questions, answers = [questions], [answers]
        if len(questions) != len(answers) or not docs:
            skipped.append((number, f"{len(questions)} questions, {len(answers)} answers, {len(docs)} documents"))
            continue
        ids = [f"c{number}-{k}" for k in range(len(docs))]
        documents += [Document(doc_id, text) for doc_id, text in zip(ids, docs)]
        groups.append([
            QAExample(f"q{number}-{k}", question, [answer if isinstance(answer, str) else answer[0]], ids)
            for k, (question, answer) in enumerate(zip(questions, answers))
        ])
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    num_test = max(1, round(test_fraction * len(groups)))
    test_rows = set(order[:num_test])
    train = [qa for i, group in enumerate(groups) if i not in test_rows for qa in group]
    test = [qa for i, group in enumerate(groups) if i in test_rows for qa in group]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_corpus(out_dir / "corpus.jsonl", documents)
    write_qa(out_dir / "train_qa.jsonl", train)
    write_qa(out_dir / "test_qa.jsonl", test)
    for number, reason in skipped:
        print(f"{path}, line {number}: skipped, {reason}", file=sys.stderr)
    return {"rows_in": len(lines), "rows_used": len(groups), "rows_skipped": len(skipped),
            "documents": len(documents), "train_questions": len(train), "test_questions": len(test)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", type=Path, help="CLaRa QA JSONL (e.g. example/pretrain_data.jsonl)")
    parser.add_argument("output", type=Path, help="directory for corpus.jsonl, train_qa.jsonl, test_qa.jsonl")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share of input rows whose questions are test")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not args.input.is_file():
        print(f"no such file: {args.input}", file=sys.stderr)
        return 2
    print(json.dumps(convert(args.input, args.output, args.test_fraction, args.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

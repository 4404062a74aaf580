"""`clara-ray evaluate`: report files, BM25 against bm25s itself, the trained-model path."""

import json

import bm25s
import numpy as np
import pyarrow.parquet as pq
import pytest
from bm25s.tokenization import Tokenizer

from clara_ray.cli import main
from clara_ray.data.qa_formats import QAFormat, read_qa_set
from clara_ray.index.shard import IndexShard
from clara_ray.memory_shards import memory_table, write_manifest
from clara_ray.modeling.checkpoint import save_model
from tests.tiny_model import make_model

# Rows in the shape of CLaRa's example/pretrain_data.jsonl: one document each,
# parallel question / answer lists. Some questions share words with other rows'
# documents, so BM25's Recall@1 is neither 0 nor 1.
ROWS = [
    ("Orvel Tanske repairs clocks in the harbour town of Leswick.",
     [("Who repairs clocks in Leswick?", "Orvel Tanske"), ("Where does Orvel Tanske work?", "Leswick")]),
    ("The harbour of Leswick freezes every winter, and the boats stay home.",
     [("What happens to the harbour every winter?", "it freezes")]),
    ("Mira Dostal paints lighthouses and sells them at the Leswick market.",
     [("What does Mira Dostal paint?", "lighthouses"), ("Where does Mira Dostal sell her work?", "the Leswick market")]),
    ("Clocks from the old tower were moved to a museum in Brandt.",
     [("Where were the tower clocks moved?", "a museum in Brandt")]),
    ("Brandt is a river city known for its bridges and its winter fair.",
     [("What is Brandt known for?", "bridges"), ("Which fair does the river city hold?", "its winter fair")]),
    ("Tomas Ilk keeps bees on the roof of the Brandt museum.",
     [("Who keeps bees on a museum roof?", "Tomas Ilk"), ("What does the painter of lighthouses keep?", "nothing")]),
]


@pytest.fixture
def clara_pretrain_file(tmp_path):
    path = tmp_path / "pretrain_data.jsonl"
    with path.open("w") as out:
        for document, pairs in ROWS:
            row = {"data_type": "qa", "question": [q for q, _ in pairs], "answers": [a for _, a in pairs], "docs": [document]}
            out.write(json.dumps(row) + "\n")
    return path


def _bm25s_recall_at_1() -> float:
    """Recall@1 by bm25s directly: the same tokenizer (English stopwords) and defaults as baselines.py."""
    documents = [document for document, _ in ROWS]
    questions = [(q, row) for row, (_, pairs) in enumerate(ROWS) for q, _ in pairs]
    tokenizer = Tokenizer(stopwords="en")
    retriever = bm25s.BM25()
    retriever.index(tokenizer.tokenize(documents, return_as="ids", show_progress=False), show_progress=False)
    query_ids = tokenizer.tokenize([q for q, _ in questions], update_vocab=False, return_as="ids", show_progress=False)
    top, _ = retriever.retrieve(query_ids, k=1, show_progress=False)
    return float(np.mean([top[i, 0] == row for i, (_, row) in enumerate(questions)]))


def test_evaluate_bm25_matches_bm25s_and_writes_the_report(tmp_path, clara_pretrain_file, capsys):
    output = tmp_path / "eval"
    code = main(["evaluate", "--qa", str(clara_pretrain_file), "--format", "clara_pretrain",
                 "--methods", "bm25", "--k", "1", "2", "5", "--output", str(output)])
    assert code == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = _bm25s_recall_at_1()
    assert 0 < expected < 1
    assert abs(line["results"]["bm25"]["recall@1"] - expected) <= 0.01
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["num_questions"] == 10 and metrics["rows"]["qa"] == {"input": 10, "used": 10, "quarantined": 0}
    assert metrics["answers_generated"] is False and "em" not in metrics["results"]["bm25"]
    scores = metrics["results"]["bm25"]
    assert scores["recall@1"] <= scores["recall@2"] <= scores["recall@5"] == 1.0
    assert scores["mrr@1"] == scores["recall@1"]
    report = (output / "report.md").read_text()
    assert "Retrieval only" in report and "| Recall@k |" in report
    assert (output / "recall_at_k.png").stat().st_size > 0
    assert len((output / "documents.jsonl").read_text().splitlines()) == len(ROWS)


def test_user_mistakes_exit_with_a_message(tmp_path, clara_pretrain_file, capsys):
    assert main(["evaluate", "--qa", str(clara_pretrain_file), "--format", "flashrag", "--methods", "bm25",
                 "--output", str(tmp_path / "o")]) == 2
    assert "is the format right" in capsys.readouterr().err
    assert main(["evaluate", "--qa", str(clara_pretrain_file), "--format", "clara_pretrain", "--methods", "clara",
                 "--output", str(tmp_path / "o")]) == 2
    assert "need a trained model" in capsys.readouterr().err


def test_clara_method_answers_from_memory_fetched_by_id(tmp_path, clara_pretrain_file, capsys, monkeypatch):
    """A tiny untrained model end to end (not a quality check): the query reasoner ranks
    over an index of the shards, and the generator reads memory fetched by document id."""
    model, tokenizer = make_model(num_memory_tokens=2)
    model_dir = save_model(model, tokenizer, tmp_path / "model", backbone_ref="tiny", save_backbone=True)
    documents = read_qa_set(clara_pretrain_file, QAFormat.CLARA_PRETRAIN).documents.records
    memory_dir = tmp_path / "memory"
    memory_dir.mkdir()
    memory = np.random.default_rng(0).standard_normal((len(documents), 2, model.hidden_size)).astype(np.float16)
    pq.write_table(memory_table([d.id for d in documents], memory, [5] * len(documents), [False] * len(documents)),
                   memory_dir / "part-00000.parquet")
    write_manifest(memory_dir, model_fingerprint="test", num_memory_tokens=2, hidden_size=model.hidden_size,
                   memory_dtype="float16", key_kind="flat_memory", key_dim=2 * model.hidden_size,
                   num_input_documents=len(documents), num_quarantined=0)
    fetched = []
    original_fetch = IndexShard.fetch

    def recording_fetch(self, rows):
        fetched.append(np.asarray(rows).size)
        return original_fetch(self, rows)

    monkeypatch.setattr(IndexShard, "fetch", recording_fetch)
    output = tmp_path / "eval"
    code = main(["evaluate", "--qa", str(clara_pretrain_file), "--format", "clara_pretrain", "--model-dir", str(model_dir),
                 "--memory", str(memory_dir), "--methods", "bm25", "clara", "--k", "1", "3", "--output", str(output)])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((output / "metrics.json").read_text())
    for method in ("bm25", "clara"):
        assert set(metrics["results"][method]) >= {"recall@1", "mrr@3", "em", "f1", "cover_em"}
    # Searches fetch their candidates; the generator then fetches one document per question and method.
    assert fetched.count(1) == 2 * metrics["num_questions"]
    predictions = [json.loads(line) for line in (output / "predictions.jsonl").read_text().splitlines()]
    assert all(isinstance(p["clara"]["answer"], str) for p in predictions)
    assert (output / "index" / "CURRENT").exists()

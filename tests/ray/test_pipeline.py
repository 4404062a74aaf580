import json

import pytest

from clara_ray.config import load_config
from clara_ray.pipeline import run_pipeline

pytestmark = pytest.mark.ray


def _write(path, lines):
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines) + b"\n")


def test_pipeline_on_user_files_with_bad_rows(local_ray, tmp_path):
    people = [("Ann Berg", "Marlow", "baker"), ("Bo Lind", "Tessin", "smith"), ("Cy Moor", "Ostrel", "potter"),
              ("Di Vale", "Marlow", "weaver"), ("Ed Holt", "Tessin", "baker"), ("Fay Rusk", "Ostrel", "smith")]
    corpus = []
    for i, (name, city, job) in enumerate(people):
        corpus.append(json.dumps({"id": f"c{i}", "text": f"{name} grew up in {city}."}))
        corpus.append(json.dumps({"id": f"j{i}", "text": f"{name} earns a living as a {job}."}))
    corpus += [
        '{"id": "bad1", "text": "   "}',  # whitespace text
        '{"text": "no id"}',  # missing id
        '{"id": "c0", "text": "duplicate id"}',
        "not json at all",
        b'{"id": "bytes", "text": "\xff\xfe broken"}',  # undecodable
    ]
    train = [json.dumps({"question": f"Where did {n} grow up?", "answers": [c], "gold_doc_ids": [f"c{i}"]})
             for i, (n, c, _) in enumerate(people[:4])]
    train += [json.dumps({"question": f"What is {n}'s job?", "answers": [j], "gold_doc_ids": [f"j{i}"]})
              for i, (n, _, j) in enumerate(people[:4])]
    train.append('{"question": "no answers", "answers": []}')
    test = [json.dumps({"question": f"Where did {n} grow up?", "answers": [c], "gold_doc_ids": [f"c{i + 4}"]})
            for i, (n, c, _) in enumerate(people[4:])]
    for name, lines in (("corpus", corpus), ("train", train), ("test", test)):
        _write(tmp_path / f"{name}.jsonl", lines)

    config = load_config(None, [
        f"data.corpus={tmp_path / 'corpus.jsonl'}", f"data.train_qa={tmp_path / 'train.jsonl'}",
        f"data.test_qa={tmp_path / 'test.jsonl'}", f"run.output_dir={tmp_path / 'runs'}", "run.name=user",
        "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.num_heads=2",
        "model.tiny.intermediate_size=64", "model.tiny.vocab_size=300",
        "stage1.steps=4", "stage1.report_every=2", "stage1.micro_batch_size_per_worker=2",
        "stage3.steps=4", "stage3.report_every=2", "stage3.micro_batch_size_per_worker=2",
        "stage3.top_k=2", "stage3.num_candidates=4", "eval.baselines=[bm25]", "encode.max_actors=1",
    ])
    summary = run_pipeline(config, log=lambda message: None)

    files = summary["data"]["files"]
    assert files["corpus"] == {"input": 17, "used": 12, "quarantined": 5}
    assert files["train_qa"] == {"input": 9, "used": 8, "quarantined": 1}
    assert summary["data"]["num_encoded"] == 12
    run_dir = tmp_path / "runs" / "user"
    quarantine = [json.loads(line) for line in (run_dir / "data" / "corpus.quarantine.jsonl").read_text().splitlines()]
    assert len(quarantine) == 5 and all(row["reason"] for row in quarantine)
    assert set(summary["results"]) == {"bm25", "query reasoner before stage 3", "query reasoner after stage 3"}
    for scores in summary["results"].values():
        assert set(scores) == {"recall@1", "recall@5", "em", "f1"}
        assert all(0.0 <= value <= 1.0 for value in scores.values())
    report = (run_dir / "report.md").read_text()
    assert "| corpus | 17 | 12 | 5 |" in report
    assert (run_dir / "training.png").stat().st_size > 0
    assert (run_dir / "models" / "stage3" / "adapters.safetensors").exists()

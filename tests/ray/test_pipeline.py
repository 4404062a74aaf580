import json
from pathlib import Path

import pytest

from clara_ray.config import load_config
from clara_ray.memory_shards import read_memory_shards
from clara_ray.pipeline import run_pipeline
from clara_ray.training.tables import DOCUMENTS, read_table

pytestmark = pytest.mark.ray


def _write(path, lines):
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines) + b"\n")


LONG_ANSWER = "a baker who also works as a smith in Marlow and in Tessin every summer"


def _user_files_with_bad_rows(tmp_path) -> list[str]:
    """A corpus and QA files of a user's, with bad rows of every kind; the overrides of a small run on them."""
    people = [("Ann Berg", "Marlow", "baker"), ("Bo Lind", "Tessin", "smith"), ("Cy Moor", "Ostrel", "potter"),
              ("Di Vale", "Marlow", "weaver"), ("Ed Holt", "Tessin", "baker"), ("Fay Rusk", "Ostrel", "smith")]
    corpus = []
    for i, (name, city, job) in enumerate(people):
        corpus.append(json.dumps({"id": f"c{i}", "text": f"{name} grew up in {city}.", **({"title": name} if i == 1 else {})}))
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
    train.append(json.dumps({"question": "What does Ann Berg do?", "answers": [LONG_ANSWER], "gold_doc_ids": ["j0"]}))
    test = [json.dumps({"question": f"Where did {n} grow up?", "answers": [c], "gold_doc_ids": [f"c{i + 4}"]})
            for i, (n, c, _) in enumerate(people[4:])]
    test.append(json.dumps({"question": "What does Ed Holt do?", "answers": [LONG_ANSWER], "gold_doc_ids": ["j4"]}))
    for name, lines in (("corpus", corpus), ("train", train), ("test", test)):
        _write(tmp_path / f"{name}.jsonl", lines)

    return [
        f"data.corpus={tmp_path / 'corpus.jsonl'}", f"data.train_qa={tmp_path / 'train.jsonl'}",
        f"data.test_qa={tmp_path / 'test.jsonl'}", f"run.output_dir={tmp_path / 'runs'}", "run.name=user",
        "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.num_heads=2",
        "model.tiny.intermediate_size=64", "model.tiny.vocab_size=300",
        # one training worker (pipelines on two run in test_two_nodes and test_refresh)
        "train.num_workers=1", "stage1.steps=4", "stage1.report_every=2", "stage1.micro_batch_size_per_worker=4",
        "stage3.steps=2 epochs", "stage3.report_every=2", "stage3.micro_batch_size_per_worker=4",
        "stage3.top_k=2", "stage3.num_candidates=4", "eval.baselines=[bm25]", "encode.max_actors=1",
        # both attempts run: a tiny run fits nothing, so neither bound stops them
        "stage3.attempts=2", "stage3.attempt_target_recall=1.0", "stage3.takeoff_recall=0",
        "model.answer_max_len=8",  # given, so the long answers are set aside (auto would fit them)
    ]


def _check_user_files_run(summary, messages, tmp_path):
    """Every row of the user's files accounted for, and the run trained and reported on the rest."""
    files = summary["data"]["files"]
    assert files["corpus"] == {"input": 17, "used": 12, "quarantined": 5}
    assert files["train_qa"] == {"input": 10, "used": 8, "quarantined": 2}
    assert files["test_qa"] == {"input": 3, "used": 2, "quarantined": 1}
    assert summary["data"]["num_encoded"] == 12
    run_dir = tmp_path / "runs" / "user"
    # the run keeps each document's title beside the text the compressor read (clara-ray ask shows it)
    documents = {row["id"]: row for row in read_table(run_dir / "data" / DOCUMENTS).to_pylist()}
    assert documents["c1"]["title"] == "Bo Lind" and documents["c1"]["text"] == "Bo Lind\nBo Lind grew up in Tessin."
    assert documents["c2"]["title"] is None and documents["c2"]["text"] == "Cy Moor grew up in Ostrel."
    quarantine = [json.loads(line) for line in (run_dir / "data" / "corpus.quarantine.jsonl").read_text().splitlines()]
    assert len(quarantine) == 5 and all(row["reason"] for row in quarantine)
    for name in ("train_qa", "test_qa"):
        rows = [json.loads(line) for line in (run_dir / "data" / f"{name}.quarantine.jsonl").read_text().splitlines()]
        (long,) = [row for row in rows if "model.answer_max_len is 8" in row["reason"]]
        assert long["line_number"] is None and LONG_ANSWER in long["raw"]
    lengths = summary["lengths"]
    assert lengths["answer_max_len"] == 8 and "answer_max_len" not in lengths["picked"]
    assert lengths["doc_max_len"] % 16 == 0 and "doc_max_len" in lengths["picked"]
    assert set(summary["results"]) == {"bm25", "query reasoner before stage 3", "query reasoner after stage 3"}
    for scores in summary["results"].values():
        assert set(scores) == {"recall@1", "recall@5", "em", "f1"}
        assert all(0.0 <= value <= 1.0 for value in scores.values())
    # the generator reading each test question's gold document (first of its top-2): the answers' ceiling
    for gold in summary["gold_reading"].values():  # before and after stage 3
        assert gold["questions"] == 2 and 0.0 <= gold["em"] <= gold["f1"] <= 1.0
    assert set(summary["gold_reading"]) == {"before stage 3", "after stage 3"}
    report = (run_dir / "report.md").read_text()
    assert "given each test question's gold document (2 questions): before stage 3 **EM" in report
    assert any("given each test question's gold document, the generator answers EM" in m for m in messages)
    assert "| corpus | 17 | 12 | 5 |" in report and "| train_qa | 10 | 8 | 2 |" in report
    assert "model.answer_max_len = 8 [set]" in report and "model.doc_max_len = 32 [auto (q0.98" in report
    assert (run_dir / "training.png").stat().st_size > 0
    assert (run_dir / "models" / "stage3" / "adapters.safetensors").exists()
    # the 8 training questions that fit, 4 per step, twice over
    assert "[pipeline] stage3.steps = 4 (2 epochs of 8 training questions, 4 per step)" in messages
    # then half as many in name worlds (the default): the last window's steps all in one
    assert any(m.startswith("[pipeline] stage 3: 4 steps, then 2 in counterfactual names worlds") for m in messages)
    history = json.loads((run_dir / "steps" / "stage3.json").read_text())["history"]
    assert [(h["step"], h["counterfactual"]) for h in history] == [(2, 0.0), (4, 0.0), (6, 1.0)]
    # two stage-3 attempts, each with its own seed and directory; the better fit is models/stage3
    attempts = summary["stage3_attempts"]
    assert [(a["attempt"], a["seed"], a["fit"]) for a in attempts] == [(0, 0, "train_recall_at_1"),
                                                                      (1, 1000, "train_recall_at_1")]
    for a in attempts:
        record = json.loads((run_dir / "attempts" / "stage3" / str(a["attempt"]) / "attempt.json").read_text())
        assert record["seed"] == a["seed"] and record["history"][-1]["step"] == 6
        assert (Path(a["model_dir"]) / "adapters.safetensors").exists()
    kept = max(attempts, key=lambda a: a["fit_value"])
    assert (run_dir / "models" / "stage3" / "adapters.safetensors").read_bytes() == (
        Path(kept["model_dir"]) / "adapters.safetensors").read_bytes()
    assert f"[stage3] keeping attempt {kept['attempt'] + 1}" in " ".join(messages)
    assert "## Stage-3 attempts" in report


_DRIVER = """
import json, sys, ray
from clara_ray.config import load_config
from clara_ray.pipeline import run_pipeline
ray.init(address=sys.argv[1])
messages = []
def log(message):
    messages.append(message)
    print(message, flush=True)
summary = run_pipeline(load_config(None, sys.argv[3:]), log=log)
with open(sys.argv[2], "w") as out:
    json.dump({"summary": summary, "messages": messages}, out)
"""


def _trainable_trap_run(output_dir, name: str) -> list[str]:
    """A small trap-corpus run with stage 2 and a trainable compressor (the index refreshed every 2 steps)."""
    return [
        f"run.output_dir={output_dir}", f"run.name={name}", "data.trap.num_entities=12",
        "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.num_heads=2",
        "model.tiny.intermediate_size=64", "model.tiny.vocab_size=300",
        "stage1.steps=6", "stage1.report_every=2", "stage1.micro_batch_size_per_worker=4",
        "stage2.enabled=true", "stage2.steps=4", "stage2.report_every=2", "stage2.micro_batch_size_per_worker=4",
        "stage2.num_documents=2",
        "stage3.steps=4", "stage3.report_every=2", "stage3.micro_batch_size_per_worker=4", "stage3.attempts=1",
        "stage3.top_k=2", "stage3.num_candidates=8", "eval.baselines=[bm25]", "encode.max_actors=1",
        "stage3.compressor=trainable", "stage3.refresh_every=2",
        "stage3.counterfactual_rate=0",  # no world steps: the refreshes are at stage3.steps' multiples of 2
        "train.num_workers=1",
    ]


def _driver(local_ray, overrides, name: str, tmp_path):
    """A pipeline driver in its own process on the test cluster; its output goes to
    <name>.log, its summary and log messages (once it finished) to <name>.json."""
    import subprocess
    import sys

    with open(tmp_path / f"{name}.log", "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-c", _DRIVER, local_ray.get_runtime_context().gcs_address, str(tmp_path / f"{name}.json"),
             *overrides],
            cwd=Path(__file__).parents[2], stdout=log, stderr=subprocess.STDOUT,
        )


def test_two_pipelines_on_one_cluster_user_files_with_bad_rows_and_one_killed_after_stage1_and_rerun(
        local_ray, tmp_path):
    """Two drivers started at once on one cluster: a run on a user's files with bad rows,
    and a trap-corpus run with stage 2 and a trainable compressor. The trap run's driver
    is killed once its stage 1 has finished, wherever it then is (or after it finished
    everything); the other finishes all the same, and a rerun of the killed one's config
    never trains stage 1 again and finishes its run: stage 2, stage 3 refreshing the
    index as it trains, the evaluation on the final version. One training worker each:
    the two runs' stages fit beside each other on the 4 logical CPUs and really run at
    the same time."""
    runs = {"user": _user_files_with_bad_rows(tmp_path), "killed": _trainable_trap_run(tmp_path, "killed")}
    drivers = {name: _driver(local_ray, overrides, name, tmp_path) for name, overrides in runs.items()}
    try:
        _kill_after_stage1_and_rerun(drivers["killed"], tmp_path / "killed", runs["killed"])
        assert drivers["user"].wait(timeout=1200) == 0, (tmp_path / "user.log").read_text(errors="replace")[-3000:]
    finally:  # a failure above must not leave the other driver running on the session's cluster
        if drivers["user"].poll() is None:
            drivers["user"].kill()
            drivers["user"].wait()
    finished = json.loads((tmp_path / "user.json").read_text())
    _check_user_files_run(finished["summary"], finished["messages"], tmp_path)


def _kill_after_stage1_and_rerun(killed, run_dir, overrides):
    """Kill the driver `killed` once its run's stage 1 has finished, then rerun its
    config here: stage 1 is not trained again and the run finishes, its index refreshed
    by the trainable compressor and evaluated on the final version."""
    import os
    import signal
    import time

    try:
        deadline = time.monotonic() + 600
        while not (run_dir / "steps" / "stage1.json").exists():
            assert killed.poll() is None, "the driver died before stage 1 finished"
            assert time.monotonic() < deadline, "stage 1 did not finish in 10 minutes"
            time.sleep(0.05)
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    stage1_files = {p: p.stat().st_mtime_ns for p in (run_dir / "models" / "stage1").rglob("*") if p.is_file()}

    messages: list[str] = []
    summary = run_pipeline(load_config(None, overrides), log=messages.append)
    assert any("stage1 finished in an earlier attempt" in m for m in messages)
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "models" / "stage1").rglob("*") if p.is_file()} == stage1_files
    assert (run_dir / "steps" / "stage2.json").exists() and (run_dir / "steps" / "stage3.json").exists()
    assert (run_dir / "report.md").exists()
    assert set(summary["results"]) == {"bm25", "query reasoner before stage 3", "query reasoner after stage 3"}
    assert os.path.exists(summary["models"]["stage3"])
    # Refreshes while stage 3 ran, the last from the stage-3 model; the evaluation on that version.
    events = summary["refresh"]["events"]
    assert events[-1]["step"] == 4 and events[-1]["outcome"] == "swapped"
    assert {e["step"] for e in events} | set(summary["refresh"]["skipped"]) == {2, 4}
    assert (run_dir / "index" / "CURRENT").read_text().strip() == "v4"
    fingerprint = json.loads((run_dir / "models" / "stage3" / "clara.json").read_text())["compressor_fingerprint"]
    assert read_memory_shards(run_dir / "refresh" / "memory-v4").manifest["model_fingerprint"] == fingerprint
    assert "| 4 | swapped |" in (run_dir / "report.md").read_text()


def test_run_directory_of_another_config_is_refused(local_ray, tmp_path):
    first = load_config(None, [f"run.output_dir={tmp_path}", "run.name=taken"])
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "config.yaml").write_text(first.to_yaml())
    other = load_config(None, [f"run.output_dir={tmp_path}", "run.name=taken", "stage3.steps=7"])
    with pytest.raises(FileExistsError, match="another config"):
        run_pipeline(other, log=lambda message: None)

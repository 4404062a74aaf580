"""Asking a finished run: the session's small trap-corpus run of the whole pipeline
(tests/ray/conftest.py), then the API, the command and its errors on it (errors on copies of its small files)."""

import json
import shutil
import subprocess
import sys

import pytest

from clara_ray.ask import Clara, LocalIndex, RunNotReady, ask_command
from clara_ray.data.formats import read_qa
from clara_ray.errors import UserError
from clara_ray.eval.evaluate import query_reasoner_rankings
from clara_ray.eval.metrics import recall_at_k
from clara_ray.index.versions import IndexSettings, build_version, current_version, read_version_manifest
from clara_ray.training.tables import DOCUMENTS, read_table, write_documents

# The first test to use the session's small run builds it (minutes): more than the default timeout.
pytestmark = [pytest.mark.ray, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def clara(finished_run):
    return Clara.load(finished_run["run_dir"])


def _test_questions(summary):
    """The test questions the run's evaluation scored (those whose answers fit)."""
    run_dir = summary["run_dir"]
    set_aside = {row["id"] for row in json.loads(open(f"{run_dir}/steps/init.json").read())["long_answers"]["test_qa"]}
    return [q for q in read_qa(f"{run_dir}/data/test_qa.jsonl").records if q.id not in set_aside]


def _evaluation_rankings(clara, questions):
    """The ranking the pipeline's evaluation computes, over the same index version."""
    config = clara.config
    return query_reasoner_rankings(
        clara.model, clara.tokenizer, [q.question for q in questions], clara.index.search,
        max(config.stage3.num_candidates, 5), config.model.question_max_len, config.eval.batch_size,
    )


def test_ask_ranks_as_the_evaluation_and_finds_the_gold_document(finished_run, clara):
    questions = _test_questions(finished_run)
    rankings = _evaluation_rankings(clara, questions)
    recall = recall_at_k(rankings, [q.gold_doc_ids for q in questions], 1)
    # the in-process index ranks as the run's own evaluation did over its Ray index actors
    assert recall == finished_run["results"]["query reasoner after stage 3"]["recall@1"]
    assert recall >= 0.05, finished_run["results"]  # 3 of 60 questions; chance is 1/360

    answers = clara.ask_batch([q.question for q in questions], k=5)
    assert [[d.doc_id for d in a.documents] for a in answers] == [ranking[:5] for ranking in rankings]
    for answer in answers:
        scores = [d.score for d in answer.documents]
        assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)
        assert all(d.title is None and d.text for d in answer.documents)  # the trap corpus has no titles

    found = [q for q, ranking in zip(questions, rankings) if ranking[0] in q.gold_doc_ids]
    answer = clara.ask(found[0].question)
    assert len(answer.documents) == clara.config.stage3.top_k == 1
    assert answer.documents[0].doc_id in found[0].gold_doc_ids
    assert isinstance(answer.answer, str)


def test_the_ask_command_answers_a_test_question_with_the_gold_document_first(finished_run, clara, capsys):
    questions = _test_questions(finished_run)
    rankings = _evaluation_rankings(clara, questions)
    found = [q for q, ranking in zip(questions, rankings) if ranking[0] in q.gold_doc_ids][:2]

    assert ask_command(finished_run["run_dir"], [q.question for q in found], None, as_json=True) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    for question, line in zip(found, lines):
        reply = json.loads(line)
        assert reply["question"] == question.question and isinstance(reply["answer"], str)
        assert reply["documents"][0]["doc_id"] in question.gold_doc_ids
        assert set(reply["documents"][0]) == {"doc_id", "title", "score", "text"}

    assert ask_command(finished_run["run_dir"], [found[0].question], 3, as_json=False) == 0
    out = capsys.readouterr().out
    assert f"Q: {found[0].question}" in out and "\nA: " in out
    assert f"  1. {found[0].gold_doc_ids[0]}  score " in out and "  3. " in out


def test_asking_needs_no_ray(finished_run):
    """`clara-ray ask` runs in the user's process: loading the run and answering import no Ray."""
    script = ("import sys; from clara_ray.ask import Clara; "
              f"Clara.load({finished_run['run_dir']!r}).ask('In which city was someone born?', k=3); "
              "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def _copy_small_files(run_dir, to):
    """The files a load reads, but the model (steps/stage3.json still names the original)."""
    to.mkdir()
    shutil.copy(f"{run_dir}/config.yaml", to / "config.yaml")
    for name in ("steps", "index", "data"):
        shutil.copytree(f"{run_dir}/{name}", to / name)
    return to


def test_titles_come_from_the_runs_documents_table(finished_run, tmp_path):
    run = _copy_small_files(finished_run["run_dir"], tmp_path / "titled")
    table = read_table(run / "data" / DOCUMENTS)
    ids, texts = table.column("id").to_pylist(), table.column("text").to_pylist()
    titles = {d: f"Title of {d}" for d in ids}
    write_documents(run / "data" / DOCUMENTS, {d: f"{titles[d]}\n{text}" for d, text in zip(ids, texts)}, titles)
    answer = Clara.load(run).ask("In which city was someone born?", k=3)
    assert [d.title for d in answer.documents] == [f"Title of {d.doc_id}" for d in answer.documents]
    untitled = dict(zip(ids, texts))
    assert all(d.text == untitled[d.doc_id][:len(d.text)] for d in answer.documents)  # the preview without the title


def test_the_in_process_index_merges_shards_exactly(finished_run, clara, tmp_path):
    memory_dir = f"{finished_run['run_dir']}/memory"
    one = build_version(memory_dir, tmp_path / "one", 0, IndexSettings(num_shards=1))
    three = build_version(memory_dir, tmp_path / "three", 0, IndexSettings(num_shards=3))
    queries = clara.index.shards[0].memory[:4].astype("float32").reshape(4, -1)  # four documents' own memory
    whole, split = (LocalIndex(v, read_version_manifest(v)).search(queries, 10) for v in (one, three))
    assert (whole.doc_ids == split.doc_ids).all() and (whole.memory == split.memory).all()
    assert (whole.scores == split.scores).all()


def test_a_missing_run_directory_is_a_user_error(tmp_path, capsys):
    with pytest.raises(RunNotReady, match="is not a run directory"):
        Clara.load(tmp_path / "nothing")
    assert ask_command(str(tmp_path / "nothing"), ["Who?"], None, as_json=False) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "not a run directory" in err and "\n" not in err


def test_an_unfinished_run_is_a_user_error(finished_run, tmp_path):
    run = _copy_small_files(finished_run["run_dir"], tmp_path / "unfinished")
    (run / "steps" / "stage3.json").unlink()
    with pytest.raises(RunNotReady, match=r"run not finished: stage 3 has not finished .*steps/stage3.json missing"):
        Clara.load(run)


def test_an_index_of_another_compressor_is_a_user_error(finished_run, tmp_path):
    run = _copy_small_files(finished_run["run_dir"], tmp_path / "mismatch")
    manifest_path = current_version(run / "index") / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    model_fingerprint = json.loads(
        open(f"{json.loads((run / 'steps' / 'stage3.json').read_text())['model_dir']}/clara.json").read()
    )["compressor_fingerprint"]
    assert manifest["source"]["model_fingerprint"] == model_fingerprint  # the real run's match
    manifest["source"]["model_fingerprint"] = "0123456789abcdef"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=f"compressor \\(fingerprint {model_fingerprint}\\).*fingerprint 0123456789abcdef"):
        Clara.load(run)


def test_k_out_of_range_is_a_user_error(clara):
    with pytest.raises(UserError, match="k must be in"):
        clara.ask("Who?", k=0)

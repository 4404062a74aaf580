"""A run step by step, each step its own job process (`python jobs/<step>.py`), as a user
submits them: the same config and overrides every time; a step whose inputs are missing
names the step to run first; a finished step is not run again."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clara_ray.config import load_config
from clara_ray.pipeline import Run, StepNotReady
from clara_ray.training.checkpoints import latest_trainer_state

pytestmark = pytest.mark.ray

REPO = Path(__file__).parents[2]


def _overrides(output_dir) -> list[str]:
    return [
        f"run.output_dir={output_dir}", "run.name=steps", "data.trap.num_entities=12",
        "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.num_heads=2",
        "model.tiny.intermediate_size=64", "model.tiny.vocab_size=300", "train.num_workers=1",
        "stage1.steps=4", "stage1.report_every=2", "stage1.micro_batch_size_per_worker=4",
        "stage3.steps=4", "stage3.report_every=2", "stage3.micro_batch_size_per_worker=4",
        "stage3.top_k=2", "stage3.num_candidates=8", "eval.baselines=[bm25]", "encode.max_actors=1",
        "stage3.takeoff_recall=1.0",  # a 4-step tiny run never fits every question: no world steps, one attempt
    ]


def _job(local_ray, step: str, *arguments: str) -> tuple[dict, str]:
    """`python jobs/<step>.py ...` on the test cluster: (its last line as JSON, its whole output)."""
    env = {**os.environ, "RAY_ADDRESS": local_ray.get_runtime_context().gcs_address}
    done = subprocess.run([sys.executable, f"jobs/{step}.py", *arguments], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), output


def test_a_run_step_by_step_as_jobs(local_ray, tmp_path):
    overrides = _overrides(tmp_path)
    run_dir = tmp_path / "steps"
    # Out of order: each says which step comes first (no Ray needed to find out).
    run = Run(load_config(None, overrides), log=lambda line: None)
    with pytest.raises(StepNotReady, match=r"run `train --stage 1` first"):
        run.train(3)
    with pytest.raises(StepNotReady, match=r"run `encode_corpus` first"):
        run.build_index()

    prepared, _ = _job(local_ray, "prepare_data", *overrides)
    assert prepared["corpus"] > 0 and prepared["test_qa"] > 0 and prepared["run_dir"] == str(run_dir)
    stage1, _ = _job(local_ray, "train", "--stage", "1", *overrides)
    assert stage1["steps"] == 4 and Path(stage1["model_dir"]) == run_dir / "models" / "stage1"
    encoded, _ = _job(local_ray, "encode_corpus", *overrides)
    assert encoded["num_encoded"] == prepared["corpus"] and encoded["num_quarantined"] == 0
    index, _ = _job(local_ray, "build_index", *overrides)
    assert (run_dir / "index" / "CURRENT").read_text().strip() == index["version"]
    before, _ = _job(local_ray, "evaluate", *overrides)
    assert set(before) == {"query reasoner before stage 3"}
    stage3, _ = _job(local_ray, "train", "--stage", "3", *overrides)
    # 4 real steps, then 2 in counterfactual worlds skipped (the fit is below takeoff_recall):
    # the last window is step 4's, the stage ends at step 6 with one attempt
    attempts = run_dir / "attempts" / "stage3"
    assert stage3["steps"] == 4 and [p.name for p in attempts.iterdir()] == ["0"]
    assert latest_trainer_state(attempts / "0" / "ray_train" / "stage3")["step"] == 6
    after, _ = _job(local_ray, "evaluate", *overrides)
    assert set(after) == {"bm25", "query reasoner before stage 3", "query reasoner after stage 3"}
    assert after["query reasoner before stage 3"] == before["query reasoner before stage 3"]
    assert (run_dir / "report.md").exists() and json.loads((run_dir / "metrics.json").read_text())["results"] == after

    model_files = {p: p.stat().st_mtime_ns for p in (run_dir / "models" / "stage1").rglob("*") if p.is_file()}
    again, output = _job(local_ray, "train", "--stage", "1", *overrides)
    assert "stage1 finished in an earlier attempt" in output and again == stage1
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "models" / "stage1").rglob("*") if p.is_file()} == model_files

import csv
import json
from pathlib import Path

import pytest
import yaml

from clara_ray.cli import _parser, run_sweep_command
from clara_ray.config import load_config
from clara_ray.sweep import SWEPT, SourceRun, run_sweep

# The first test to use the session's small run builds it (minutes): more than the default timeout.
pytestmark = [pytest.mark.ray, pytest.mark.timeout(1800)]

# Two trials one at a time, so ASHA's decisions are deterministic, and made by
# design rather than by how training goes: at a learning rate of 1e-6 the query
# reasoner does not move in 4 steps, so every trial ranks the validation questions'
# candidates alike, and a trial that keeps L = 3 candidates has a lower validation
# MRR than one that keeps all 360 documents of the run's corpus (after its stage 1
# no gold document is among the first 3, or even the first 64, and every one is
# among all 360). Sweep seed 1 draws L = 360, then 3: the first trial runs to step 8
# (ASHA, grace 4, reduction factor 2, has nothing to compare it with at step 4) and ASHA
# stops the second at step 4 (below the first). A third trial would cost a Ray Train run
# (~50 s of the suite) and check nothing more.
SWEEP = [
    "sweep.num_trials=2", "sweep.steps=8", "sweep.grace_steps=4", "sweep.reduction_factor=2",
    "sweep.max_concurrent_trials=1", "stage3.report_every=4", "sweep.num_candidates=[3, 360]",
    "sweep.learning_rate=[1.0e-6, 2.0e-6]", "sweep.seed=1",
]


def test_sweep_over_stage3_stops_trials_early_and_writes_a_runnable_best_config(finished_run, tmp_path, capsys):
    # A sweep needs a run's stage 1 and encoded corpus: the session's small finished run
    # (tests/ray/conftest.py: one training worker, no counterfactual worlds, so a trial's
    # steps are sweep.steps, ASHA's rungs above); its stage 3 is not read. The sweep goes to <run>/sweep.
    base = Path(finished_run["run_dir"])
    # The command, as a user runs it: half the sweep's settings in a --config file, half as overrides.
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text("sweep:\n  num_trials: 2\n  steps: 8\n  grace_steps: 4\n  num_candidates: [3, 360]\n"
                          "stage3:\n  report_every: 4\n")
    args = _parser().parse_args(["sweep", "--from-run", str(base), "--config", str(sweep_file),
                                 *[o for o in SWEEP if not o.startswith(("sweep.num_trials", "sweep.steps",
                                                                         "sweep.grace_steps", "sweep.num_candidates",
                                                                         "stage3.report_every"))]])
    assert run_sweep_command(args, connect=lambda: None) == 0
    # In this process the trials' lines can still arrive after the summary (the command
    # stays on the test's cluster; `clara-ray sweep` leaves Ray before printing it).
    summary = json.loads([line for line in capsys.readouterr().out.splitlines() if line.startswith("{")][-1])
    out = base / "sweep"
    ran_with = load_config(out / "sweep_config.yaml")
    assert ran_with == SourceRun.open(base, SWEEP).config  # file, then overrides, on the run's config

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == summary["trials"] == 2
    assert all(int(r["last_step"]) == 8 for r in rows if r["stopped_early"] == "False")
    stopped = [r for r in rows if r["stopped_early"] == "True"]
    assert stopped and summary["stopped_early"] == len(stopped) and all(int(r["last_step"]) == 4 for r in stopped)
    assert [int(r["num_candidates"]) for r in stopped] == [3]  # ASHA stopped the worse trial, and only it
    assert "yes (ASHA)" in (out / "results.md").read_text()
    assert (out / "temperature.png").stat().st_size > 0
    # Validation questions are held out of the stage-3 training questions.
    train = _ids(out / "data" / "stage3_questions.arrow")
    held = _ids(out / "data" / "stage3_validation.arrow")
    assert held and not train & held

    best = load_config(summary["best_config"])  # what `clara-ray demo --config` reads
    assert best.run.name == f"{base.name}-sweep-best" and best.stage3.validation_fraction == 0
    assert {k: getattr(best.stage3, k) for k in ("top_k", "num_candidates")} == {
        k: int(rows[0][k]) for k in ("top_k", "num_candidates")}
    assert best.stage3.temperature == pytest.approx(float(rows[0]["temperature"]))
    assert float(rows[0]["best_val_recall_at_1"]) == max(float(r["best_val_recall_at_1"]) for r in rows)
    assert len({r["best_val_mrr"] for r in rows}) > 1  # the metric ASHA stops on tells the trials apart
    assert yaml.safe_load((out / "best.yaml").read_text())["model"] == load_config(base / "config.yaml").to_dict()["model"]
    assert set(SWEPT) <= set(rows[0])

    with pytest.raises(FileExistsError, match="finished sweep"):
        run_sweep(SourceRun.open(base, SWEEP), log=lambda m: None)


def _ids(path):
    from clara_ray.training.tables import read_table

    return set(read_table(path).column("question_id").to_pylist())

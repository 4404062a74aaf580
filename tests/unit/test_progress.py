"""Progress of the long steps: bars on a terminal, periodic lines otherwise (clara_ray/progress.py)."""

import time

import pytest

from clara_ray.progress import PROGRESS_ENV, Progress, StageBar, read_stage_progress, use_bars, write_stage_progress


@pytest.mark.parametrize(("choice", "expected"), [("bars", True), ("lines", False), ("LINES", False)])
def test_the_environment_chooses_bars_or_lines(monkeypatch, choice, expected):
    monkeypatch.setenv(PROGRESS_ENV, choice)
    assert use_bars() is expected


def test_without_a_terminal_there_are_lines(monkeypatch):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    assert use_bars() is False  # pytest's captured stderr is no terminal


def test_lines_come_every_interval_and_say_where_the_step_stands():
    lines = []
    with Progress("evaluate: answer (bm25)", 100, unit="questions", every_s=0, log=lines.append, bars=False) as progress:
        progress.update(25, "loss 1.5")
        progress.update(25)
        progress.update(50)  # done: the step's own 'done in' line follows
    assert len(lines) == 2
    assert lines[0].startswith("[evaluate: answer (bm25)] 25/100 questions (25%) loss 1.5 | ")
    assert "eta" in lines[0] and lines[1].startswith("[evaluate: answer (bm25)] 50/100 questions (50%) loss 1.5")


def test_a_step_shorter_than_the_interval_prints_no_line():
    lines = []
    with Progress("short", 10, every_s=3600, log=lines.append, bars=False) as progress:
        progress.update(10)
    assert lines == [] and progress.done == 10


def test_progress_never_goes_back_or_past_the_total():
    with Progress("resumed", 10, log=lambda line: None, bars=False) as progress:
        progress.set(6)
        progress.set(4)  # a worker group restarted from an earlier checkpoint
        assert progress.done == 6
        progress.set(12)
        assert progress.done == 10


def test_a_bar_draws_on_stderr(capsys):
    with Progress("evaluate: retrieve (clara)", 8, unit="questions", bars=True) as progress:
        progress.update(8, "loss 0.25")
    assert "evaluate: retrieve (clara)" in capsys.readouterr().err


def test_the_stage_bar_follows_rank_0s_progress_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(PROGRESS_ENV, "bars")
    path = tmp_path / "ray_train" / "stage1" / "progress.json"
    write_stage_progress(path, 1, 10, "")  # a file of an earlier run is removed, not drawn
    with StageBar(path, "stage1", 10, poll_s=0.05) as bar:
        assert bar.active and not path.exists()
        write_stage_progress(path, 3, 10, "loss 2.5")
        deadline, drawn = time.monotonic() + 30, ""
        while "3/10" not in drawn and time.monotonic() < deadline:
            time.sleep(0.05)
            drawn += capsys.readouterr().err
    assert "3/10" in drawn and "loss 2.5" in drawn
    assert read_stage_progress(path) == {"step": 3, "total": 10, "status": "loss 2.5"}


def test_in_lines_mode_the_stage_bar_does_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(PROGRESS_ENV, "lines")
    with StageBar(tmp_path / "progress.json", "stage3", 10) as bar:
        assert not bar.active


def test_an_unreadable_progress_file_is_no_progress(tmp_path):
    assert read_stage_progress(tmp_path / "missing.json") is None
    (tmp_path / "half.json").write_text('{"step": ')
    assert read_stage_progress(tmp_path / "half.json") is None

from clara_ray.cli import main


def test_bad_override_is_rejected_before_anything_runs(capsys):
    assert main(["demo", "stage3.temperature=-1"]) == 2
    assert "stage3.temperature" in capsys.readouterr().err


def test_unknown_key_is_rejected(capsys):
    assert main(["demo", "stage3.temprature=0.1"]) == 2
    assert "unknown key" in capsys.readouterr().err


def test_user_files_must_come_together(capsys):
    assert main(["demo", "--corpus", "corpus.jsonl"]) == 2
    assert "train_qa" in capsys.readouterr().err


def test_sweep_from_a_missing_or_unfinished_run_says_what_to_do(tmp_path, capsys):
    assert main(["sweep", "--from-run", str(tmp_path / "nowhere")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / "config.yaml").write_text("run:\n  name: early\n")
    assert main(["sweep", "--from-run", str(tmp_path / "early")]) == 2
    assert "until it has encoded the corpus" in capsys.readouterr().err
    assert main(["sweep", "--from-run", str(tmp_path / "early"), "sweep.temperature=[0.1, 0.01]"]) == 2
    assert "sweep.temperature" in capsys.readouterr().err

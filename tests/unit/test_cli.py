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

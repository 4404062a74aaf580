from pathlib import Path

import pytest

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
    # a sweep config file: missing, or with a bad value, each one line
    assert main(["sweep", "--from-run", str(tmp_path / "early"), "--config", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"clara-ray: config file not found: {tmp_path / 'missing.yaml'}"
    (tmp_path / "bad.yaml").write_text("sweep:\n  top_k: [0]\n")
    assert main(["sweep", "--from-run", str(tmp_path / "early"), "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "sweep.top_k: must list at least one value" in capsys.readouterr().err


def test_the_bundled_sweep_config_layers_on_a_run_config():
    from clara_ray.config import Config, load_config, overrides_from_file

    config = load_config(None, overrides_from_file(Path(__file__).parents[2] / "jobs/configs/sweep_temperature.yaml"))
    assert config.sweep.temperature == (0.002, 0.2) and config.sweep.top_k == [1]
    assert config.stage3 == Config().stage3  # only the sweep section changes


def _user_files(tmp_path, num_train: int):
    import json

    corpus = [{"id": f"d{i}", "text": f"Person {i} grew up in town {i}."} for i in range(40)]
    train = [{"question": f"Where did person {i} grow up?", "answers": [f"town {i}"]} for i in range(num_train)]
    test = [{"question": "Where did person 39 grow up?", "answers": ["town 39"]}]
    for name, rows in (("corpus", corpus), ("train", train), ("test", test)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return ["--corpus", str(tmp_path / "corpus.jsonl"), "--train-qa", str(tmp_path / "train.jsonl"),
            "--test-qa", str(tmp_path / "test.jsonl"), f"run.output_dir={tmp_path / 'runs'}"]


def test_a_missing_data_file_is_one_line_before_ray_starts(tmp_path, capsys, monkeypatch):
    import clara_ray.cli

    monkeypatch.setattr(clara_ray.cli, "start_ray", lambda *args, **kwargs: pytest.fail("Ray started"))
    args = _user_files(tmp_path, 40)
    args[1] = str(tmp_path / "missing.jsonl")
    assert main(["demo", *args]) == 2
    err = capsys.readouterr().err
    assert err == f"clara-ray: data.corpus: no such file: {tmp_path / 'missing.jsonl'}\n"


def test_a_missing_model_file_is_one_line_before_ray_starts(tmp_path, capsys, monkeypatch):
    import clara_ray.cli

    monkeypatch.setattr(clara_ray.cli, "start_ray", lambda *args, **kwargs: pytest.fail("Ray started"))
    missing = tmp_path / "model.gguf"
    assert main(["demo", f"model.backbone={missing}", f"run.output_dir={tmp_path / 'runs'}"]) == 2
    assert capsys.readouterr().err == f"clara-ray: model.backbone: no GGUF file at {missing}\n"


def test_too_few_training_questions_is_one_line_not_a_worker_traceback(tmp_path, capsys, monkeypatch):
    import clara_ray.cli

    monkeypatch.setattr(clara_ray.cli, "start_ray", lambda *args, **kwargs: None)  # fails before any Ray work
    assert main(["demo", *_user_files(tmp_path, 1)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("clara-ray: stage") and "cannot fill one step of 32 per worker on 2 workers" in err


def test_a_rerun_on_changed_data_files_is_refused(tmp_path, capsys, monkeypatch):
    import clara_ray.cli

    monkeypatch.setattr(clara_ray.cli, "start_ray", lambda *args, **kwargs: None)
    args = _user_files(tmp_path, 1)
    assert main(["demo", *args]) == 2  # too few questions; the run directory keeps its first step
    assert "cannot fill" in capsys.readouterr().err
    _user_files(tmp_path, 40)  # the user adds questions and reruns the same command
    assert main(["demo", *args]) == 2
    assert "the data files changed since the run" in capsys.readouterr().err


def test_encoding_takes_the_models_document_length_unless_one_is_given():
    from clara_ray.cli import encoding_config
    from clara_ray.config import ConfigError, load_config

    assert encoding_config(load_config(None), num_memory_tokens=3).model.doc_max_len == 48
    assert encoding_config(load_config(None, ["model.doc_max_len=32"]), 2).model.doc_max_len == 32
    with pytest.raises(ConfigError, match="the model has 3 memory tokens but the config gives 2"):
        encoding_config(load_config(None, ["model.doc_max_len=32"]), 3)


def test_a_job_api_address_in_ray_address_is_one_line(tmp_path, capsys, monkeypatch):
    """RAY_ADDRESS as set for `ray job submit` (http://head:8265) cannot be joined by
    a driver: say so instead of Ray's traceback."""
    import ray

    monkeypatch.setattr(ray, "init", lambda **kwargs: pytest.fail("ray.init called"))
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    assert main(["demo", f"run.output_dir={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "RAY_ADDRESS=http://127.0.0.1:8265 is a job-submission address" in err


def test_overrides_after_encode_input_files_are_overrides(tmp_path, monkeypatch):
    """--input takes every word after it; `section.key=value` words are overrides
    unless such a file exists."""
    import clara_ray.cli

    monkeypatch.chdir(tmp_path)
    Path("a.b=c").write_text("")  # a file whose name reads like an override stays an input
    seen = {}
    monkeypatch.setattr(clara_ray.cli, "start_ray", lambda *args, **kwargs: None)
    monkeypatch.setattr(clara_ray.cli, "run_encode", lambda args, config: seen.update(
        inputs=args.input, batch_size=config.encode.batch_size) or 0)
    assert main(["encode", "--model-dir", "m", "--output", "o", "--input", "x.jsonl", "a.b=c",
                 "encode.batch_size=8"]) == 0
    assert seen == {"inputs": ["x.jsonl", "a.b=c"], "batch_size": 8}


def test_a_run_directory_of_another_config_is_refused_before_ray_starts(tmp_path, capsys, monkeypatch):
    import clara_ray.cli

    monkeypatch.setattr(clara_ray.cli, "start_ray", lambda *args, **kwargs: pytest.fail("Ray started"))
    run_dir = tmp_path / "runs" / "demo"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("run:\n  name: demo\nstage3:\n  steps: 7\n")
    assert main(["demo", f"run.output_dir={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "belongs to a run with another config" in err
    (run_dir / "config.yaml").unlink()
    (run_dir / "notes.txt").write_text("not a run")
    assert main(["demo", f"run.output_dir={tmp_path / 'runs'}"]) == 2
    assert "is not empty and holds no run" in capsys.readouterr().err

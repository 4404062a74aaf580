from pathlib import Path

import pytest

from clara_ray.config import ConfigError, load_config
from clara_ray.training.steps import attempt_fit


def test_an_attempt_fits_by_training_recall_over_its_last_two_windows():
    history = [{"step": 25, "train_recall_at_1": 0.1}, {"step": 50, "train_recall_at_1": 0.6},
               {"step": 75, "train_recall_at_1": 0.8}]
    assert attempt_fit(history) == ("train_recall_at_1", pytest.approx(0.7))
    assert attempt_fit(history[:1]) == ("train_recall_at_1", pytest.approx(0.1))


def test_an_attempt_with_a_validation_split_fits_by_validation_recall():
    history = [{"step": 25, "train_recall_at_1": 0.9, "val_recall_at_1": 0.2},
               {"step": 50, "train_recall_at_1": 1.0, "val_recall_at_1": 0.4}]
    assert attempt_fit(history) == ("val_recall_at_1", pytest.approx(0.3))


def test_three_attempts_by_default_one_with_a_trainable_compressor_and_never_several_with_it():
    assert load_config(None, []).stage3.num_attempts == 3
    assert load_config(None, ["stage3.compressor=trainable"]).stage3.num_attempts == 1
    assert load_config(None, ["stage3.attempts=1"]).stage3.num_attempts == 1
    with pytest.raises(ConfigError, match="stage3.attempts: needs stage3.compressor=frozen"):
        load_config(None, ["stage3.compressor=trainable", "stage3.attempts=2"])


@pytest.mark.parametrize(("fits", "ran", "kept"), [
    ([0.95], 1, 0),               # fits the target: done
    ([0.85, 0.3, 0.92], 3, 2),    # took off but short of the target: another seed, until one fits
    ([0.004], 1, 0),              # took off on nothing: no further attempt (CLaRa's sample)
    ([0.85, 0.1, 0.8], 2, 0),     # the second took off on nothing: stop, keep the better
])
def test_attempts_stop_at_the_target_or_when_one_took_off_on_nothing(tmp_path, monkeypatch, fits, ran, kept):
    from clara_ray.training import stages

    def fake_stage3(config, data, model_dir, candidates, run_dir):
        attempt = (config.run.seed - 7) // stages.ATTEMPT_SEED_STRIDE
        model = Path(run_dir) / "models" / "stage3"
        model.mkdir(parents=True)
        (model / "adapters.safetensors").write_text(str(attempt))
        return stages.StageResult(model, [{"step": 4, "train_recall_at_1": fits[attempt]}], [])

    monkeypatch.setattr(stages, "run_stage3", fake_stage3)
    config = load_config(None, ["run.seed=7", "stage3.attempts=3"])
    messages = []
    result, tried = stages.run_stage3_attempts(config, None, tmp_path / "stage1", None, tmp_path, messages.append)
    assert [r["attempt"] for r in tried] == list(range(ran))
    assert [r["kept"] for r in tried] == [i == kept for i in range(ran)]
    assert (result.model_dir / "adapters.safetensors").read_text() == str(kept)
    assert any("no further attempt" in m for m in messages) == (fits[ran - 1] < 0.2 and ran < 3)


def test_the_report_says_why_no_further_attempt_ran():
    from clara_ray.report import _attempt_lines

    one = [{"attempt": 0, "seed": 0, "fit": "train_recall_at_1", "fit_value": 0.003, "kept": True}]
    text = "\n".join(_attempt_lines(one, 3, 0.2))
    assert "ran once (up to 3)" in text and "below stage3.takeoff_recall (0.2)" in text
    fitted = [{**one[0], "fit_value": 0.95}]
    assert "takeoff_recall" not in "\n".join(_attempt_lines(fitted, 3, 0.2))

import pytest

from clara_ray.config import ConfigError, load_config
from clara_ray.training.stages import attempt_fit


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

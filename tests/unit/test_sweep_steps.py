"""A sweep trial trains what the demo's stage 3 trains: sweep.steps, then the counterfactual world steps."""

from clara_ray.config import load_config
from clara_ray.sweep import trial_config, trial_steps
from clara_ray.training.settings import Stage3Settings


def test_a_trial_counts_its_world_steps_in_what_asha_may_run():
    config = load_config(None, ["sweep.steps=40", "sweep.grace_steps=10", "stage3.world_steps_fraction=0.5"])
    trial = trial_config(config, {"temperature": 0.02, "initial_temperature": 0.1, "top_k": 1,
                                  "num_candidates": 64, "learning_rate": 5e-4}, config.sweep.steps, 0.1)
    settings = Stage3Settings.from_config(trial)
    assert (settings.schedule_steps, settings.steps) == (40, 60) and trial_steps(config) == 60
    plain = load_config(None, ["sweep.steps=40", "sweep.grace_steps=10", "stage3.counterfactual_rate=0"])
    assert trial_steps(plain) == 40

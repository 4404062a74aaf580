"""The learning-rate schedule both updaters use is DeepSpeed's WarmupCosineLR, update for update."""

import pytest
import torch

from clara_ray.training.engine import OptimiserSettings, TorchUpdater, warmup_cosine


@pytest.mark.parametrize(("total", "warmup"), [(1000, 50), (600, 30), (10, 1), (5, 0)])
def test_schedule_matches_deepspeed_as_its_engine_steps_it(total, warmup):
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    reference = WarmupCosineLR(optimizer, total_num_steps=total, warmup_num_steps=max(1, warmup))
    for update in range(1, total + 3):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * warmup_cosine(update, total, warmup), abs=1e-12)
        reference.step()  # what DeepSpeed's engine does after each update


def test_torch_updater_runs_the_schedule_and_holds_the_gain_group():
    model = torch.nn.Linear(2, 1)
    updater = TorchUpdater(model, OptimiserSettings(learning_rate=0.1, total_steps=20, warmup_steps=4, gradient_clipping=1.0))
    rates = []
    for _ in range(20):
        rates.append(updater.learning_rate())
        updater.backward(model(torch.ones(3, 2)).sum())
        updater.step()
    assert rates == pytest.approx([0.1 * warmup_cosine(u, 20, 4) for u in range(1, 21)])
    assert rates[0] == rates[1] == 0.0 and max(rates) == pytest.approx(0.1, rel=0.05)

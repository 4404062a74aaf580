"""The learning-rate schedule both updaters use is DeepSpeed's WarmupCosineLR, update for update."""

import math

import pytest
import torch

from clara_ray.training.engine import TorchUpdater, warmup_cosine
from clara_ray.training.settings import OptimiserSettings


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


def test_torch_updater_in_bf16_computes_in_bf16_and_keeps_float32_weights():
    model = torch.nn.Linear(4, 2)
    start = model.weight.detach().clone()
    settings = OptimiserSettings(learning_rate=0.1, total_steps=4, warmup_steps=0, gradient_clipping=1.0)
    assert TorchUpdater(model, settings).forward(torch.ones(3, 4)).dtype == torch.float32
    updater = TorchUpdater(model, settings, bf16=True)
    for _ in range(3):  # the first two updates run at rate 0
        out = updater.forward(torch.ones(3, 4))
        assert out.dtype == torch.bfloat16
        updater.backward(out.float().sum())
        updater.step()
    assert model.weight.dtype == torch.float32 and not torch.equal(model.weight, start)


_DEEPSPEED_ON_CPU = """
import deepspeed.comm.comm as ds_comm, torch
from clara_ray.training.engine import DeepSpeedUpdater
from clara_ray.training.settings import OptimiserSettings
updater = DeepSpeedUpdater(torch.nn.Linear(2, 1), OptimiserSettings(learning_rate=0.1, total_steps=4, warmup_steps=1, gradient_clipping=1.0),
                           micro_batch_size=1, zero_stage=2, use_gpu=False, bf16=False)
updater.backward(updater.forward(torch.ones(1, 2)).sum())
updater.step()
assert ds_comm.cdb.shm_comm_op is None
print("ok")
"""


def test_deepspeed_on_cpu_never_waits_on_a_build_lock_a_killed_worker_left(tmp_path, monkeypatch):
    """DeepSpeed's CPU backend JIT-built an inference-only op under a lock file; a worker
    killed mid-build left the lock and every later start waited on it for ever. The
    updater skips that op: it starts beside such a lock and builds nothing."""
    import os
    import socket
    import subprocess
    import sys

    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder
    from torch.utils.cpp_extension import _get_build_directory

    extensions = tmp_path / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    stale = _get_build_directory(ShareMemCommBuilder.NAME, verbose=False)  # where DeepSpeed would build it
    os.makedirs(stale, exist_ok=True)
    open(os.path.join(stale, "lock"), "w").close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1"}
    # One process group of one, in a child so that this process stays free of it.
    done = subprocess.run([sys.executable, "-c", _DEEPSPEED_ON_CPU], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
    assert [p.name for p in extensions.rglob("*") if p.is_file()] == ["lock"]  # nothing was built


def test_a_second_cosine_runs_after_the_schedule_when_extra_steps_are_asked_for():
    from clara_ray.training.engine import COSINE_FLOOR, learning_rate_ratio

    plain = OptimiserSettings(learning_rate=0.1, total_steps=20, warmup_steps=4, gradient_clipping=1.0)
    more = OptimiserSettings(learning_rate=0.1, total_steps=20, warmup_steps=4, gradient_clipping=1.0,
                             extra_steps=10, restart_ratio=0.3)
    assert [learning_rate_ratio(u, more) for u in range(1, 21)] == [warmup_cosine(u, 20, 4) for u in range(1, 21)]
    assert learning_rate_ratio(25, plain) == pytest.approx(COSINE_FLOOR)  # past the schedule: the floor
    second = [learning_rate_ratio(u, more) for u in range(21, 31)]
    assert second[0] == pytest.approx(COSINE_FLOOR + (0.3 - COSINE_FLOOR) * (1 + math.cos(math.pi / 10)) / 2)
    assert second[-1] == pytest.approx(COSINE_FLOOR) and second == sorted(second, reverse=True)
    model = torch.nn.Linear(2, 1)
    updater = TorchUpdater(model, more)
    rates = []
    for _ in range(30):
        rates.append(updater.learning_rate())
        updater.backward(model(torch.ones(3, 2)).sum())
        updater.step()
    assert rates == pytest.approx([0.1 * learning_rate_ratio(u, more) for u in range(1, 31)])

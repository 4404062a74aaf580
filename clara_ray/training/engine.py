"""DeepSpeed set-up shared by the training stages (runs inside a Ray Train worker)."""

from __future__ import annotations

import contextlib
import os

import torch


def deepspeed_config(
    micro_batch_size: int, learning_rate: float, total_steps: int, warmup_steps: int,
    zero_stage: int, gradient_clipping: float, bf16: bool,
) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": gradient_clipping,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bf16},
        # torch's AdamW: no fused/CPU-Adam op to compile, same maths.
        "optimizer": {"type": "AdamW", "params": {"lr": learning_rate, "weight_decay": 0.0, "torch_adam": True}},
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {"total_num_steps": total_steps, "warmup_num_steps": max(1, warmup_steps)},
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def parameter_groups(model, gain_learning_rate: float | None = None) -> list[dict]:
    """Trainable parameters as optimizer groups: the query reasoner's retrieval gains
    (one scalar per memory slot) get their own learning rate when one is given
    (0 keeps them where they are); the scheduler scales every group's rate alike."""
    gains = set() if gain_learning_rate is None else {id(p) for p in model.retrieval_gain_parameters().values()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in gains]}]
    if any(id(p) in gains for p in trainable):
        groups.append({"params": [p for p in trainable if id(p) in gains], "lr": gain_learning_rate})
    return groups


def hold_last_group(engine) -> None:
    """Learning rate 0 for the last optimizer group (the retrieval gains, see
    `parameter_groups`) in the coming step; DeepSpeed's scheduler sets every group's
    rate again after each step, so call it before each step to hold."""
    engine.optimizer.param_groups[-1]["lr"] = 0.0


class ParameterAnchor:
    """Squared L2 distance of a ClaraModel's trainable parameters, the retrieval gains
    excepted (they have their own rate and are meant to move), from their values when
    this was made; stage 3's `anchor_weight` multiplies it into the loss. Always 0
    for weight 0, with nothing copied. Needs whole parameters on this rank: ZeRO 0-2
    (the config rejects ZeRO-3 with an anchor)."""

    def __init__(self, model, weight: float):
        gains = {id(p) for p in model.retrieval_gain_parameters().values()}
        self.params = [p for p in model.parameters() if p.requires_grad and id(p) not in gains] if weight > 0 else []
        self.start = [p.detach().clone() for p in self.params]

    def penalty(self) -> torch.Tensor:
        total = torch.zeros((), device=self.params[0].device if self.params else None)
        for param, start in zip(self.params, self.start):
            total = total + (param.float() - start.float()).pow(2).sum()
        return total


def initialize(model, config: dict, use_gpu: bool, gain_learning_rate: float | None = None):
    """Wrap `model` in a DeepSpeed engine on the process group Ray Train made."""
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=parameter_groups(model, gain_learning_rate), config=config)
    return engine


@contextlib.contextmanager
def full_parameters(engine, zero_stage: int):
    """Every rank sees whole parameters inside (ZeRO-3 shards them); all ranks must enter."""
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            yield
    else:
        yield

"""How a training step updates a model: the learning-rate schedule, optimizer
groups, and the two updaters the step functions (``clara_ray.training.steps``)
take — DeepSpeed (inside a Ray Train worker) or plain PyTorch (one process: tests,
benchmarks, a GPU box with nothing but torch). Both use the same schedule and the
same optimizer groups, so a step computes the same update either way."""

from __future__ import annotations

import contextlib
import math
import os
import re

import torch

from clara_ray.training.settings import OptimiserSettings

COSINE_FLOOR = 1e-4  # the schedule's last ratio (DeepSpeed's WarmupCosineLR default)


def learning_rate_ratio(update: int, settings: OptimiserSettings) -> float:
    """The schedule's ratio for the `update`-th optimizer step (1-based): `warmup_cosine`
    over `total_steps`, then, over `extra_steps` more, a cosine from `restart_ratio`."""
    over = update - settings.total_steps
    if over <= 0 or settings.extra_steps == 0:
        return warmup_cosine(update, settings.total_steps, settings.warmup_steps)
    progress = min(1.0, over / settings.extra_steps)
    return COSINE_FLOOR + (settings.restart_ratio - COSINE_FLOOR) * (1 + math.cos(math.pi * progress)) / 2


def warmup_cosine(update: int, total_steps: int, warmup_steps: int) -> float:
    """Learning-rate ratio for the `update`-th optimizer step (1-based): log warm-up
    then a cosine to COSINE_FLOOR. The same numbers as DeepSpeed's WarmupCosineLR as
    its engine steps it (its first two updates run at ratio 0: it starts at
    iteration -1 and is stepped after each update)."""
    iteration = update - 2
    if iteration < 0:
        return 0.0
    warmup = max(2, warmup_steps)
    if iteration < warmup:
        return math.log(iteration + 1) / math.log(warmup)
    progress = min(1.0, (iteration - warmup + 1) / max(1, total_steps - warmup))
    return max(0.0, COSINE_FLOOR + (1 - COSINE_FLOOR) * (1 + math.cos(math.pi * progress)) / 2)


def schedule(optimizer: torch.optim.Optimizer, settings: OptimiserSettings) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR counts from 0 at construction; update u runs at its epoch u - 1."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: learning_rate_ratio(epoch + 1, settings)
    )


def deepspeed_config(micro_batch_size: int, zero_stage: int, gradient_clipping: float, learning_rate: float, bf16: bool) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": gradient_clipping,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bf16},
        # torch's AdamW: no fused/CPU-Adam op to compile, same maths.
        "optimizer": {"type": "AdamW", "params": {"lr": learning_rate, "weight_decay": 0.0, "torch_adam": True}},
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


_LAYER = re.compile(r"\.layers\.(\d+)\.")  # a decoder layer's index in a parameter name (Llama, Mistral, Qwen)


class ParameterAnchor:
    """Squared L2 distance of a ClaraModel's trainable parameters, the retrieval gains
    excepted (they have their own rate and are meant to move), from where they
    started: their values when this was made, or those saved in the model directory
    `start` (a run resumed from a checkpoint still measures from the stage's start).

    `penalty` covers them all (stage 3's `anchor_weight`); `lower_penalty` only the
    LoRA matrices of the decoder layers below the top `free_top_layers` (stage 3's
    `lower_anchor_weight`). Both are 0 with nothing copied when their weights are 0.
    Needs whole parameters on this rank: ZeRO 0-2 (the config rejects ZeRO-3 with an
    anchor)."""

    def __init__(self, model, weight: float, start: str | os.PathLike | None = None, lower_weight: float = 0.0,
                 free_top_layers: int = 1):
        gains = {id(p) for p in model.retrieval_gain_parameters().values()}
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in gains]
        depth = model.lm.get_base_model().config.num_hidden_layers
        lower = {n for n, _ in trainable if "lora_" in n and (m := _LAYER.search(n)) is not None
                 and int(m.group(1)) < depth - free_top_layers} if lower_weight > 0 else set()
        named = trainable if weight > 0 else [(n, p) for n, p in trainable if n in lower]  # only what is pulled
        if start is None:
            starts = [p.detach().clone() for _, p in named]
        else:
            from safetensors.torch import load_file

            from clara_ray.modeling.checkpoint import ADAPTERS

            saved = load_file(os.path.join(start, ADAPTERS))
            starts = [saved[n].to(p.device, p.dtype) for n, p in named]
        self.params, self.start = ([p for _, p in named], starts) if weight > 0 else ([], [])
        pulled = [(p, s) for (n, p), s in zip(named, starts) if n in lower]
        self.lower_params, self.lower_start = [p for p, _ in pulled], [s for _, s in pulled]

    def penalty(self) -> torch.Tensor:
        return _distance(self.params, self.start)

    def lower_penalty(self) -> torch.Tensor:
        return _distance(self.lower_params, self.lower_start)


def _distance(params: list[torch.Tensor], starts: list[torch.Tensor]) -> torch.Tensor:
    total = torch.zeros((), device=params[0].device if params else None)
    for param, start in zip(params, starts):
        total = total + (param.float() - start.float()).pow(2).sum()
    return total


def hold_last_group(optimizer: torch.optim.Optimizer) -> None:
    """Learning rate 0 for the last optimizer group (the retrieval gains, see
    `parameter_groups`) in the coming update; the schedule sets every group's rate
    again after each update, so call it before each update to hold."""
    optimizer.param_groups[-1]["lr"] = 0.0


class TorchUpdater:
    """One process, plain PyTorch: AdamW over `parameter_groups`, gradient clipping,
    the schedule. With `bf16`, the forward pass runs under bf16 autocast (weights and
    optimizer state stay float32, as DeepSpeed's bf16 keeps fp32 master weights)."""

    def __init__(self, model, settings: OptimiserSettings, bf16: bool = False):
        self.module = model
        self.bf16 = bf16
        self.optimizer = torch.optim.AdamW(
            parameter_groups(model, settings.gain_learning_rate), lr=settings.learning_rate, weight_decay=0.0
        )
        self.scheduler = schedule(self.optimizer, settings)
        self.clipping = settings.gradient_clipping
        self.device = next(model.parameters()).device

    def forward(self, *args, **kwargs):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, hold_gains: bool = False) -> None:
        if self.clipping > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.module.parameters() if p.requires_grad], self.clipping)
        if hold_gains:
            hold_last_group(self.optimizer)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


def _skip_shared_memory_op(deepspeed) -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op when the
    process group starts, used only by `inference_all_reduce`, which training never
    calls. Marking the op unavailable (DeepSpeed keeps the table it reads for edits)
    saves that build — minutes on a small machine — and its lock file: a worker killed
    mid-build leaves the lock behind and every later run waited on it for ever."""
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


class DeepSpeedUpdater:
    """A DeepSpeed engine on the process group Ray Train made (ZeRO as configured);
    the same optimizer groups and schedule as `TorchUpdater`."""

    def __init__(self, model, settings: OptimiserSettings, micro_batch_size: int, zero_stage: int, use_gpu: bool, bf16: bool):
        if not use_gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        if not use_gpu:
            _skip_shared_memory_op(deepspeed)
        deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")
        config = deepspeed_config(micro_batch_size, zero_stage, settings.gradient_clipping, settings.learning_rate, bf16)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=parameter_groups(model, settings.gain_learning_rate), config=config,
            lr_scheduler=lambda optimizer: schedule(optimizer, settings),
        )
        self.module, self.forward, self.device = self.engine.module, self.engine, self.engine.device
        # The torch optimizer that steps (under ZeRO, over this rank's fp32 partitions) and its schedule.
        self.optimizer, self.scheduler = self.engine.basic_optimizer, self.engine.lr_scheduler
        self.zero_stage = zero_stage

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self, hold_gains: bool = False) -> None:
        if hold_gains:
            hold_last_group(self.engine.optimizer)
        self.engine.step()

    def learning_rate(self) -> float:
        return self.engine.get_lr()[0]


@contextlib.contextmanager
def full_parameters(updater):
    """Every rank sees whole parameters inside (ZeRO-3 shards them); all ranks must enter."""
    if getattr(updater, "zero_stage", 0) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(updater.module.parameters()), modifier_rank=None):
            yield
    else:
        yield

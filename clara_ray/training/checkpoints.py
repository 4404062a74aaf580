"""Training checkpoints: everything a stage needs to go on exactly where it stopped.

Layout of one checkpoint directory (each rank writes its own files; Ray Train
gathers every rank's files of one report into one directory):

    model/                 rank 0: the model directory (``clara_ray.modeling.checkpoint``)
                           with every weight whole (ZeRO-3 gathered); a checkpoint is
                           also a model you can load, evaluate or encode with
    trainer_state.json     rank 0: {format_version, stage, step, steps, index_version,
                           history, resumed_after} — the last finished step, the metric
                           windows so far, and the steps after which the stage resumed
    rank-<r>.safetensors   rank r: its optimizer's state tensors ("state.<param>.<name>"),
                           the master weights it steps ("master.<group>.<i>": under ZeRO
                           these are the rank's fp32 partitions) and torch's RNG state
                           ("rng.torch")
    rank-<r>.json          rank r: the optimizer's param groups and non-tensor state,
                           the learning-rate schedule's state, the batches' Python RNG state

Loading reads safetensors and JSON only: nothing in a checkpoint is unpickled.
Resume = load the model from ``model/`` before the optimizer is built (so its master
copies start from the saved weights), then ``load_rank_state`` overwrites masters,
optimizer and schedule with the saved ones; batches restart after ``step``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
MODEL_DIR = "model"
TRAINER_STATE = "trainer_state.json"


def _rank_files(directory: Path, rank: int) -> tuple[Path, Path]:
    return directory / f"rank-{rank}.safetensors", directory / f"rank-{rank}.json"


def _json_ready(value):
    if isinstance(value, tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, list):
        return [_json_ready(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    return value


def _tupled(value):
    """random.setstate needs the nested tuples JSON turned into lists."""
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


def save_rank_state(directory: str | Path, rank: int, optimizer: torch.optim.Optimizer, scheduler,
                    batch_rng: random.Random | None = None) -> None:
    """`optimizer`: the torch optimizer that steps (under DeepSpeed its basic optimizer)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    state = optimizer.state_dict()
    scalars: dict[str, dict] = {}
    for param, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"state.{param}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(param), {})[name] = value
    for g, group in enumerate(optimizer.param_groups):
        for i, master in enumerate(group["params"]):
            tensors[f"master.{g}.{i}"] = master.detach().cpu().contiguous()
    scheduler_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    meta = {
        "param_groups": _json_ready(state["param_groups"]),
        "state_scalars": scalars,
        "scheduler": _json_ready(scheduler_state),
        "batch_rng": None if batch_rng is None else _json_ready(batch_rng.getstate()),
    }
    tensor_path, meta_path = _rank_files(directory, rank)
    save_file(tensors, str(tensor_path))
    meta_path.write_text(json.dumps(meta))


def load_rank_state(directory: str | Path, rank: int, optimizer: torch.optim.Optimizer, scheduler,
                    batch_rng: random.Random | None = None) -> None:
    tensor_path, meta_path = _rank_files(Path(directory), rank)
    if not tensor_path.exists() or not meta_path.exists():
        raise FileNotFoundError(
            f"{directory} has no optimizer state for rank {rank}: was it written with another number of workers?"
        )
    tensors = load_file(str(tensor_path))
    meta = json.loads(meta_path.read_text())
    with torch.no_grad():
        for g, group in enumerate(optimizer.param_groups):
            for i, master in enumerate(group["params"]):
                saved = tensors[f"master.{g}.{i}"]
                if saved.shape != master.shape:
                    raise ValueError(f"{tensor_path}: master weight {g}.{i} has shape {tuple(saved.shape)}, "
                                     f"this run's {tuple(master.shape)} (another model or number of workers?)")
                master.copy_(saved)
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, param, name = key.split(".", 2)
            state.setdefault(int(param), {})[name] = value
    for param, values in meta["state_scalars"].items():
        state.setdefault(int(param), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict({**meta["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    torch.set_rng_state(tensors["rng.torch"])
    if batch_rng is not None and meta["batch_rng"] is not None:
        batch_rng.setstate(_tupled(meta["batch_rng"]))


def write_trainer_state(directory: str | Path, stage: str, step: int, steps: int, history: list[dict],
                        index_version: str | None = None, resumed_after: list[int] = ()) -> None:
    state = {"format_version": FORMAT_VERSION, "stage": stage, "step": step, "steps": steps,
             "index_version": index_version, "history": history, "resumed_after": list(resumed_after)}
    (Path(directory) / TRAINER_STATE).write_text(json.dumps(state, indent=1))


def read_trainer_state(directory: str | Path) -> dict:
    path = Path(directory) / TRAINER_STATE
    if not path.exists():
        raise FileNotFoundError(f"{directory} is not a training checkpoint (no {TRAINER_STATE})")
    return json.loads(path.read_text())


def latest_trainer_state(storage_dir: str | Path) -> dict | None:
    """The trainer state of the latest checkpoint under a stage's Ray Train storage
    directory (<run_dir>/ray_train/<stage>), or None before its first checkpoint."""
    states = [json.loads(path.read_text()) for path in Path(storage_dir).rglob(TRAINER_STATE)]
    return max(states, key=lambda state: state["step"], default=None)

"""A training run saved at step k and resumed equals the uninterrupted run (Ray-free)."""

import random

import torch

from clara_ray.config import load_config
from clara_ray.modeling.checkpoint import load_model, save_model
from clara_ray.modeling.clara import Role
from clara_ray.training.batches import stage1_batches
from clara_ray.training.settings import Lengths
from clara_ray.training.examples import Stage1Example
from clara_ray.training.checkpoints import (
    MODEL_DIR,
    latest_trainer_state,
    load_rank_state,
    read_trainer_state,
    save_rank_state,
    write_trainer_state,
)
from clara_ray.training.engine import TorchUpdater
from clara_ray.training.settings import Stage1Settings
from clara_ray.training.steps import stage1_step
from tests.tiny_model import TEXTS, make_model

LENGTHS = Lengths(doc=16, question=16, answer=8, reconstruction=16)
EXAMPLES = [Stage1Example(i) for i in range(len(TEXTS))] + [
    Stage1Example(0, "Which city was Zorvan Kellit born in?", "Marlow", (1,)),
    Stage1Example(2, "What does Quipel Silhir own?", "cello", (3,)),
]


def _train(model, tokenizer, settings, first_step, last_step, updater=None, rng=None, stop_at=None, directory=None):
    updater = updater or TorchUpdater(model, settings.optimiser)
    rng = rng or random.Random(7)
    losses = []
    for step, batch in stage1_batches(EXAMPLES, TEXTS, settings, LENGTHS, tokenizer, model.num_memory_tokens, 3, rng,
                                      start_step=first_step):
        losses.append(stage1_step(updater, batch, settings)["loss"])
        if step == stop_at:
            save_rank_state(directory, 0, updater.optimizer, updater.scheduler, rng)
            save_model(model, tokenizer, directory / MODEL_DIR, "tiny", save_backbone=True)
            write_trainer_state(directory, "stage1", step, settings.steps, [{"step": step, "loss": losses[-1]}])
            return losses
        if step == last_step:
            return losses
    return losses


def test_resumed_run_continues_exactly_like_the_uninterrupted_one(tmp_path):
    config = load_config(None, ["stage1.steps=12", "stage1.micro_batch_size_per_worker=3", "stage1.learning_rate=3e-3",
                                "stage1.rival_steps_fraction=0.5"])
    settings = Stage1Settings.from_config(config)
    model, tokenizer = make_model(seed=1)
    torch.manual_seed(0)
    model.set_trainable([Role.COMPRESSOR, Role.GENERATOR], backbone=True)
    start = {n: t.detach().clone() for n, t in model.state_dict().items()}
    whole = _train(model, tokenizer, settings, 1, 12)

    model, tokenizer = make_model(seed=1)
    model.load_state_dict(start)
    torch.manual_seed(0)
    model.set_trainable([Role.COMPRESSOR, Role.GENERATOR], backbone=True)
    first = _train(model, tokenizer, settings, 1, 12, stop_at=5, directory=tmp_path)
    assert read_trainer_state(tmp_path)["step"] == 5

    resumed, tokenizer, _ = load_model(tmp_path / MODEL_DIR)  # a fresh process would start here
    resumed.set_trainable([Role.COMPRESSOR, Role.GENERATOR], backbone=True)
    updater, rng = TorchUpdater(resumed, settings.optimiser), random.Random(0)
    load_rank_state(tmp_path, 0, updater.optimizer, updater.scheduler, rng)
    rest = _train(resumed, tokenizer, settings, 6, 12, updater=updater, rng=rng)
    assert first + rest == whole  # bit for bit on CPU


def test_latest_trainer_state_is_the_checkpoint_of_the_highest_step(tmp_path):
    assert latest_trainer_state(tmp_path / "stage3") is None  # before the first checkpoint
    for name, step, version in (("checkpoint_b", 150, "v100"), ("checkpoint_a", 300, "v250"), ("checkpoint_c", 50, "v0")):
        (tmp_path / "stage3" / name).mkdir(parents=True)
        write_trainer_state(tmp_path / "stage3" / name, "stage3", step, 400, [], version)
    latest = latest_trainer_state(tmp_path / "stage3")
    assert (latest["step"], latest["index_version"]) == (300, "v250")

"""Where a stage-1 step's time goes: one process without Ray against Ray Train + DeepSpeed workers.

    python benchmarks/stage1_step_time.py                       # tiny preset, bundled trap corpus
    python benchmarks/stage1_step_time.py --steps 20 --zero 2   # other settings

Times forward, backward and update of `stage1_step`'s work on the tiny preset's
batches (16 examples a worker), first in this process (TorchUpdater, one thread
per worker's share), then inside 2 Ray Train workers (DeepSpeedUpdater, gloo),
then in 1 Ray Train worker with all threads and both workers' examples. Prints
seconds per step of each part (the first 5 steps are not counted).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WARMUP = 5


def _setup(model_dir: str, config_tree: dict, micro_batch: int, rank: int, world: int):
    from clara_ray.config import config_from_dict, steps_for_counts
    from clara_ray.data.trap import generate_trap_corpus
    from clara_ray.modeling.checkpoint import load_model
    from clara_ray.modeling.clara import Role
    from clara_ray.training.batches import prepare_stage1_examples, stage1_batches
    from clara_ray.training.settings import Stage1Settings, WorkerSettings

    config = config_from_dict(config_tree, "the benchmark's config")  # token lengths picked from the data
    trap = config.data.trap
    corpus = generate_trap_corpus(trap.num_entities, trap.test_fraction, trap.seed, trap.family.value)
    documents = {d.id: d.text for d in corpus.documents}
    s1 = config.stage1
    examples = prepare_stage1_examples(documents, corpus.train_qa, s1.hard_distractor_fraction,
                                       s1.hard_distractor_pool, s1.rival_pool, 0)
    config = config.with_steps({s: n for s, (n, _) in steps_for_counts(config, {"stage1": len(examples)}).items()})
    settings = dataclasses.replace(Stage1Settings.from_config(config), micro_batch_size=micro_batch)
    model, tokenizer, _ = load_model(model_dir)
    model.set_trainable([Role.COMPRESSOR, Role.GENERATOR], backbone=True)
    model.train()
    batches = stage1_batches(examples, list(documents.values()), settings, WorkerSettings.from_config(config).lengths,
                             tokenizer, model.num_memory_tokens, 0, random.Random(rank), rank, world)
    return model, settings, batches


def _time_steps(updater, batches, steps: int) -> dict[str, float]:
    from clara_ray.modeling.clara import Objective

    totals = {"batch": 0.0, "forward": 0.0, "backward": 0.0, "update": 0.0}
    for i in range(steps + WARMUP):
        t0 = time.perf_counter()
        _, batch = next(batches)
        t1 = time.perf_counter()
        out = updater.forward(Objective.COMPRESSOR_PRETRAINING, **batch, mse_weight=0.1)
        t2 = time.perf_counter()
        updater.backward(out["loss"])
        t3 = time.perf_counter()
        updater.step()
        t4 = time.perf_counter()
        if i >= WARMUP:
            for key, seconds in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                totals[key] += seconds
    return {k: round(v / steps, 4) for k, v in totals.items()}


def one_process(model_dir: str, config_tree: dict, steps: int, threads: int, micro_batch: int) -> dict:
    import torch

    from clara_ray.training.engine import TorchUpdater

    torch.set_num_threads(threads)
    model, settings, batches = _setup(model_dir, config_tree, micro_batch, 0, 1)
    return _time_steps(TorchUpdater(model, settings.optimiser), batches, steps)


def _worker(run: dict) -> dict:
    import ray.train
    import torch

    from clara_ray.training.engine import DeepSpeedUpdater

    torch.set_num_threads(run["threads"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    model, settings, batches = _setup(run["model_dir"], run["config"], run["micro_batch"], rank, world)
    updater = DeepSpeedUpdater(model, settings.optimiser, settings.micro_batch_size, run["zero"], False, False)
    return _time_steps(updater, batches, run["steps"])


def ray_train(model_dir: str, config_tree: dict, steps: int, workers: int, threads: int, micro_batch: int, zero: int,
              storage: str) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _worker,
        train_loop_config={"model_dir": model_dir, "config": config_tree, "steps": steps, "threads": threads,
                           "micro_batch": micro_batch, "zero": zero},
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": threads}),
        run_config=RunConfig(storage_path=storage),
    )
    return trainer.fit().return_value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--zero", type=int, default=2, help="ZeRO stage of the Ray Train runs")
    args = parser.parse_args()

    from clara_ray.cli import start_ray
    from clara_ray.config import Config
    from clara_ray.data.trap import generate_trap_corpus
    from clara_ray.modeling.initial import build_initial_model

    config = Config()
    trap = config.data.trap
    corpus = generate_trap_corpus(trap.num_entities, trap.test_fraction, trap.seed, trap.family.value)
    with tempfile.TemporaryDirectory() as work:
        initial = build_initial_model(config, corpus.documents, corpus.train_qa, Path(work) / "init", corpus.test_qa)
        model_dir, tree = str(initial.model_dir), initial.config.to_dict()
        results = {"one process, 1 thread, 16 examples": one_process(model_dir, tree, args.steps, 1, 16)}
        start_ray(None, dashboard=True)
        results["Ray Train, 2 workers x 1 thread x 16 examples"] = ray_train(
            model_dir, tree, args.steps, 2, 1, 16, args.zero, str(Path(work) / "ray"))
        results["Ray Train, 1 worker x 2 threads x 32 examples"] = ray_train(
            model_dir, tree, args.steps, 1, 2, 32, args.zero, str(Path(work) / "ray"))
    for name, parts in results.items():
        print(f"{name}: {sum(parts.values()):.3f} s a step ({', '.join(f'{k} {v:.3f}' for k, v in parts.items())})")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

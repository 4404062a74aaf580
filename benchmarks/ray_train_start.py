"""What a Ray Train run costs before and after its loop: `fit()` of a loop that only reports once.

    python benchmarks/ray_train_start.py                 # the product's local Ray (clara_ray.cli.start_ray)
    python benchmarks/ray_train_start.py --plain-ray     # ray.init(num_cpus=4) without the product's runtime env

Starts one local Ray instance, then runs `--runs` TorchTrainer fits one after the other
(`--workers` workers, 1 CPU each) and prints, for each, the seconds from `fit()` to the
loop's first line and from `fit()` to its return: the fixed price every stage, sweep
trial and restart pays whatever it trains.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _loop(config: dict) -> float:
    import time

    import ray.train

    started = time.time()
    ray.train.report({})
    return started  # rank 0's return value comes back as the result's


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--plain-ray", action="store_true", help="ray.init(num_cpus=4) instead of start_ray")
    args = parser.parse_args()

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if args.plain_ray:
        ray.init(num_cpus=4, include_dashboard=True)
    else:
        from clara_ray.cli import start_ray

        start_ray("local")
    with tempfile.TemporaryDirectory() as storage:
        for run in range(args.runs):
            called = time.time()
            result = TorchTrainer(
                _loop, scaling_config=ScalingConfig(num_workers=args.workers, resources_per_worker={"CPU": 1}),
                run_config=RunConfig(name=f"start{run}", storage_path=storage),
            ).fit()
            done = time.time()
            print(f"run {run}: loop started after {result.return_value - called:.1f} s, "
                  f"fit() returned after {done - called:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

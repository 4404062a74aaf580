"""Ray job entrypoint: a Ray Tune sweep over stage 3 from a finished run (see clara_ray/sweep.py).

    ray job submit --working-dir . -- python jobs/sweep.py --from-run runs/demo sweep.num_trials=16

Inside a Ray job `ray.init()` joins the cluster the job runs on; run locally, it
starts a local instance. Trials run as many at a time as the cluster's free
resources hold whole trials (train.num_workers workers each).
"""

from __future__ import annotations

import argparse
import sys

import ray

from clara_ray.cli import WORKER_ENV, run_sweep_command


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--from-run", required=True, help="a run directory with an encoded corpus")
    parser.add_argument("--name", default="sweep", help="output directory inside the run")
    parser.add_argument("overrides", nargs="*", help="overrides of the run's config, dotted.key=value")
    args = parser.parse_args()
    return run_sweep_command(args, lambda: ray.init(runtime_env={"env_vars": WORKER_ENV}))


if __name__ == "__main__":
    sys.exit(main())

"""Ray job entrypoint: the whole pipeline (stage 1 -> (stage 2) -> encode -> index -> stage 3 -> evaluate).

    ray job submit --working-dir . -- python jobs/pipeline.py --config jobs/configs/tiny.yaml run.name=exp1

Inside a Ray job `ray.init()` joins the cluster the job runs on; run locally,
it starts a local instance. Submit the same command again after a failed or
stopped job and the run goes on where it stopped (finished steps are skipped).
"""

from __future__ import annotations

import argparse
import json
import sys

from clara_ray.cli import WORKER_ENV
from clara_ray.config import ConfigError, load_config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", help="YAML config")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value")
    args = parser.parse_args()
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2

    import ray

    from clara_ray.errors import UserError
    from clara_ray.pipeline import check_inputs, run_pipeline

    try:
        check_inputs(config)
        ray.init(runtime_env={"env_vars": WORKER_ENV})
        summary = run_pipeline(config)
    except (UserError, FileExistsError) as error:  # the user's data, config or run directory
        print(error, file=sys.stderr)
        return 2
    print(json.dumps({"run": summary["run"], **summary["results"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Ray job entrypoint, step 1 of a run: read (or generate) the data, build the initial model,
pick the token lengths from the data and write every stage's training tables.

    ray job submit --working-dir . -- python jobs/prepare_data.py --config jobs/configs/tiny.yaml run.name=exp1

Idempotent (steps/init.json, steps/training_data.json); prints one JSON line. The next
step: jobs/train.py --stage 1 with the same config and overrides.
"""

import sys

from clara_ray.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main(["prepare-data"]))

"""Ray job entrypoint: evaluate a run on its test split, or BM25 / MiniLM / a trained model on a QA set.

    ray job submit --working-dir . -- python jobs/evaluate.py --config jobs/configs/tiny.yaml run.name=exp1
    ray job submit --working-dir . -- python jobs/evaluate.py \
        --qa data/hotpot_dev_distractor_v1.json --format hotpotqa --run runs/exp1 --output runs/exp1/eval-hotpot

A run's evaluation before stage 3 keeps the tuned model's scores; after it, it scores the
baselines and the query reasoner before and after stage 3 side by side and writes
metrics.json and report.md. With --qa (clara_ray/eval/harness.py) it runs in the driver
process. Prints one JSON line.
"""

import sys

from clara_ray.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main(["evaluate"]))

"""Ray job entrypoint: evaluate BM25, MiniLM and a trained model on a QA set (see clara_ray/eval/harness.py).

    ray job submit --working-dir . -- python jobs/evaluate.py \
        --qa data/hotpot_dev_distractor_v1.json --format hotpotqa --run runs/exp1 --output runs/exp1/eval-hotpot

Runs in the job's driver process (no Ray tasks); prints the summary as one JSON line.
"""

from __future__ import annotations

import sys

from clara_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))

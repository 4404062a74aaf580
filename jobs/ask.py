"""Ray job entrypoint: answer questions with a finished run's model and its live index version.

    ray job submit --working-dir . -- python jobs/ask.py "Where did Ann Berg grow up?" --run /mnt/cluster_storage/runs/exp1

Runs in the job's driver process (no Ray tasks); prints the answer and the ranked documents
(id, title, score), or with --json one JSON line per question.
"""

import sys

from clara_ray.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main(["ask"]))

"""Ray job entrypoint: the index version over a run's encoded corpus (index/v<step>, in a Ray task).

    ray job submit --working-dir . -- python jobs/build_index.py --config jobs/configs/tiny.yaml run.name=exp1

Kept when a version of the same memory shards and index settings exists; prints one JSON line.
"""

import sys

from clara_ray.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main(["build-index"]))

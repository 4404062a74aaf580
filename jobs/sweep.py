"""Ray job entrypoint: a Ray Tune sweep over stage 3 from a finished run (see clara_ray/sweep.py).

    ray job submit --working-dir . --runtime-env cluster/local-runtime-env.yaml -- \
        python jobs/sweep.py --from-run $PWD/runs/exp1 sweep.num_trials=16

--from-run must be absolute: the job runs in a temporary copy of the repository.
Inside a Ray job it joins the cluster the job runs on; run by hand, the cluster
`ray start` runs on this machine, else a local instance (clara_ray.cli.start_ray).
Trials run as many at a time as the cluster's free resources hold whole trials
(train.num_workers workers each).
"""

import sys

from clara_ray.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main(["sweep"]))

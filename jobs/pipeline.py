"""Ray job entrypoint: every step of a run in order (prepare_data -> train 1 -> (train 2) ->
encode_corpus -> build_index -> evaluate -> train 3 -> evaluate), finished steps skipped.

    ray job submit --working-dir . --runtime-env cluster/local-runtime-env.yaml -- \
        python jobs/pipeline.py --config jobs/configs/tiny.yaml run.name=exp1 run.output_dir=$PWD/runs

run.output_dir must be absolute: the job runs in a temporary copy of the repository.
Inside a Ray job it joins the cluster the job runs on; run by hand, the cluster
`ray start` runs on this machine, else a local instance (clara_ray.cli.start_ray).
Submit the same command again after a failed or stopped job and the run goes on
where it stopped. Each step is also a job of its own (jobs/prepare_data.py, ...).
"""

import sys

from clara_ray.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main(["pipeline"]))

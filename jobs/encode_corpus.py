"""Ray job entrypoint: a run's corpus (--config), or any corpus files (--input), into memory
shards (Ray Data, autoscaling actor pool, resumable).

    ray job submit --working-dir . -- python jobs/encode_corpus.py --config jobs/configs/tiny.yaml run.name=exp1 \
        run.output_dir=$PWD/runs
    ray job submit --working-dir . -- python jobs/encode_corpus.py \
        --model-dir /mnt/cluster_storage/runs/m7b/models/stage1 --output /mnt/cluster_storage/enc/wiki \
        --input s3://bucket/psgs_w100.tsv --config jobs/configs/mistral7b_gpu.yaml encode.max_actors=16

Resubmitting the same command after an interruption resumes: rows already
written are skipped (see clara_ray/encode.py). Prints the summary as one JSON line.
"""

import sys

from clara_ray.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main(["encode"]))

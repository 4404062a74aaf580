"""Ray job entrypoint: encode corpus files into memory shards (autoscaling, resumable).

    ray job submit --working-dir . -- python jobs/encode_corpus.py \
        --model-dir s3://bucket/runs/exp1/models/stage1 --output s3://bucket/enc/exp1 \
        --input s3://bucket/psgs_w100.tsv --config jobs/configs/mistral7b_gpu.yaml encode.max_actors=16

Resubmitting the same command after an interruption resumes: rows already
written are skipped (see clara_ray/encode.py). Prints the summary as one JSON line.
"""

from __future__ import annotations

import os
import sys

from clara_ray.cli import main

if __name__ == "__main__":
    # Inside `ray job submit`, RAY_ADDRESS names the cluster; run by hand, a local Ray starts.
    address = ["--address", "auto"] if os.environ.get("RAY_ADDRESS") else []
    sys.exit(main(["encode", *address, *sys.argv[1:]]))

"""Ray job entrypoint: one training stage of a run (Ray Train + DeepSpeed).

    ray job submit --working-dir . -- python jobs/train.py --stage 1 --config jobs/configs/mistral7b_gpu.yaml run.name=m7b
    ray job submit --working-dir . -- python jobs/train.py --stage 3 --config jobs/configs/mistral7b_gpu.yaml run.name=m7b

Stage 1 trains the compressor, stage 2 (when stage2.enabled) instruction-tunes, stage 3
trains retrieval and generation jointly over the run's index (build_index first; with
stage3.compressor=trainable it refreshes the index while it trains). A stage resumes
from its last checkpoint when resubmitted; a finished one is not trained again.
"""

import sys

from clara_ray.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main(["train"]))

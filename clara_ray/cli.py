"""`clara-ray` command line.

    clara-ray demo                       # bundled trap corpus, tiny model, local Ray
    clara-ray demo stage3.temperature=0.05 run.name=t005
    clara-ray demo --corpus docs.jsonl --train-qa train.jsonl --test-qa test.jsonl
    clara-ray demo --config jobs/configs/tiny.yaml --address auto   # on a running cluster

Prints progress while it runs and, last, one JSON line with the metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from clara_ray.config import ConfigError, load_config

# Passed to every Ray worker: no hub access, quiet tokenizers.
# RAY_TRAIN_ENABLE_PRINT_PATCH=0: Ray Train would otherwise log every worker print twice.
WORKER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}


def start_ray(address: str | None):
    """Connect to `address`, or start a local Ray instance owned by this process."""
    import ray

    os.environ.update({k: os.environ.get(k, v) for k, v in WORKER_ENV.items()})
    runtime_env = {"env_vars": {k: os.environ[k] for k in WORKER_ENV}}
    if address:
        return ray.init(address=address, runtime_env=runtime_env)
    # Logical CPUs above the core count leave room for Ray Data's small tasks and
    # the index actor beside the training workers; the work itself is light.
    return ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, runtime_env=runtime_env)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clara-ray", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="generate/read data, stage 1, encode, index, stage 3, evaluate, report")
    demo.add_argument("--config", help="YAML config (default: built-in tiny CPU defaults)")
    demo.add_argument("--corpus", help="corpus JSONL (id, text, optional title)")
    demo.add_argument("--train-qa", help="training QA JSONL (question, answers, optional id, gold_doc_ids)")
    demo.add_argument("--test-qa", help="test QA JSONL, used only for evaluation")
    demo.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")
    demo.add_argument("overrides", nargs="*", help="config overrides, dotted.key=value")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = list(args.overrides)
    for flag, key in ((args.corpus, "data.corpus"), (args.train_qa, "data.train_qa"), (args.test_qa, "data.test_qa")):
        if flag:
            overrides.append(f"{key}={json.dumps(flag)}")
    try:
        config = load_config(args.config, overrides)
    except ConfigError as error:
        print(f"clara-ray: {error}", file=sys.stderr)
        return 2

    from clara_ray.pipeline import run_pipeline

    start_ray(args.address)
    summary = run_pipeline(config)
    print(json.dumps({"run": summary["run"], "report": summary["run_dir"] + "/report.md", **summary["results"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

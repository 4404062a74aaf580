"""`clara-ray` command line.

    clara-ray demo                       # bundled trap corpus, tiny model, local Ray
    clara-ray demo stage3.temperature=0.05 run.name=t005
    clara-ray demo --corpus docs.jsonl --train-qa train.jsonl --test-qa test.jsonl
    clara-ray demo --config jobs/configs/tiny.yaml --address auto   # on a running cluster
    clara-ray encode --model-dir runs/demo/models/stage1 --output enc/ --input psgs_w100.tsv
    clara-ray sweep --from-run runs/demo sweep.num_trials=8   # Ray Tune over stage 3
    clara-ray evaluate --qa pretrain_data.jsonl --format clara_pretrain --methods bm25 minilm --output eval/

Prints progress while it runs and, last, one JSON line with the metrics (demo),
the encoding summary (encode) or the sweep's best trial (sweep).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from clara_ray.config import AUTO, ConfigError, load_config
from clara_ray.errors import UserError
from clara_ray.data.corpus_rows import CorpusFormat

# Passed to every Ray worker: no hub access, quiet tokenizers.
# RAY_TRAIN_ENABLE_PRINT_PATCH=0: Ray Train would otherwise log every worker print twice.
WORKER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}


def start_ray(address: str | None, dashboard: bool = True):
    """Connect to `address`, or start a local Ray instance owned by this process.

    dashboard: whether a local instance runs the dashboard. Ray Train needs it:
    it also serves the State API, which Train's placement-group cleaner polls
    about once a second (without it every poll logs a warning). The encoder does
    not, and on a small machine the dashboard's processes slow it down: with it,
    a 2-core encode loop ran ~7% slower (BENCHMARKS.md).
    """
    import ray

    os.environ.update({k: os.environ.get(k, v) for k, v in WORKER_ENV.items()})
    runtime_env = {"env_vars": {k: os.environ[k] for k in WORKER_ENV}}
    if address:
        return ray.init(address=address, runtime_env=runtime_env)
    # Logical CPUs above the core count leave room for Ray Data's small tasks and
    # the index actor beside the training workers; the work itself is light.
    return ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=dashboard, runtime_env=runtime_env)


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

    sweep = commands.add_parser(
        "sweep", help="Ray Tune sweep over stage 3 (top-k temperature, k, L, learning rate) from a finished run"
    )
    sweep.add_argument("--from-run", required=True, help="a run directory with an encoded corpus (runs/demo)")
    sweep.add_argument("--name", default="sweep", help="output directory inside the run (default: sweep)")
    sweep.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")
    sweep.add_argument("overrides", nargs="*", help="overrides of the run's config, e.g. sweep.num_trials=12")

    encode = commands.add_parser(
        "encode", help="encode corpus files into memory shards with a trained compressor (resumable)"
    )
    encode.add_argument("--model-dir", required=True, help="a model directory from stage 1 (runs/<name>/models/stage1)")
    encode.add_argument("--output", required=True, help="memory-shard directory; rerun with the same one to resume")
    encode.add_argument("--input", required=True, nargs="+", help="corpus files or directories (local or s3://, gs://)")
    encode.add_argument("--format", choices=[f.value for f in CorpusFormat], help="corpus format (default: from the extension)")
    encode.add_argument("--config", help="YAML config; encode.*, model.doc_max_len (auto: the model's) and data.on_bad_row apply")
    encode.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")
    encode.add_argument("overrides", nargs="*", help="config overrides, dotted.key=value")
    _add_evaluate(commands)
    return parser


def _add_evaluate(commands) -> None:
    from clara_ray.data.qa_formats import QAFormat
    from clara_ray.eval.harness import DEFAULT_KS, Method

    evaluate = commands.add_parser(
        "evaluate", help="Recall@k / MRR@k (and EM / F1 / cover-EM with a model) of BM25, MiniLM and a trained model"
    )
    evaluate.add_argument("--qa", required=True, help="QA file")
    evaluate.add_argument("--format", required=True, choices=[f.value for f in QAFormat], help="QA file format")
    evaluate.add_argument("--corpus", help="corpus file (needed when the QA format embeds no documents)")
    evaluate.add_argument("--corpus-format", choices=[f.value for f in CorpusFormat], help="corpus format (default: jsonl)")
    evaluate.add_argument("--run", help="a finished run directory: its stage-3 model, memory and settings")
    evaluate.add_argument("--model-dir", help="a model directory (instead of --run)")
    evaluate.add_argument("--memory", help="memory shards of this corpus encoded by that model (clara-ray encode)")
    evaluate.add_argument("--methods", nargs="+", choices=[m.value for m in Method],
                          help="default: bm25 and minilm, and clara when a model is given")
    evaluate.add_argument("--k", nargs="+", type=int, default=list(DEFAULT_KS), help="cut-offs for Recall@k and MRR@k")
    evaluate.add_argument("--no-answers", action="store_true", help="retrieval only, even with a model")
    evaluate.add_argument("--output", required=True, help="directory for report.md, recall_at_k.png, metrics.json")


def run_evaluate(args: argparse.Namespace) -> int:
    """The `evaluate` command (also what jobs/evaluate.py runs); needs no Ray."""
    from clara_ray.data.qa_formats import QAFormat
    from clara_ray.eval.harness import Method, TrainedModel, evaluate

    try:
        model = None
        if args.run:
            model = TrainedModel.from_run(args.run)
        elif args.model_dir or args.memory:
            if not (args.model_dir and args.memory):
                raise UserError("--model-dir and --memory go together")
            model = TrainedModel(Path(args.model_dir), Path(args.memory))
        if args.methods:
            methods = [Method(m) for m in args.methods]
        else:
            methods = [m for m in Method if model is not None or m is not Method.CLARA]
        summary = evaluate(
            args.qa, QAFormat(args.format), args.output, methods, args.k, corpus_path=args.corpus,
            corpus_format=CorpusFormat(args.corpus_format) if args.corpus_format else None, model=model,
            generate=False if args.no_answers else None, log=lambda line: print(line, file=sys.stderr),
        )
    except UserError as error:
        print(f"clara-ray: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"report": summary["report"], "results": summary["results"]}))
    return 0


def encoding_config(config, num_memory_tokens: int):
    """`config` with the document length the model was trained for: an ``auto``
    doc_max_len becomes the model's (one memory vector per compression_rate tokens);
    a given one must agree with it."""
    if config.model.doc_max_len == AUTO:
        config = config.with_lengths({"doc_max_len": num_memory_tokens * config.model.compression_rate})
    if num_memory_tokens != config.model.num_memory_tokens:
        raise ConfigError(
            f"the model has {num_memory_tokens} memory tokens but the config gives {config.model.num_memory_tokens} "
            f"(model.doc_max_len / model.compression_rate); use the config it was trained with, or doc_max_len auto"
        )
    return config


def run_encode(args: argparse.Namespace, config) -> int:
    """The `encode` command (also what jobs/encode_corpus.py runs)."""
    from clara_ray.encode import encode_corpus
    from clara_ray.pipeline import encode_settings

    model_manifest = json.loads((Path(args.model_dir) / "clara.json").read_text())
    try:
        config = encoding_config(config, model_manifest["num_memory_tokens"])
    except ConfigError as error:
        print(f"clara-ray: {error}", file=sys.stderr)
        return 2
    corpus_format = CorpusFormat(args.format) if args.format else None
    summary = encode_corpus(args.input, args.model_dir, args.output, encode_settings(config), corpus_format)
    print(json.dumps(summary.as_dict()))
    return 0


def run_sweep_command(args: argparse.Namespace, connect) -> int:
    """The `sweep` command (also what jobs/sweep.py runs); `connect()` joins or starts
    Ray once the run directory and the overrides have been checked."""
    from clara_ray.sweep import SourceRun, run_sweep

    try:
        source = SourceRun.open(Path(args.from_run), list(args.overrides))
        connect()
        summary = run_sweep(source, args.name)
    except (UserError, FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"clara-ray: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = list(getattr(args, "overrides", []))
    if args.command == "sweep":
        return run_sweep_command(args, lambda: start_ray(args.address))
    if args.command == "evaluate":
        return run_evaluate(args)
    if args.command == "demo":
        for flag, key in ((args.corpus, "data.corpus"), (args.train_qa, "data.train_qa"), (args.test_qa, "data.test_qa")):
            if flag:
                overrides.append(f"{key}={json.dumps(flag)}")
    try:
        config = load_config(args.config, overrides)
    except ConfigError as error:
        print(f"clara-ray: {error}", file=sys.stderr)
        return 2

    if args.command == "encode":
        start_ray(args.address, dashboard=False)
        return run_encode(args, config)

    from clara_ray.pipeline import check_inputs, run_pipeline

    try:
        check_inputs(config)  # before Ray starts
        start_ray(args.address)
        summary = run_pipeline(config)
    except (UserError, FileExistsError) as error:  # the user's data, config or run directory
        print(f"clara-ray: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"run": summary["run"], "report": summary["run_dir"] + "/report.md", **summary["results"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

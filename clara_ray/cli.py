"""`clara-ray` command line: the whole pipeline, or one step of a run at a time.

    clara-ray demo                       # bundled trap corpus, tiny model, local Ray
    clara-ray demo stage3.temperature=0.05 run.name=t005
    clara-ray demo --corpus docs.jsonl --train-qa train.jsonl --test-qa test.jsonl
    clara-ray pipeline --config jobs/configs/tiny.yaml run.name=exp1 --address auto   # on a running cluster

    # the same run, step by step (each idempotent; the same --config and overrides every time)
    clara-ray prepare-data --config jobs/configs/tiny.yaml run.name=exp1
    clara-ray train --stage 1 --config jobs/configs/tiny.yaml run.name=exp1
    clara-ray encode --config jobs/configs/tiny.yaml run.name=exp1
    clara-ray build-index --config jobs/configs/tiny.yaml run.name=exp1
    clara-ray evaluate --config jobs/configs/tiny.yaml run.name=exp1      # before stage 3
    clara-ray train --stage 3 --config jobs/configs/tiny.yaml run.name=exp1
    clara-ray evaluate --config jobs/configs/tiny.yaml run.name=exp1      # after: metrics.json, report.md
    clara-ray ask "Where did Ann Berg grow up?" --run runs/exp1

    clara-ray encode --model-dir runs/demo/models/stage1 --output enc/ --input psgs_w100.tsv   # any corpus files
    clara-ray sweep --from-run runs/demo sweep.num_trials=8   # Ray Tune over stage 3
    clara-ray evaluate --qa pretrain_data.jsonl --format clara_pretrain --methods bm25 minilm --output eval/

Prints progress while it runs and, last, one JSON line with the step's result.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
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
    """Connect to `address`; without one, join the Ray cluster already running on
    this machine, if there is one, else start a local Ray instance owned by this
    process. ``local`` always starts a local instance.

    "Already running" means what a bare `ray.init()` would join: the address in
    RAY_ADDRESS (set inside `ray job submit` jobs), else the one `ray start` wrote to
    Ray's address file (`/tmp/ray/ray_current_cluster`), if that cluster is alive.
    Joining it, with a one-line message, is what a user who started a head wants:
    Ray itself refuses to start a second instance with our CPU count beside it (the
    `num_cpus and num_gpus must not be provided` error), and a private one would
    compete with the head for the same cores. The run's paths are resolved before
    anything runs on the cluster, so relative paths still mean the current directory.

    dashboard: whether a local instance runs the dashboard. Ray Train needs it:
    it also serves the State API, which Train's placement-group cleaner polls
    about once a second (without it every poll logs a warning). The encoder does
    not, and on a small machine the dashboard's processes slow it down: with it,
    a 2-core encode loop ran ~7% slower (BENCHMARKS.md).
    """
    import ray

    os.environ.update({k: os.environ.get(k, v) for k, v in WORKER_ENV.items()})
    runtime_env = {"env_vars": {k: os.environ[k] for k in WORKER_ENV}}
    if not address:
        address = running_cluster_address()
        if address:
            print(f"[clara-ray] joining the Ray cluster running on this machine at {address} "
                  "(--address local starts a private Ray instead)", file=sys.stderr)
    if address and address != "local":
        return ray.init(address=address, runtime_env=runtime_env)
    # A worker that asks the State API for "the" cluster (Train's placement-group
    # cleaner does, every second) finds it from RAY_ADDRESS, else by looking for
    # running instances; beside another instance on this machine that lookup fails,
    # the cleaner's thread dies and a trial Tune stops keeps its CPUs for good (a
    # sweep then waits forever). So the private instance's GCS port is picked here
    # and its workers are told the address.
    port = _free_port()
    runtime_env["env_vars"]["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    # One machine has no node a cloud can preempt: Ray Train's preemption watcher (an
    # actor process per stage, ~3 s of CPU to start on 2 cores) has nothing to watch.
    watcher = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
    runtime_env["env_vars"][watcher] = os.environ.get(watcher, "0")
    previous = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)  # read by Ray when it starts the head's GCS
    try:
        # Logical CPUs above the core count leave room for Ray Data's small tasks and
        # the index actor beside the training workers; the work itself is light.
        return ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=dashboard,
                        runtime_env=runtime_env)
    finally:
        if previous is None:
            os.environ.pop("RAY_GCS_SERVER_PORT")
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = previous


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def running_cluster_address() -> str | None:
    """The address of the Ray cluster a bare `ray.init()` would join, or None.

    RAY_ADDRESS wins, as in Ray; the address file of `ray start` counts only while a
    Ray process of that cluster runs (a killed head leaves the file behind)."""
    from ray._private import services  # the lookup ray.init() does; no public API for it

    address = os.environ.get("RAY_ADDRESS")
    if address:
        if address.startswith(("http://", "https://")):
            raise UserError(
                f"RAY_ADDRESS={address} is a job-submission address (for `ray job submit`), not one a driver can "
                "join; submit the command as a job (README, \"On a cluster\"), give --address <head>:6379, "
                "or unset RAY_ADDRESS"
            )
        return address
    recorded = services.find_bootstrap_address(None)
    if recorded and recorded in services.find_gcs_addresses():
        return recorded
    return None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clara-ray", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="the whole pipeline; by default on the bundled trap corpus, tiny model")
    _add_run_arguments(demo, "YAML config (default: built-in tiny CPU defaults)")
    demo.add_argument("--corpus", help="corpus JSONL (id, text, optional title)")
    demo.add_argument("--train-qa", help="training QA JSONL (question, answers, optional id, gold_doc_ids)")
    demo.add_argument("--test-qa", help="test QA JSONL, used only for evaluation")
    _add_run_arguments(commands.add_parser("pipeline", help="every step of a run in order, finished ones skipped"))
    _add_run_arguments(commands.add_parser(
        "prepare-data", aliases=["prepare_data"], help="read the data, build the initial model, write the training tables"))
    train = commands.add_parser("train", help="one training stage of a run (1: compressor, 2: instruction, 3: joint)")
    train.add_argument("--stage", type=int, required=True, choices=(1, 2, 3))
    _add_run_arguments(train)
    _add_run_arguments(commands.add_parser(
        "build-index", aliases=["build_index"], help="the index version over a run's encoded corpus"))

    sweep = commands.add_parser(
        "sweep", help="Ray Tune sweep over stage 3 (top-k temperature, k, L, learning rate) from a finished run"
    )
    sweep.add_argument("--from-run", required=True, help="a run directory with an encoded corpus (runs/demo)")
    sweep.add_argument("--name", default="sweep", help="output directory inside the run (default: sweep)")
    sweep.add_argument("--config", help="YAML of sweep.* (and any other) settings layered on the run's config.yaml, "
                                        "e.g. jobs/configs/sweep_temperature.yaml; overrides come after it")
    sweep.add_argument("--address", help="Ray cluster address (default: a running local one, else start one)")
    sweep.add_argument("overrides", nargs="*", help="overrides of the run's config, e.g. sweep.num_trials=12")

    encode = commands.add_parser(
        "encode", aliases=["encode_corpus"],
        help="a run's corpus (--config), or any corpus files (--input), into memory shards (resumable)"
    )
    encode.add_argument("--model-dir", help="with --input: a model directory from stage 1 (runs/<name>/models/stage1)")
    encode.add_argument("--output", help="with --input: memory-shard directory; rerun with the same one to resume")
    encode.add_argument("--input", nargs="+", help="corpus files or directories (local or s3://, gs://)")
    encode.add_argument("--format", choices=[f.value for f in CorpusFormat], help="corpus format (default: from the extension)")
    _add_run_arguments(encode, "YAML config: a run's, or with --input the encode.* settings, model.doc_max_len (auto: "
                               "the model's) and data.on_bad_row")
    _add_evaluate(commands)
    ask = commands.add_parser("ask", help="answer questions with a finished run's model and live index")
    ask.add_argument("questions", nargs="+", help="one or more questions")
    ask.add_argument("--run", required=True, help="the run directory, <run.output_dir>/<run.name>")
    ask.add_argument("-k", type=int, default=None, help="documents to read (default: the run's stage3.top_k)")
    ask.add_argument("--json", action="store_true", help="one JSON line per question")
    ask.add_argument("--address", help="unused: ask runs in this process, without Ray")
    return parser


def _add_run_arguments(command, config_help: str = "YAML config of the run (default: built-in tiny CPU defaults)"):
    command.add_argument("--config", help=config_help)
    command.add_argument("--address", help="Ray cluster address (default: a running local one, else start one)")
    command.add_argument("overrides", nargs="*", help="config overrides, dotted.key=value")


def _add_evaluate(commands) -> None:
    from clara_ray.data.qa_formats import QAFormat
    from clara_ray.eval.harness import DEFAULT_KS, Method

    evaluate = commands.add_parser(
        "evaluate", help="Recall@k / MRR@k (and EM / F1 / cover-EM with a model) of BM25, MiniLM and a trained model"
    )
    evaluate.add_argument("--qa", help="a QA file to evaluate on (else: the run of --config, on its test split)")
    evaluate.add_argument("--format", choices=[f.value for f in QAFormat], help="with --qa: the QA file's format")
    evaluate.add_argument("--corpus", help="corpus file (needed when the QA format embeds no documents)")
    evaluate.add_argument("--corpus-format", choices=[f.value for f in CorpusFormat], help="corpus format (default: jsonl)")
    evaluate.add_argument("--run", help="a finished run directory: its stage-3 model, memory and settings")
    evaluate.add_argument("--model-dir", help="a model directory (instead of --run)")
    evaluate.add_argument("--memory", help="memory shards of this corpus encoded by that model (clara-ray encode)")
    evaluate.add_argument("--methods", nargs="+", choices=[m.value for m in Method],
                          help="default: bm25 and minilm, and clara when a model is given")
    evaluate.add_argument("--k", nargs="+", type=int, default=list(DEFAULT_KS), help="cut-offs for Recall@k and MRR@k")
    evaluate.add_argument("--no-answers", action="store_true", help="retrieval only, even with a model")
    evaluate.add_argument("--output", help="with --qa: directory for report.md, recall_at_k.png, metrics.json")
    _add_run_arguments(evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    """The `evaluate` command (also what jobs/evaluate.py runs); needs no Ray."""
    from clara_ray.data.qa_formats import QAFormat
    from clara_ray.eval.harness import Method, TrainedModel, evaluate

    try:
        if not (args.format and args.output):
            raise UserError("--qa needs --format and --output")
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
    print(summary_table(summary["results"]))
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


def disconnect_ray() -> None:
    """Leave Ray before printing a command's result. Workers' lines reach the driver
    asynchronously (Ray's log monitor), so one can land after anything printed while
    connected; disconnecting first keeps the result's JSON the output's last line, the
    contract scripts and jobs read. A worker line still in flight then stays only in
    the session's log files."""
    import ray

    ray.shutdown()


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
    disconnect_ray()
    print(summary_table(summary.as_dict()))
    print(json.dumps(summary.as_dict()))
    return 0


def run_sweep_command(args: argparse.Namespace, connect, disconnect=lambda: None) -> int:
    """The `sweep` command (also what jobs/sweep.py runs); `connect()` joins or starts
    Ray once the run directory and the overrides have been checked, `disconnect()`
    leaves it before the summary is printed."""
    from clara_ray.config import overrides_from_file
    from clara_ray.sweep import SourceRun, run_sweep

    try:
        layered = overrides_from_file(args.config) if args.config else []
        source = SourceRun.open(Path(args.from_run), [*layered, *args.overrides])
        connect()
        summary = run_sweep(source, args.name)
    except (UserError, FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"clara-ray: {error}", file=sys.stderr)
        return 2
    disconnect()
    print(summary_table(summary))
    print(json.dumps(summary))
    return 0


def run_step(command: str, stage: int | None, config) -> dict:
    """One step of the run `config` names (Ray already connected); returns what it prints."""
    from clara_ray.pipeline import Run

    run = Run(config)
    if command in ("demo", "pipeline"):
        summary = run.pipeline()
        return {"run": summary["run"], "report": summary["run_dir"] + "/report.md", **summary["results"]}
    if command == "prepare-data":
        prepared = run.prepare_data()
        return {"run_dir": str(run.run_dir), "lengths": prepared.lengths.lengths,
                **{name: len(getattr(prepared.inputs, name).records) for name in ("corpus", "train_qa", "test_qa")}}
    if command == "train":
        result = run.train(stage)
        return {"stage": stage, "model_dir": str(result.model_dir), "steps": result.history[-1]["step"],
                "last_window": {k: v for k, v in result.history[-1].items() if isinstance(v, (int, float))}}
    if command == "encode":
        manifest = run.encode_corpus()
        return {k: manifest[k] for k in ("num_input_documents", "num_encoded", "num_quarantined", "num_truncated")}
    if command == "build-index":
        return run.build_index()
    if command == "evaluate":
        results = run.evaluate()
        return results["results"] if "results" in results else results
    raise ValueError(f"not a run step: {command}")


def summary_table(result: dict) -> str:
    """A step's result as a plain-text table, printed before its JSON line: rows of
    name -> scores as a matrix (evaluations), anything else as key | value."""
    def cell(value) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    if not result:
        return ""

    if result and all(isinstance(v, dict) and all(isinstance(x, (int, float)) for x in v.values())
                      for v in result.values()):
        columns = list(dict.fromkeys(k for scores in result.values() for k in scores))
        rows = [["", *columns]] + [[name, *(cell(scores.get(c, "")) for c in columns)] for name, scores in result.items()]
    else:
        rows = [[key, cell(value) if not isinstance(value, dict) else json.dumps(value)] for key, value in result.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(text.ljust(width) for text, width in zip(row, widths)).rstrip() for row in rows)


def _split_overrides(words: list[str]) -> tuple[list[str], list[str]]:
    """(paths, overrides) of the words after a greedy option such as --input: a
    word is an override when it reads `section.key=value` and names no existing file."""
    def is_override(word: str) -> bool:
        key, equals, _ = word.partition("=")
        return bool(equals) and _OVERRIDE_KEY.fullmatch(key) is not None and not Path(word).exists()

    return [w for w in words if not is_override(w)], [w for w in words if is_override(w)]


_OVERRIDE_KEY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


def job_main(command: list[str]) -> int:
    """What a ``jobs/<step>.py`` entrypoint runs: ``clara-ray <command> <its arguments>``.
    Inside ``ray job submit`` (RAY_ADDRESS set) the step joins the job's cluster, run by
    hand the one running on this machine, else a local one (`start_ray`)."""
    return main([*command, *sys.argv[1:]])


_CANONICAL = {"prepare_data": "prepare-data", "build_index": "build-index", "encode_corpus": "encode"}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = _CANONICAL.get(args.command, args.command)
    overrides = list(getattr(args, "overrides", []))
    if getattr(args, "input", None):
        # `--input a.jsonl b.jsonl encode.batch_size=8`: --input takes every word after it
        args.input, given_after = _split_overrides(args.input)
        overrides = given_after + overrides
    if command == "sweep":
        return run_sweep_command(args, lambda: start_ray(args.address), disconnect_ray)
    if command == "evaluate" and args.qa:
        return run_evaluate(args)
    if command == "ask":
        from clara_ray.ask import ask_command

        return ask_command(args.run, args.questions, args.k, args.json)
    if command == "demo":
        for flag, key in ((args.corpus, "data.corpus"), (args.train_qa, "data.train_qa"), (args.test_qa, "data.test_qa")):
            if flag:
                overrides.append(f"{key}={json.dumps(flag)}")
    try:
        config = load_config(args.config, overrides)
    except ConfigError as error:
        print(f"clara-ray: {error}", file=sys.stderr)
        return 2

    from clara_ray.pipeline import check_inputs

    try:
        if command == "encode" and (args.input or args.model_dir or args.output):
            if not (args.input and args.model_dir and args.output):
                print("clara-ray: encoding corpus files needs --input, --model-dir and --output "
                      "(without them: the corpus of the run --config names)", file=sys.stderr)
                return 2
            start_ray(args.address, dashboard=False)
            return run_encode(args, config)
        check_inputs(config)  # before Ray starts
        start_ray(args.address)
        result = run_step(command, getattr(args, "stage", None), config)
    except (UserError, FileExistsError) as error:  # the user's data, config or run directory
        print(f"clara-ray: {error}", file=sys.stderr)
        return 2
    disconnect_ray()
    print(summary_table(result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

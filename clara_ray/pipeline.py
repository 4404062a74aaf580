"""The whole CLaRa pipeline on Ray: data -> stage 1 -> (stage 2) -> encode -> index -> stage 3 -> evaluate.

    summary = run_pipeline(load_config("jobs/configs/tiny.yaml"))

Run directory (<run.output_dir>/<run.name>/):
    config.yaml          the resolved config
    data/                the bundled trap corpus files (when used), quarantine files, and
                         the stages' examples as Arrow files (clara_ray/training/tables.py)
    models/init          the untrained model (tiny: tokenizer trained here + random weights)
    models/stage1        after compressor pretraining (query reasoner = compressor)
    models/stage2        after instruction tuning (when stage2.enabled); it encodes the corpus
    models/stage3        after joint training
    memory/              memory shards of the corpus, encoded by models/stage2 (or stage1)
    index/               index versions over memory/ (clara_ray/index/versions.py)
    ray_train/           Ray Train's own run storage: each stage's checkpoints
                         (clara_ray/training/checkpoints.py)
    tensorboard/<stage>/ per-window metrics for TensorBoard (loss, recall, tokens/s,
                         the stage-3 step split: query / search / forward / backward)
    steps/<step>.json    written when a step finishes, with its result: init, training_data, stage1, stage2,
                         evaluate_before_stage3, stage3 (the encoding's mark is
                         memory/manifest.json)
    report.md, training.png, metrics.json
A rerun of the same config continues an interrupted run: finished steps are
skipped, a stage goes on from its last checkpoint, the encoding from its shards.
Test questions are read for evaluation only; they never enter any training.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray

from clara_ray.config import Baseline, CompressorMode, Config, ConfigError, load_config
from clara_ray.data.corpus_rows import CorpusFormat
from clara_ray.data.formats import (
    Document,
    LoadResult,
    QAExample,
    QuarantinedRow,
    read_corpus,
    read_qa,
    write_quarantine,
)
from clara_ray.data.trap import generate_trap_corpus, write_trap_corpus
from clara_ray.data.lengths import LengthReport, choose_lengths
from clara_ray.encode import EncodeSettings, encode_corpus
from clara_ray.errors import DataError
from clara_ray.eval import baselines
from clara_ray.eval.evaluate import Scores, generate_answers, query_reasoner_rankings, score
from clara_ray.index.actor import IndexActorCandidates, index_actor_name, start_index_actor
from clara_ray.index.refresh import RefreshPlan, refresh_scheduler_name, start_refresh_scheduler
from clara_ray.index.refresh_encoder import RefreshEncodeSettings
from clara_ray.index.versions import IndexSettings
from clara_ray.memory_shards import MANIFEST as MEMORY_MANIFEST
from clara_ray.memory_shards import read_memory_shards
from clara_ray.modeling.backbone import resolve_backbone
from clara_ray.modeling.checkpoint import load_model
from clara_ray.modeling.initial import build_initial_model
from clara_ray.modeling.text import document_input
from clara_ray.report import write_report
from clara_ray.training.checkpoints import latest_trainer_state
from clara_ray.training.stages import (
    StageResult,
    TrainingData,
    run_stage1,
    run_stage2,
    run_stage3,
    steps_for_data,
    write_training_data,
)


@dataclass(frozen=True)
class Inputs:
    corpus: LoadResult[Document]
    train_qa: LoadResult[QAExample]
    test_qa: LoadResult[QAExample]
    source: str
    corpus_path: Path


def encode_settings(config: Config) -> EncodeSettings:
    encode = config.encode
    return EncodeSettings(
        doc_max_len=config.model.doc_max_len,
        batch_size=encode.batch_size,
        min_actors=encode.min_actors,
        max_actors=encode.max_actors,
        num_cpus_per_actor=encode.num_cpus_per_actor,
        num_gpus_per_actor=encode.num_gpus_per_actor,
        dtype=config.model.dtype.value,
        on_bad_row=config.data.on_bad_row,
        rows_per_shard=encode.rows_per_shard,
        pad_to_doc_max_len=encode.pad_to_doc_max_len,
    )


def check_inputs(config: Config) -> None:
    """The model the config names can be found, and each data file it names exists
    (checked before Ray starts)."""
    if not config.model.is_tiny:
        resolve_backbone(config.model.backbone)  # a missing GGUF file or bundled package: BackboneError
    check_data_files(config)


def check_data_files(config: Config) -> None:
    """Each user file the config names exists."""
    data = config.data
    if data.uses_trap_corpus:
        return
    for key in ("corpus", "train_qa", "test_qa"):
        path = Path(getattr(data, key))
        if not path.is_file():
            raise DataError(f"data.{key}: {'not a file' if path.exists() else 'no such file'}: {path}")


def load_inputs(config: Config, run_dir: Path) -> Inputs:
    """Read (and for the trap corpus, first write) the three files, quarantining bad rows."""
    data = config.data
    if data.uses_trap_corpus:
        trap = data.trap
        corpus = generate_trap_corpus(trap.num_entities, trap.test_fraction, trap.seed, trap.family.value)
        paths = write_trap_corpus(run_dir / "data", corpus)
        source = (f"bundled similarity-trap corpus, family {trap.family.value}, "
                  f"{trap.num_entities} entities, seed {trap.seed}")
    else:
        check_data_files(config)
        paths = {"corpus": data.corpus, "train_qa": data.train_qa, "test_qa": data.test_qa}
        source = f"user files {data.corpus}"
    inputs = Inputs(
        read_corpus(paths["corpus"], data.on_bad_row),
        read_qa(paths["train_qa"], data.on_bad_row),
        read_qa(paths["test_qa"], data.on_bad_row),
        source,
        Path(paths["corpus"]),
    )
    for name in ("corpus", "train_qa", "test_qa"):
        if not getattr(inputs, name).records:
            result = getattr(inputs, name)
            raise DataError(f"{name} ({paths[name]}): no valid row of {result.num_input_rows}"
                            + (f"; first reason: {result.quarantined[0].reason}" if result.quarantined else ""))
    return inputs


def _file_stamps(config: Config) -> dict[str, list] | None:
    """Path, size and modification time of each user file (None for the bundled corpus, which the config fixes)."""
    if config.data.uses_trap_corpus:
        return None
    stamps = {}
    for key in ("corpus", "train_qa", "test_qa"):
        path = Path(getattr(config.data, key)).resolve()
        stat = path.stat()
        stamps[key] = [str(path), stat.st_size, stat.st_mtime_ns]
    return stamps


def set_aside(inputs: Inputs, long_answers: dict[str, list[dict]]) -> Inputs:
    """`inputs` with the QA rows whose answers did not fit moved to the quarantined rows."""
    def moved(result: LoadResult[QAExample], rows: list[dict]) -> LoadResult[QAExample]:
        reasons = {row["id"]: row["reason"] for row in rows}
        kept = [q for q in result.records if q.id not in reasons]
        extra = [QuarantinedRow(None, reasons[q.id], json.dumps(vars(q))) for q in result.records if q.id in reasons]
        return LoadResult(kept, result.quarantined + extra, result.num_input_rows)

    return Inputs(inputs.corpus, moved(inputs.train_qa, long_answers["train_qa"]),
                  moved(inputs.test_qa, long_answers["test_qa"]), inputs.source, inputs.corpus_path)


def write_quarantines(inputs: Inputs, run_dir: Path) -> None:
    for name in ("corpus", "train_qa", "test_qa"):
        result = getattr(inputs, name)
        if result.quarantined:
            write_quarantine(run_dir / "data" / f"{name}.quarantine.jsonl", result.quarantined)


def _load_for_eval(model_dir: Path):
    model, tokenizer, _ = load_model(model_dir)
    return model.eval(), tokenizer


def _query_reasoner_rankings(config: Config, model, tokenizer, test_qa, search) -> list[list[str]]:
    return query_reasoner_rankings(
        model, tokenizer, [q.question for q in test_qa], search, max(config.stage3.num_candidates, 5),
        config.model.question_max_len, config.eval.batch_size,
    )


def _baseline_rankings(config: Config, baseline: Baseline, documents, test_qa) -> list[list[str]]:
    questions = [q.question for q in test_qa]
    depth = max(5, config.stage3.top_k)
    if baseline == Baseline.BM25:
        return baselines.bm25_rankings(documents, questions, depth)
    return baselines.dense_rankings(documents, questions, depth, batch_size=config.eval.batch_size)


def _answer_and_score(config: Config, model, tokenizer, rankings, test_qa, memory_of) -> Scores:
    """The generator answers from each ranking's top-k memories; score retrieval and answers."""
    answers = generate_answers(
        model, tokenizer, [q.question for q in test_qa], rankings, memory_of, config.stage3.top_k,
        config.model.question_max_len, config.model.answer_max_len, config.eval.batch_size,
    )
    return score(rankings, answers, test_qa)


STEPS_DIR = "steps"


def _done(run_dir: Path, name: str) -> dict | None:
    marker = run_dir / STEPS_DIR / f"{name}.json"
    return json.loads(marker.read_text()) if marker.exists() else None


def _mark_done(run_dir: Path, name: str, record: dict) -> dict:
    """steps/<name>.json, renamed into place: the step's result, and the mark that it finished."""
    (run_dir / STEPS_DIR).mkdir(exist_ok=True)
    partial = run_dir / STEPS_DIR / f"{name}.json.partial"
    partial.write_text(json.dumps(record))
    partial.replace(run_dir / STEPS_DIR / f"{name}.json")
    return record


def _same_config(saved: Path, config: Config) -> bool:
    """Equal settings (keys a later version added read as their defaults)."""
    try:
        return load_config(saved).to_dict() == config.to_dict()
    except ConfigError:
        return False


def _open_run_dir(config: Config, log) -> Path:
    """A new run directory, or the one of an interrupted run of the same config."""
    run_dir = (Path(config.run.output_dir) / config.run.name).resolve()
    saved = run_dir / "config.yaml"
    if saved.exists():
        if not _same_config(saved, config):
            raise FileExistsError(
                f"run directory {run_dir} belongs to a run with another config: pick another run.name, "
                f"or rerun with the config in {saved} to continue that run"
            )
        log(f"[pipeline] continuing the run in {run_dir}")
        return run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"run directory {run_dir} is not empty and holds no run: pick another run.name")
    run_dir.mkdir(parents=True, exist_ok=True)
    partial = run_dir / "config.yaml.partial"
    partial.write_text(config.to_yaml())
    partial.replace(saved)
    return run_dir


def _stage(run_dir: Path, name: str, train, log) -> StageResult:
    """A training stage, or the result of the finished one (its step marker)."""
    done = _done(run_dir, name)
    if done is not None:
        log(f"[pipeline] {name} finished in an earlier attempt: {done['model_dir']}")
        return StageResult(Path(done["model_dir"]), done["history"], done["resumed_after"])
    result = train()
    _mark_done(run_dir, name, {"model_dir": str(result.model_dir), "history": result.history,
                               "resumed_after": result.resumed_after})
    return result


def _initial_step(config: Config, inputs: Inputs, run_dir: Path, init_dir: Path) -> tuple[Config, Inputs, LengthReport]:
    """The init step: the untrained model, the token lengths picked from the data, and the
    QA rows whose answers do not fit set aside (steps/init.json; a rerun reads them back).
    Returns the config with those lengths and the inputs without those rows."""
    init = _done(run_dir, "init")
    files = _file_stamps(config)
    if init is not None and init.get("files", files) != files:
        raise DataError(f"the data files changed since the run in {run_dir} started: pick another run.name "
                        f"(or delete that directory) to start over on the new data")
    if init is None:
        initial = build_initial_model(config, inputs.corpus.records, inputs.train_qa.records, init_dir,
                                      inputs.test_qa.records)
        init = _mark_done(run_dir, "init", {
            "model_dir": str(init_dir), "lengths": initial.lengths.as_dict(), "files": files,
            "long_answers": {name: [{"id": q.id, "reason": reason} for q, reason in rows]
                             for name, rows in initial.long_answers.items()},
        })
    if "lengths" in init:
        lengths = LengthReport.from_dict(init["lengths"])
    else:  # a run begun before lengths were picked from the data: the same choice again
        from transformers import AutoTokenizer

        lengths = choose_lengths(config.model, AutoTokenizer.from_pretrained(Path(init["model_dir"]) / "tokenizer"),
                                 inputs.corpus.records, inputs.train_qa.records, inputs.test_qa.records)
        init = {**init, "long_answers": {"train_qa": [], "test_qa": []}}
    config = config.with_lengths(lengths.lengths)
    inputs = set_aside(inputs, init["long_answers"])
    write_quarantines(inputs, run_dir)
    return config, inputs, lengths


def _final_refresh(config: Config, index, scheduler, model_dir: Path, log) -> tuple[dict, dict]:
    """With a trainable compressor: the corpus encoded by the final compressor into
    the last index version (after any refresh still running), for the evaluation.
    Returns that encoding's memory by id, and the scheduler's record of every refresh."""
    steps = config.stage3.steps
    ray.get(scheduler.request_final.remote(steps, str(model_dir)))
    status = ray.get(scheduler.drain.remote())
    info = ray.get(index.info.remote())
    if info["step"] != steps:
        failed = [e for e in status["events"] if e["step"] == steps]
        raise RuntimeError(f"the final index refresh (step {steps}) failed: "
                           f"{failed[-1]['error'] if failed else 'no record of it'}; rerun the same command to retry")
    log(f"[pipeline] index {info['version']} from the stage-3 compressor: {status['swapped']} refreshes swapped in, "
        f"{len(status['skipped'])} skipped, {status['failed']} failed")
    shards = read_memory_shards(info["memory_dir"])
    return dict(zip(shards.doc_ids, shards.memory)), status


def run_pipeline(config: Config, log=print) -> dict:
    """Run every phase on the connected Ray cluster; returns the summary also written to metrics.json.

    Rerun the same command after a killed driver: finished steps (steps/<name>.json)
    are skipped, a training stage goes on from its last checkpoint and the encoding
    from the shards it had written."""
    run_dir = _open_run_dir(config, log)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = now - clock
        clock = now
        log(f"[pipeline] {name} done in {seconds[name]:.1f}s")

    log(f"[pipeline] run directory {run_dir}")
    init_dir = run_dir / "models" / "init"
    config, inputs, lengths = _initial_step(config, load_inputs(config, run_dir), run_dir, init_dir)
    documents, train_qa, test_qa = inputs.corpus.records, inputs.train_qa.records, inputs.test_qa.records
    log(
        f"[pipeline] data: {len(documents)} documents, {len(train_qa)} training and {len(test_qa)} test "
        f"questions ({sum(len(r.quarantined) for r in (inputs.corpus, inputs.train_qa, inputs.test_qa))} rows quarantined)"
    )
    for line in lengths.lines():
        log(f"[pipeline] {line}")
    for warning in lengths.warnings(config.model.truncation_warning):
        log(f"[pipeline] WARNING: {warning}")
    if not train_qa or not test_qa:
        raise DataError(f"no {'training' if not train_qa else 'test'} question has an answer that fits "
                        f"model.answer_max_len={config.model.answer_max_len}; raise it or set it to auto")
    phase("data and initial model")

    written = _done(run_dir, "training_data")
    if written is None:
        data = write_training_data(config, {d.id: document_input(d.text, d.title) for d in documents}, train_qa, run_dir)
        _mark_done(run_dir, "training_data", {k: None if v is None else str(v) for k, v in vars(data).items()})
    else:
        data = TrainingData(**{k: None if v is None else Path(v) for k, v in written.items()})
    steps = steps_for_data(config, data)
    config = config.with_steps({stage: count for stage, (count, _) in steps.items()})
    for stage, (count, how) in steps.items():
        log(f"[pipeline] {stage}.steps = {count} ({how})")
    phase("training data")

    stage1 = _stage(run_dir, "stage1", lambda: run_stage1(config, data, init_dir, run_dir), log)
    phase("stage 1 (compressor pretraining)")

    tuned = stage1
    if config.stage2.enabled:
        tuned = _stage(run_dir, "stage2", lambda: run_stage2(config, data, stage1.model_dir, run_dir), log)
        phase("stage 2 (instruction tuning)")

    # The encoder reads the corpus file itself, as a corpus-encoding job would, and
    # sets aside the same bad rows the reader above did.
    memory_dir = run_dir / "memory"
    if not (memory_dir / MEMORY_MANIFEST).exists():
        encode_corpus(inputs.corpus_path.resolve(), tuned.model_dir, memory_dir, encode_settings(config),
                      CorpusFormat.JSONL, log=log)
    encoded = json.loads((memory_dir / MEMORY_MANIFEST).read_text())
    if encoded["num_encoded"] != len(documents):
        raise RuntimeError(f"encoded {encoded['num_encoded']} documents, but {len(documents)} were read as valid")
    phase("encode corpus (Ray Data)")

    trainable = config.stage3.compressor == CompressorMode.TRAINABLE
    resumed = latest_trainer_state(run_dir / "ray_train" / "stage3") if trainable and not _done(run_dir, "stage3") else None
    index = start_index_actor(str(memory_dir), index_actor_name(run_dir), settings=IndexSettings.from_config(config.index),
                              serve=None if resumed is None else resumed.get("index_version"))
    shards = read_memory_shards(memory_dir)
    memory_of = dict(zip(shards.doc_ids, shards.memory))
    refresh = None
    if trainable:
        plan = RefreshPlan(str(memory_dir), str(data.documents), RefreshEncodeSettings.from_config(config),
                           str(run_dir / "refresh"), config.stage3.num_candidates)
        scheduler = start_refresh_scheduler(index, plan, refresh_scheduler_name(run_dir),
                                            live_step=ray.get(index.info.remote())["step"])
        refresh = (scheduler, plan)

    def search(queries: np.ndarray, num_candidates: int):
        return ray.get(index.search.remote(queries, num_candidates))

    phase("index")

    results: dict[str, dict] = {}
    before = _done(run_dir, "evaluate_before_stage3")
    if before is None:
        model, tokenizer = _load_for_eval(tuned.model_dir)
        rankings = _query_reasoner_rankings(config, model, tokenizer, test_qa, search)
        before = _mark_done(run_dir, "evaluate_before_stage3",
                            _answer_and_score(config, model, tokenizer, rankings, test_qa, memory_of).as_dict())
    phase("evaluate before stage 3")

    stage3 = _stage(run_dir, "stage3", lambda: run_stage3(
        config, data, tuned.model_dir, IndexActorCandidates(index), run_dir, refresh=refresh
    ), log)
    phase("stage 3 (joint training)")
    refreshes = None
    if trainable:
        memory_of, refreshes = _final_refresh(config, index, refresh[0], stage3.model_dir, log)
        phase("final refresh (the corpus encoded by the stage-3 compressor)")
    model, tokenizer = _load_for_eval(stage3.model_dir)
    for baseline in config.eval.baselines:
        rankings = _baseline_rankings(config, baseline, documents, test_qa)
        results[baseline.value] = _answer_and_score(config, model, tokenizer, rankings, test_qa, memory_of).as_dict()
    results["query reasoner before stage 3"] = before
    rankings = _query_reasoner_rankings(config, model, tokenizer, test_qa, search)
    results["query reasoner after stage 3"] = _answer_and_score(
        config, model, tokenizer, rankings, test_qa, memory_of
    ).as_dict()
    phase("evaluate")
    ray.kill(index)
    if refresh is not None:
        ray.kill(refresh[0])

    files = {
        name: {"input": r.num_input_rows, "used": len(r.records), "quarantined": len(r.quarantined)}
        for name, r in (("corpus", inputs.corpus), ("train_qa", inputs.train_qa), ("test_qa", inputs.test_qa))
    }
    summary = {
        "run": config.run.name,
        "run_dir": str(run_dir),
        "top_k": config.stage3.top_k,
        "doc_max_len": config.model.doc_max_len,
        "lengths": lengths.as_dict(),
        "results": results,
        "data": {
            "corpus": inputs.source,
            "num_test_questions": len(test_qa),
            "files": files,
            "num_encoded": encoded["num_encoded"],
            "num_truncated": encoded["num_truncated"],
        },
        "seconds": seconds,
        "models": {"stage1": str(stage1.model_dir), "stage2": str(tuned.model_dir) if tuned is not stage1 else None,
                   "stage3": str(stage3.model_dir)},
        "refresh": refreshes,
        "resumed_after": {"stage1": stage1.resumed_after, "stage2": tuned.resumed_after if tuned is not stage1 else [],
                          "stage3": stage3.resumed_after},
    }
    report = write_report(run_dir, summary, stage1.history, stage3.history)
    log(f"[pipeline] report: {report}")
    return summary

"""The CLaRa pipeline on Ray: data -> stage 1 -> (stage 2) -> encode -> index -> stage 3 -> evaluate.

    summary = run_pipeline(load_config("jobs/configs/tiny.yaml"))      # every step in order
    run = Run(load_config("jobs/configs/tiny.yaml", ["run.name=exp1"]))  # or one step at a time
    run.train(1)                                                        # (jobs/<step>.py, clara-ray <step>)

Run directory (<run.output_dir>/<run.name>/):
    config.yaml          the resolved config
    data/                the bundled trap corpus files (when used), quarantine files, and
                         the stages' examples as Arrow files (clara_ray/training/tables.py)
    models/init          the untrained model (tiny: tokenizer trained here + random weights)
    models/stage1        after compressor pretraining (query reasoner = compressor)
    models/stage2        after instruction tuning (when stage2.enabled); it encodes the corpus
    models/stage3        after joint training (with stage3.attempts > 1: a copy of the kept attempt's)
    attempts/stage3/<i>/ with stage3.attempts > 1: attempt i's own models/, ray_train/, tensorboard/
                         and attempt.json (its seed, history and fit once it finished)
    memory/              memory shards of the corpus, encoded by models/stage2 (or stage1)
    index/               index versions over memory/ (clara_ray/index/versions.py); CURRENT names
                         the live one (with a trainable compressor, stage 3's last refresh)
    refresh/             with a trainable compressor: the refreshed versions' memory shards
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

import contextlib
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
from clara_ray.errors import DataError, UserError
from clara_ray.eval import baselines
from clara_ray.eval.evaluate import Scores, generate_answers, query_reasoner_rankings, score
from clara_ray.index.actor import IndexActorCandidates, index_actor_name, start_index_actor
from clara_ray.index.refresh import RefreshPlan, refresh_scheduler_name, start_refresh_scheduler
from clara_ray.index.versions import (
    IndexSettings,
    build_version,
    current_version,
    find_version,
    list_versions,
    publish,
    read_version_manifest,
    version_step,
)
from clara_ray.memory_shards import MANIFEST as MEMORY_MANIFEST
from clara_ray.memory_shards import read_memory_shards
from clara_ray.modeling.backbone import resolve_backbone
from clara_ray.modeling.checkpoint import load_model
from clara_ray.modeling.initial import build_initial_model
from clara_ray.modeling.text import document_input
from clara_ray.report import write_report
from clara_ray.training.checkpoints import latest_trainer_state
from clara_ray.training.settings import Stage3Settings
from clara_ray.training.stages import (
    StageResult,
    TrainingData,
    run_stage1,
    run_stage2,
    run_stage3,
    run_stage3_attempts,
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
        wait_for_min_actors_s=encode.wait_for_min_actors_s,
        dtype=config.model.dtype.value,
        on_bad_row=config.data.on_bad_row,
        rows_per_shard=encode.rows_per_shard,
        pad_to_doc_max_len=encode.pad_to_doc_max_len,
        resources_per_actor=encode.resources_per_actor,
        scheduling=encode.scheduling,
    )


def check_inputs(config: Config) -> None:
    """The model the config names can be found, each data file it names exists, and
    its run directory is new or holds a run of this config (checked before Ray starts)."""
    if not config.model.is_tiny:
        resolve_backbone(config.model.backbone)  # a missing GGUF file or bundled package: BackboneError
    check_data_files(config)
    check_run_dir(config)


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


def _query_reasoner_rankings(config: Config, model, tokenizer, test_qa, search, name: str) -> list[list[str]]:
    return query_reasoner_rankings(
        model, tokenizer, [q.question for q in test_qa], search, max(config.stage3.num_candidates, 5),
        config.model.question_max_len, config.eval.batch_size, progress=f"evaluate: retrieve ({name})",
    )


def _baseline_rankings(config: Config, baseline: Baseline, documents, test_qa) -> list[list[str]]:
    questions = [q.question for q in test_qa]
    depth = max(5, config.stage3.top_k)
    if baseline == Baseline.BM25:
        return baselines.bm25_rankings(documents, questions, depth)
    return baselines.dense_rankings(documents, questions, depth, batch_size=config.eval.batch_size)


def _answer_and_score(config: Config, model, tokenizer, rankings, test_qa, memory_of, name: str) -> Scores:
    """The generator answers from each ranking's top-k memories; score retrieval and answers."""
    answers = generate_answers(
        model, tokenizer, [q.question for q in test_qa], rankings, memory_of, config.stage3.top_k,
        config.model.question_max_len, config.model.answer_max_len, config.eval.batch_size,
        progress=f"evaluate: answer ({name})",
    )
    return score(rankings, answers, test_qa)


def _gold_reading(config: Config, model, tokenizer, rankings, test_qa, memory_of, corpus_ids: set[str]) -> dict | None:
    """EM and F1 of the generator given each test question's gold documents first in its
    top-k (the rest from `rankings`): the answers' ceiling under perfect retrieval, which
    tells a generator that cannot read from a retriever that does not find. None when no
    test question names a gold document in the corpus."""
    rows = [i for i, q in enumerate(test_qa) if q.gold_doc_ids and set(q.gold_doc_ids) <= corpus_ids]
    if not rows:
        return None
    questions = [test_qa[i] for i in rows]
    gold_first = [list(q.gold_doc_ids) + [d for d in rankings[i] if d not in q.gold_doc_ids]
                  for i, q in zip(rows, questions)]
    scores = _answer_and_score(config, model, tokenizer, gold_first, questions, memory_of, "gold documents")
    return {"questions": len(rows), "em": scores.exact_match, "f1": scores.f1}


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


def check_run_dir(config: Config) -> Path:
    """The run directory `config` names, if it is new or holds a run of the same config."""
    run_dir = (Path(config.run.output_dir) / config.run.name).resolve()
    saved = run_dir / "config.yaml"
    if saved.exists():
        if not _same_config(saved, config):
            raise FileExistsError(
                f"run directory {run_dir} belongs to a run with another config: pick another run.name, "
                f"or rerun with the config in {saved} to continue that run"
            )
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"run directory {run_dir} is not empty and holds no run: pick another run.name")
    return run_dir


def _open_run_dir(config: Config, log) -> Path:
    """A new run directory, or the one of an interrupted run of the same config."""
    run_dir = check_run_dir(config)
    saved = run_dir / "config.yaml"
    if saved.exists():
        log(f"[pipeline] continuing the run in {run_dir}")
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    partial = run_dir / "config.yaml.partial"
    partial.write_text(config.to_yaml())
    partial.replace(saved)
    return run_dir


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


def _final_refresh(config: Config, index, scheduler, model_dir: Path, log) -> dict:
    """With a trainable compressor: the corpus encoded by the final compressor into
    the last index version (after any refresh still running), for the evaluation.
    Returns the scheduler's record of every refresh."""
    steps = Stage3Settings.from_config(config).steps  # counterfactual world steps included
    ray.get(scheduler.request_final.remote(steps, str(model_dir)))
    status = ray.get(scheduler.drain.remote())
    info = ray.get(index.info.remote())
    if info["step"] != steps:
        failed = [e for e in status["events"] if e["step"] == steps]
        raise RuntimeError(f"the final index refresh (step {steps}) failed: "
                           f"{failed[-1]['error'] if failed else 'no record of it'}; rerun the same command to retry")
    log(f"[pipeline] index {info['version']} from the stage-3 compressor: {status['swapped']} refreshes swapped in, "
        f"{len(status['skipped'])} skipped, {status['failed']} failed")
    return status


class StepNotReady(UserError):
    """A step whose inputs an earlier step has not written yet."""


@dataclass(frozen=True)
class Prepared:
    """What every step after prepare_data reads: the config with the lengths and step
    counts picked from the data, the inputs (long-answer rows set aside) and the
    training tables."""

    config: Config
    inputs: Inputs
    lengths: LengthReport
    data: TrainingData


class Run:
    """A run directory and the steps that fill it, each a job of its own
    (``jobs/<step>.py``, ``clara-ray <step>``) and idempotent: a finished step's
    marker (steps/<name>.json) is read back instead of running it again, an
    unfinished one goes on from what it left (a stage from its checkpoint, the
    encoding from its shards). A step whose inputs are missing says which step to
    run first. `pipeline()` runs them all in order.

        prepare_data  -> models/init, data/*.arrow       steps/init.json, steps/training_data.json
        train 1, 2, 3 -> models/stage<n>, ray_train/     steps/stage<n>.json
        encode_corpus -> memory/                          memory/manifest.json
        build_index   -> index/v<step>                    index/CURRENT
        evaluate      -> metrics.json, report.md          steps/evaluate_before_stage3.json (before stage 3)
    """

    def __init__(self, config: Config, log=print):
        self.log = log
        self.run_dir = _open_run_dir(config, log)
        self._config = config
        self._prepared: Prepared | None = None
        self.seconds: dict[str, float] = {}

    def _timed(self, name: str, since: float) -> None:
        self.seconds[name] = time.perf_counter() - since
        self.log(f"[pipeline] {name} done in {self.seconds[name]:.1f}s")

    def _require(self, name: str, step_command: str) -> dict:
        done = _done(self.run_dir, name)
        if done is None:
            raise StepNotReady(f"{self.run_dir}: {name} has not finished yet; run `{step_command}` first")
        return done

    # ------------------------------------------------------------------ steps

    def prepare_data(self) -> Prepared:
        """Read (or generate) the data, build the initial model, pick the token lengths and
        write every stage's examples."""
        if self._prepared is not None:
            return self._prepared
        started = time.perf_counter()
        run_dir, log = self.run_dir, self.log
        log(f"[pipeline] run directory {run_dir}")
        config, inputs, lengths = _initial_step(self._config, load_inputs(self._config, run_dir), run_dir,
                                                run_dir / "models" / "init")
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
        written = _done(run_dir, "training_data")
        if written is None:
            data = write_training_data(config, {d.id: document_input(d.text, d.title) for d in documents}, train_qa,
                                       run_dir, titles={d.id: d.title for d in documents})
            _mark_done(run_dir, "training_data", {k: None if v is None else str(v) for k, v in vars(data).items()})
        else:
            data = TrainingData(**{k: None if v is None else Path(v) for k, v in written.items()})
        steps = steps_for_data(config, data)
        config = config.with_steps({stage: count for stage, (count, _) in steps.items()})
        for stage, (count, how) in steps.items():
            log(f"[pipeline] {stage}.steps = {count} ({how})")
        worlds = config.stage3.world_steps(config.stage3.steps)
        if worlds:
            log(f"[pipeline] stage 3: {config.stage3.steps} steps, then {worlds} in counterfactual "
                f"{config.stage3.counterfactual_swap.value} worlds (stage3.world_steps_fraction "
                f"{config.stage3.world_steps_fraction:g}, counterfactual_rate {config.stage3.counterfactual_rate:g})")
        self._prepared = Prepared(config, inputs, lengths, data)
        self._timed("prepare data", started)
        return self._prepared

    def train(self, stage: int) -> StageResult:
        """Stage 1 (compressor pretraining), 2 (instruction tuning) or 3 (joint training)."""
        if stage not in (1, 2, 3):
            raise UserError(f"there is no stage {stage}: stages are 1, 2 and 3")
        prepared = self.prepare_data()
        config, name = prepared.config, f"stage{stage}"
        done = _done(self.run_dir, name)
        if done is not None:
            self.log(f"[pipeline] {name} finished in an earlier attempt: {done['model_dir']}")
            return StageResult(Path(done["model_dir"]), done["history"], done["resumed_after"])
        started = time.perf_counter()
        record = {}
        if stage == 1:
            result = run_stage1(config, prepared.data, self.run_dir / "models" / "init", self.run_dir)
        elif stage == 2:
            if not config.stage2.enabled:
                raise UserError("stage 2 is off in this run's config (stage2.enabled: false)")
            stage1 = self._require("stage1", "train --stage 1")
            result = run_stage2(config, prepared.data, Path(stage1["model_dir"]), self.run_dir)
        else:
            result, record = self._stage3(prepared)
        _mark_done(self.run_dir, name, {"model_dir": str(result.model_dir), "history": result.history,
                                        "resumed_after": result.resumed_after, **record})
        self._timed(f"stage {stage}", started)
        return result

    def encode_corpus(self) -> dict:
        """The corpus encoded by the tuned model (stage 2's, else stage 1's) into memory/."""
        prepared = self.prepare_data()
        memory_dir = self.run_dir / "memory"
        if not (memory_dir / MEMORY_MANIFEST).exists():
            started = time.perf_counter()
            # The encoder reads the corpus file itself, as a corpus-encoding job would,
            # and sets aside the same bad rows the reader of prepare_data did.
            encode_corpus(prepared.inputs.corpus_path.resolve(), self._tuned_model_dir(), memory_dir,
                          encode_settings(prepared.config), CorpusFormat.JSONL, log=self.log)
            self._timed("encode corpus", started)
        encoded = json.loads((memory_dir / MEMORY_MANIFEST).read_text())
        if encoded["num_encoded"] != len(prepared.inputs.corpus.records):
            raise RuntimeError(f"encoded {encoded['num_encoded']} documents, "
                               f"but {len(prepared.inputs.corpus.records)} were read as valid")
        return encoded

    def build_index(self) -> dict:
        """Index version of memory/ under index/ (built in a Ray task; kept if built already)."""
        config = self.prepare_data().config
        memory_dir = self._require_memory()
        settings = IndexSettings.from_config(config.index)
        index_root = self.run_dir / "index"
        version = find_version(index_root, memory_dir, settings)
        if version is None:
            started = time.perf_counter()
            step = max([0] + [version_step(v) + 1 for v in list_versions(index_root)])
            build = ray.remote(build_version).options(num_cpus=settings.num_cpus_per_shard,
                                                      num_gpus=settings.num_gpus_per_shard)
            version = Path(ray.get(build.remote(str(memory_dir), str(index_root), step, settings)))
            self._timed("build index", started)
        if current_version(index_root) is None:  # else a stage-3 refresh's version is live: it stays so
            publish(version)
        manifest = read_version_manifest(version)
        return {"version": version.name, "num_shards": len(manifest["shards"])}

    def evaluate(self) -> dict:
        """Before stage 3: the tuned model's retrieval and answers (kept for the final
        comparison). After it: the baselines, before and after stage 3 side by side;
        writes metrics.json and report.md, and returns that summary."""
        prepared = self.prepare_data()
        config, test_qa = prepared.config, prepared.inputs.test_qa.records
        corpus_ids = {d.id for d in prepared.inputs.corpus.records}
        before = _done(self.run_dir, "evaluate_before_stage3")
        if before is None:
            started = time.perf_counter()
            with self._index(serve=self._initial_version().name) as (search, memory_of):
                model, tokenizer = _load_for_eval(self._tuned_model_dir())
                name = "query reasoner before stage 3"
                rankings = _query_reasoner_rankings(config, model, tokenizer, test_qa, search, name)
                scores = _answer_and_score(config, model, tokenizer, rankings, test_qa, memory_of, name).as_dict()
                gold = _gold_reading(config, model, tokenizer, rankings, test_qa, memory_of, corpus_ids)
                self._log_gold_reading(gold)
                before = _mark_done(self.run_dir, "evaluate_before_stage3", {**scores, "gold_reading": gold})
            self._timed("evaluate before stage 3", started)
        before = dict(before)
        gold_before = before.pop("gold_reading", None)
        stage3 = _done(self.run_dir, "stage3")
        if stage3 is None:
            return {"query reasoner before stage 3": before}
        started = time.perf_counter()
        results: dict[str, dict] = {}
        with self._index() as (search, memory_of):  # the live version: stage 3's last refresh, if any
            model, tokenizer = _load_for_eval(Path(stage3["model_dir"]))
            for baseline in config.eval.baselines:
                rankings = _baseline_rankings(config, baseline, prepared.inputs.corpus.records, test_qa)
                results[baseline.value] = _answer_and_score(config, model, tokenizer, rankings, test_qa,
                                                            memory_of, baseline.value).as_dict()
            results["query reasoner before stage 3"] = before
            name = "query reasoner after stage 3"
            rankings = _query_reasoner_rankings(config, model, tokenizer, test_qa, search, name)
            results[name] = _answer_and_score(config, model, tokenizer, rankings, test_qa, memory_of, name).as_dict()
            gold = _gold_reading(config, model, tokenizer, rankings, test_qa, memory_of, corpus_ids)
        self._timed("evaluate", started)
        return self._summary(results, stage3, {"before stage 3": gold_before, "after stage 3": gold})

    def _log_gold_reading(self, gold: dict | None) -> None:
        """The tuned generator's answers given the gold documents: below half right, stage 3
        has little to learn from (its only signal is how well the generator reads)."""
        if gold is None:
            return
        self.log(f"[pipeline] given each test question's gold document, the generator answers EM {gold['em']:.3f} "
                 f"({gold['questions']} questions)")
        if gold["em"] < 0.5:
            self.log("[pipeline] WARNING: the generator reads few answers from memory even given the gold document; "
                     "stage 3 learns retrieval only through what it reads. Train stage 1 longer, or see "
                     "qa_loss in its log (README, \"When stage 1 does not read\").")

    def pipeline(self) -> dict:
        """Every step in order, finished ones skipped; returns the evaluation's summary."""
        self.prepare_data()
        self.train(1)
        if self._prepared.config.stage2.enabled:
            self.train(2)
        self.encode_corpus()
        self.build_index()
        self.evaluate()  # before stage 3
        self.train(3)
        return self.evaluate()

    # ---------------------------------------------------------------- helpers

    def _tuned_model_dir(self) -> Path:
        """The model that encodes the corpus and starts stage 3: stage 2's when it runs, else stage 1's."""
        if self.prepare_data().config.stage2.enabled:
            return Path(self._require("stage2", "train --stage 2")["model_dir"])
        return Path(self._require("stage1", "train --stage 1")["model_dir"])

    def _require_memory(self) -> Path:
        memory_dir = self.run_dir / "memory"
        if not (memory_dir / MEMORY_MANIFEST).exists():
            raise StepNotReady(f"{self.run_dir}: the corpus is not encoded yet; run `encode_corpus` first")
        return memory_dir

    def _initial_version(self) -> Path:
        """The index version built from memory/ by build_index."""
        memory_dir = self._require_memory()
        version = find_version(self.run_dir / "index", memory_dir,
                               IndexSettings.from_config(self.prepare_data().config.index))
        if version is None:
            raise StepNotReady(f"{self.run_dir}: no index over memory/ yet; run `build_index` first")
        return version

    @contextlib.contextmanager
    def _index(self, serve: str | None = None, refresh_plan: RefreshPlan | None = None):
        """The run's index router serving `serve` (default: the live version), for the
        length of the block: (search, memory by document id of the served version). The
        live version (index/CURRENT) is live again afterwards."""
        config = self.prepare_data().config
        live = current_version(self.run_dir / "index")
        if live is None:
            raise StepNotReady(f"{self.run_dir}: no index yet; run `build_index` first")
        index = start_index_actor(str(self._require_memory()), index_actor_name(self.run_dir),
                                  settings=IndexSettings.from_config(config.index), serve=serve or live.name)
        try:
            info = ray.get(index.info.remote())
            shards = read_memory_shards(info["memory_dir"])
            memory_of = dict(zip(shards.doc_ids, shards.memory))

            def search(queries: np.ndarray, num_candidates: int):
                return ray.get(index.search.remote(queries, num_candidates))

            yield search, memory_of
        finally:
            ray.kill(index)
            if current_version(self.run_dir / "index") != live:
                publish(live)

    def _stage3(self, prepared: Prepared) -> tuple[StageResult, dict]:
        config, run_dir = prepared.config, self.run_dir
        tuned = self._tuned_model_dir()
        memory_dir = self._require_memory()
        self._initial_version()
        trainable = config.stage3.compressor == CompressorMode.TRAINABLE
        resumed = latest_trainer_state(run_dir / "ray_train" / "stage3") if trainable else None
        serve = resumed.get("index_version") if resumed else None
        index = start_index_actor(str(memory_dir), index_actor_name(run_dir),
                                  settings=IndexSettings.from_config(config.index),
                                  serve=serve or (None if trainable else self._initial_version().name))
        scheduler = None
        try:
            refresh = None
            if trainable:
                plan = RefreshPlan(str(memory_dir), str(prepared.data.documents),
                                   encode_settings(config), str(run_dir / "refresh"),
                                   config.stage3.num_candidates)
                scheduler = start_refresh_scheduler(index, plan, refresh_scheduler_name(run_dir),
                                                    live_step=ray.get(index.info.remote())["step"])
                refresh = (scheduler, plan)
            if trainable:
                result = run_stage3(config, prepared.data, tuned, IndexActorCandidates(index), run_dir,
                                    refresh=refresh)
                return result, {"refresh": _final_refresh(config, index, scheduler, result.model_dir, self.log)}
            result, attempts = run_stage3_attempts(config, prepared.data, tuned, IndexActorCandidates(index),
                                                   run_dir, self.log)
            return result, {"attempts": attempts} if attempts else {}
        finally:
            for actor in (scheduler, index):
                if actor is not None:
                    ray.kill(actor)

    def _summary(self, results: dict, stage3: dict, gold_reading: dict) -> dict:
        prepared = self.prepare_data()
        inputs, run_dir = prepared.inputs, self.run_dir
        encoded = json.loads((run_dir / "memory" / MEMORY_MANIFEST).read_text())
        stages = {name: _done(run_dir, name) for name in ("stage1", "stage2")}
        files = {
            name: {"input": r.num_input_rows, "used": len(r.records), "quarantined": len(r.quarantined)}
            for name, r in (("corpus", inputs.corpus), ("train_qa", inputs.train_qa), ("test_qa", inputs.test_qa))
        }
        summary = {
            "run": prepared.config.run.name,
            "run_dir": str(run_dir),
            "top_k": prepared.config.stage3.top_k,
            "doc_max_len": prepared.config.model.doc_max_len,
            "lengths": prepared.lengths.as_dict(),
            "results": results,
            "gold_reading": gold_reading,
            "data": {
                "corpus": inputs.source,
                "num_test_questions": len(inputs.test_qa.records),
                "files": files,
                "num_encoded": encoded["num_encoded"],
                "num_truncated": encoded["num_truncated"],
            },
            "seconds": self.seconds,
            "models": {"stage1": stages["stage1"]["model_dir"],
                       "stage2": None if stages["stage2"] is None else stages["stage2"]["model_dir"],
                       "stage3": stage3["model_dir"]},
            "refresh": stage3.get("refresh"),
            "stage3_attempts": stage3.get("attempts", []),
            "stage3_max_attempts": prepared.config.stage3.num_attempts,
            "stage3_takeoff_recall": prepared.config.stage3.takeoff_recall,
            "resumed_after": {"stage1": stages["stage1"]["resumed_after"],
                              "stage2": [] if stages["stage2"] is None else stages["stage2"]["resumed_after"],
                              "stage3": stage3["resumed_after"]},
        }
        report = write_report(run_dir, summary, stages["stage1"]["history"], stage3["history"])
        self.log(f"[pipeline] report: {report}")
        return summary


def run_pipeline(config: Config, log=print) -> dict:
    """Every step on the connected Ray cluster; returns the summary also written to metrics.json.

    Rerun the same command after a killed driver: finished steps (steps/<name>.json)
    are skipped, a training stage goes on from its last checkpoint and the encoding
    from the shards it had written."""
    return Run(config, log).pipeline()

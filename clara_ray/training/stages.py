"""Drivers for the training stages: config in, Ray Train + DeepSpeed run, model directory out.

    data = write_training_data(config, documents, train_qa, run_dir)   # <run_dir>/data/*.arrow
    stage1 = run_stage1(config, data, init_model_dir, run_dir)
    stage2 = run_stage2(config, data, stage1.model_dir, run_dir)   # when config.stage2.enabled
    stage3, attempts = run_stage3_attempts(config, data, stage2.model_dir, IndexActorCandidates(router), run_dir)
    # (run_stage3: one attempt; a sweep's trials call it)

The stages read their examples from the files `write_training_data` wrote
(``tables.py``), through a Ray Data draw plan split across the workers
(``data.py``); only paths and settings travel in ``train_loop_config``. Each
returns a `StageResult` with the trained model directory (copied out of Ray
Train's storage into <run_dir>/models/<stage>) and the metric history.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from clara_ray.config import Config, config_from_dict, steps_for_counts
from clara_ray.errors import DataError
from clara_ray.placement import train_placement
from clara_ray.progress import PROGRESS_FILE, StageBar, use_bars
from clara_ray.training.batches import prepare_stage1_examples, prepare_stage2_examples
from clara_ray.training.examples import QuestionBatch
from clara_ray.training.candidates import CandidateSource
from clara_ray.training.checkpoints import MODEL_DIR, read_trainer_state
from clara_ray.training.data import PLAN, data_config, draw_plan
from clara_ray.training.loops import stage1_loop, stage2_loop, stage3_loop
from clara_ray.training.settings import Stage1Settings, Stage2Settings, Stage3Settings, WorkerSettings
from clara_ray.training.steps import attempt_fit
from clara_ray.training.tables import DOCUMENTS, read_table, write_documents, write_examples, write_questions
from clara_ray.training.validation import split_validation


@dataclass(frozen=True)
class StageResult:
    model_dir: Path
    history: list[dict]
    resumed_after: list[int]  # steps after which a failed stage went on from its checkpoint


@dataclass(frozen=True)
class TrainingData:
    """The files the stages read (``tables.py``)."""

    documents: Path
    stage1_examples: Path
    stage2_examples: Path | None
    stage3_questions: Path
    stage3_validation: Path | None = None  # held-out training questions (stage3.validation_fraction > 0)


def write_training_data(config: Config, documents: dict[str, str], train_qa, run_dir: Path,
                        titles: dict[str, str | None] | None = None) -> TrainingData:
    """Every stage's examples, once: stage-1 reconstruction and QA examples with
    their BM25 neighbours and rivals, stage-2 QA examples (when enabled) and the
    stage-3 questions (less a validation split when stage3.validation_fraction > 0),
    into <run_dir>/data."""
    data = Path(run_dir) / "data"
    s1 = config.stage1
    stage1 = prepare_stage1_examples(
        documents, train_qa, s1.hard_distractor_fraction, s1.hard_distractor_pool, s1.rival_pool, config.run.seed
    )
    stage2 = prepare_stage2_examples(documents, train_qa, config.stage2.num_documents) if config.stage2.enabled else None
    workers = config.train.num_workers
    _check_fills("stage1", len(stage1), s1.micro_batch_size_per_worker, workers, "stage-1 examples")
    if stage2 is not None:
        _check_fills("stage2", len(stage2), config.stage2.micro_batch_size_per_worker, workers, "training questions")
    questions, validation = write_stage3_questions(QuestionBatch.from_qa(train_qa), config.stage3.validation_fraction,
                                                   config.run.seed, data)
    _check_fills("stage3", read_table(questions).num_rows, config.stage3.micro_batch_size_per_worker, workers,
                 "training questions" + (" (less the validation share)" if validation else ""))
    return TrainingData(
        write_documents(data / DOCUMENTS, documents, titles),
        write_examples(data / "stage1_examples.arrow", stage1),
        None if stage2 is None else write_examples(data / "stage2_examples.arrow", stage2),
        questions,
        validation,
    )


def _check_fills(stage: str, count: int, micro_batch: int, workers: int, what: str) -> None:
    """A step draws micro_batch examples on each worker: fewer examples than one step takes is the data's problem."""
    if count < micro_batch * workers:
        raise DataError(
            f"{stage}: {count} {what} cannot fill one step of {micro_batch} per worker on {workers} workers "
            f"({stage}.micro_batch_size_per_worker x train.num_workers); add training questions or lower those settings"
        )


def steps_for_data(config: Config, data: TrainingData) -> dict[str, tuple[int, str]]:
    """The step count of each stage whose `steps` is given as "<n> epochs", from the
    examples written to `data` (``steps_for_counts``)."""
    files = {"stage1": data.stage1_examples, "stage2": data.stage2_examples, "stage3": data.stage3_questions}
    return steps_for_counts(config, {stage: read_table(path).num_rows for stage, path in files.items() if path is not None})


def write_stage3_questions(questions: QuestionBatch, validation_fraction: float, seed: int,
                           directory: Path) -> tuple[Path, Path | None]:
    """stage3_questions.arrow, and stage3_validation.arrow when a share is held out."""
    validation = None
    if validation_fraction > 0:
        questions, held = split_validation(questions, validation_fraction, seed)
        validation = write_questions(Path(directory) / "stage3_validation.arrow", held)
    return write_questions(Path(directory) / "stage3_questions.arrow", questions), validation


def _fit(loop, loop_config: dict, config: Config, run_dir: Path, stage: str, examples: Path, steps: int,
         micro_batch_size: int, callbacks: list | None = None) -> StageResult:
    """Run `loop` on the workers, its draws of `examples` as the trainer's dataset."""
    run_dir = Path(run_dir).resolve()
    bar = StageBar(run_dir / "ray_train" / stage / PROGRESS_FILE, stage, steps)
    loop_config = {"worker": WorkerSettings.from_config(config), "tensorboard_dir": str(run_dir / "tensorboard"),
                   "progress_path": str(bar.path), "progress_lines": not use_bars(), **loop_config}
    resources = {"CPU": config.train.cpu_threads_per_worker, **config.train.resources_per_worker}
    plan = draw_plan(str(examples), steps, micro_batch_size, config.train.num_workers, config.run.seed)
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        datasets={PLAN: plan},
        dataset_config=data_config(),
        scaling_config=ScalingConfig(
            num_workers=config.train.num_workers, use_gpu=config.train.use_gpu, resources_per_worker=resources,
            placement_strategy=train_placement(config.train.placement_strategy),
        ),
        run_config=RunConfig(
            name=stage,
            storage_path=str(run_dir / "ray_train"),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=config.train.max_failures),
            callbacks=callbacks,
        ),
    )
    with bar:
        result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"{stage} failed") from result.error
    with result.checkpoint.as_directory() as directory:
        model_dir = _publish_model(Path(directory) / MODEL_DIR, run_dir, stage)
        state = read_trainer_state(directory)
    return StageResult(model_dir, state["history"], state["resumed_after"])


def _publish_model(source: Path, run_dir: Path, stage: str) -> Path:
    """`source` copied to <run_dir>/models/<stage>, beside its place first and then renamed:
    the directory appears whole or not at all."""
    model_dir, partial = Path(run_dir) / "models" / stage, Path(run_dir) / "models" / f"{stage}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial)
    if model_dir.exists():
        shutil.rmtree(model_dir)
    partial.rename(model_dir)
    return model_dir


def run_stage1(config: Config, data: TrainingData, init_model_dir: Path, run_dir: Path,
               loop=stage1_loop) -> StageResult:
    """Compressor pretraining on every document (reconstruction) and the training
    QA pairs with their gold documents. `loop` is the per-worker function (a test
    wraps it to kill a worker); rerun with the same `run_dir` after a killed driver
    and Ray Train resumes from the stage's last checkpoint."""
    settings = Stage1Settings.from_config(config)
    loop_config = {"settings": settings, "model_dir": str(init_model_dir),
                   "examples_path": str(data.stage1_examples), "documents_path": str(data.documents)}
    return _fit(loop, loop_config, config, run_dir, "stage1", data.stage1_examples, settings.steps,
                settings.micro_batch_size)


def run_stage2(config: Config, data: TrainingData, stage1_model_dir: Path, run_dir: Path) -> StageResult:
    """Instruction tuning on the training QA pairs with their gold documents among
    BM25-retrieved ones."""
    if data.stage2_examples is None:
        raise ValueError("stage 2 is not enabled in the config the training data was written for")
    settings = Stage2Settings.from_config(config)
    loop_config = {"settings": settings, "model_dir": str(stage1_model_dir),
                   "examples_path": str(data.stage2_examples), "documents_path": str(data.documents)}
    return _fit(stage2_loop, loop_config, config, run_dir, "stage2", data.stage2_examples, settings.steps,
                settings.micro_batch_size)


def run_stage3(config: Config, data: TrainingData, stage1_model_dir: Path, candidates: CandidateSource,
               run_dir: Path, callbacks: list | None = None, refresh: tuple | None = None) -> StageResult:
    """Joint training of query reasoner and generator through the top-k, candidates
    from `candidates` (the index actors in the pipeline). Gold document ids travel
    along only to log training recall. `callbacks`: Ray Train callbacks (a sweep
    passes Tune's). With stage3.compressor=trainable, `refresh` is the run's
    (RefreshScheduler actor, RefreshPlan) (``clara_ray.index.refresh``)."""
    settings = Stage3Settings.from_config(config)
    if settings.trainable_compressor and refresh is None:
        raise ValueError("stage3.compressor=trainable re-encodes the corpus as it trains: run_stage3 needs the "
                         "run's refresh scheduler (clara_ray.index.refresh; the pipeline starts one)")
    loop_config = {"settings": settings, "model_dir": str(stage1_model_dir), "candidates": candidates,
                   "validation_path": None if data.stage3_validation is None else str(data.stage3_validation),
                   "documents_path": str(data.documents), "questions_path": str(data.stage3_questions),
                   "refresh": None if refresh is None else refresh[0],
                   "refresh_plan": None if refresh is None else refresh[1]}
    return _fit(stage3_loop, loop_config, config, run_dir, "stage3", data.stage3_questions, settings.steps,
                settings.micro_batch_size, callbacks)


ATTEMPTS_DIR = "attempts"  # <run_dir>/attempts/stage3/<i>/: one stage-3 attempt's own run directory
ATTEMPT_DONE = "attempt.json"  # in an attempt's directory once it finished: its result
ATTEMPT_SEED_STRIDE = 1000  # attempt i trains with run.seed + i x this


def run_stage3_attempts(config: Config, data: TrainingData, model_dir: Path, candidates: CandidateSource,
                        run_dir: Path, log=print) -> tuple[StageResult, list[dict]]:
    """Stage 3 up to stage3.attempts times, each with its own seed in its own directory
    (<run_dir>/attempts/stage3/<i>/, laid out as a run directory), until one fits its
    questions to stage3.attempt_target_recall (``attempt_fit``) or one fits below
    stage3.takeoff_recall (nothing took off); the best fit is copied to
    <run_dir>/models/stage3. Returns its result and one record per attempt run. A rerun
    skips the attempts that finished and resumes the one that did not from its checkpoint.
    Each record: attempt, seed, fit (its metric), fit_value, model_dir, kept.
    With one attempt this is ``run_stage3`` in <run_dir> itself."""
    settings = config.stage3
    if settings.num_attempts == 1:
        return run_stage3(config, data, model_dir, candidates, run_dir), []
    tried = []
    for attempt in range(settings.num_attempts):
        directory = Path(run_dir) / ATTEMPTS_DIR / "stage3" / str(attempt)
        seed = config.run.seed + ATTEMPT_SEED_STRIDE * attempt
        marker = directory / ATTEMPT_DONE
        if marker.exists():
            record = json.loads(marker.read_text())
        else:
            tree = config.to_dict()
            tree["run"]["seed"] = seed
            result = run_stage3(config_from_dict(tree), data, model_dir, candidates, directory)
            record = {"attempt": attempt, "seed": seed, "model_dir": str(result.model_dir),
                      "history": result.history, "resumed_after": result.resumed_after}
            partial = marker.with_suffix(".partial")
            partial.write_text(json.dumps(record))
            partial.replace(marker)
        record["fit"], record["fit_value"] = attempt_fit(record["history"])
        tried.append(record)
        log(f"[stage3] attempt {attempt + 1} of {settings.num_attempts} (seed {seed}): {record['fit']} "
            f"{record['fit_value']:.3f} over the last two report windows")
        if record["fit_value"] >= settings.attempt_target_recall:
            break
        if record["fit_value"] < settings.takeoff_recall and attempt + 1 < settings.num_attempts:
            log(f"[stage3] no further attempt: this one fits below stage3.takeoff_recall "
                f"({settings.takeoff_recall}), it took off on no kind of question, which another seed "
                f"does not change")
            break
    best = max(tried, key=lambda r: r["fit_value"])  # the first of equals
    log(f"[stage3] keeping attempt {best['attempt'] + 1} ({best['fit']} {best['fit_value']:.3f})")
    chosen = _publish_model(Path(best["model_dir"]), run_dir, "stage3")
    summary = [{**{k: r[k] for k in ("attempt", "seed", "fit", "fit_value", "model_dir")}, "kept": r is best}
               for r in tried]
    return StageResult(chosen, best["history"], best["resumed_after"]), summary

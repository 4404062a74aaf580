"""Ray Tune sweep over stage 3, from the stage-1 (or stage-2) model of a finished run.

    summary = run_sweep(SourceRun.open(Path("runs/demo"), overrides))   # clara-ray sweep --from-run runs/demo

Each trial is a Tune function trainable that runs stage 3 through the same
trainer as the pipeline (``training.stages.run_stage3``: Ray Train + DeepSpeed,
candidates from the run's index served by Ray actors), with Tune's
``TuneReportCallback`` forwarding rank 0's reports. The search space
(``sweep.*``) covers the top-k temperature at the first and last step
(log-uniform), k, L and the learning rate; ASHA stops trials on the validation
mean reciprocal rank of the gold document (it moves before recall@1 does) over
training questions held out by gold document (never the test questions),
measured in every report window; the best trial is the one with the highest
validation recall@1 (MRR breaks ties). Trials run
``max_concurrent_trials`` at a time, from the CPUs (or GPUs) the cluster has
beside the index actors.

Writes <run>/<sweep name>/:
    sweep_config.yaml    the config it ran with: the run's, with --config and overrides applied
    data/                the training / validation split of the run's training questions
    tune/                Ray Tune's experiment storage
    trials/<trial id>/   each trial's Ray Train storage and TensorBoard files
    results.md, results.csv   one row per trial: parameters, best and last validation
                         recall@1, the step it reached, stopped early or not
    temperature.png      final top-k temperature against best validation recall@1
    best.yaml            the run's config with the best trial's stage-3 settings:
                         `clara-ray demo --config <run>/<sweep name>/best.yaml`
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import ray
from ray import tune

from clara_ray.config import LENGTH_KEYS, CompressorMode, Config, ConfigError, config_from_dict, load_config
from clara_ray.index.actor import IndexActorCandidates, index_actor_name, start_index_actor
from clara_ray.index.versions import IndexSettings
from clara_ray.memory_shards import MANIFEST as MEMORY_MANIFEST
from clara_ray.training.examples import QuestionBatch
from clara_ray.training.stages import TrainingData, run_stage3, write_stage3_questions
from clara_ray.training.tables import questions_from_rows, read_table

METRIC = "val_mrr"  # what ASHA stops on (continuous, moves before recall@1; see training/validation.py)
SWEPT = ("temperature", "initial_temperature", "learning_rate", "top_k", "num_candidates")


@dataclass(frozen=True)
class SourceRun:
    """What a sweep takes from a finished run directory."""

    directory: Path
    config: Config  # the run's, with its token lengths as picked from the data
    written_lengths: dict  # model.*_max_len as the run's config.yaml gives them (numbers or "auto")
    model_dir: Path  # the model stage 3 starts from (stage 2's if the run had one)
    memory_dir: Path
    data: TrainingData
    questions: QuestionBatch  # the run's stage-3 training questions

    @classmethod
    def open(cls, directory: Path, overrides: list[str]) -> SourceRun:
        directory = Path(directory).resolve()  # trials run in other working directories
        if not (directory / "config.yaml").exists():
            raise FileNotFoundError(f"{directory} is not a run directory (no config.yaml): pass --from-run runs/<name>")
        config = load_config(directory / "config.yaml", overrides)
        written_lengths = {key: getattr(config.model, key) for key in LENGTH_KEYS}
        steps = directory / "steps"
        stage = next((s for s in ("stage2", "stage1") if (steps / f"{s}.json").exists()), None)
        memory_dir = directory / "memory"
        if stage is None or not (memory_dir / MEMORY_MANIFEST).exists() or not (steps / "training_data.json").exists():
            raise FileNotFoundError(
                f"{directory} has no finished stage 1 with an encoded corpus: run "
                f"`clara-ray demo --config {directory / 'config.yaml'}` at least until it has encoded the corpus"
            )
        if not config.model.lengths_known:  # picked from the data when the run started
            config = config.with_lengths(json.loads((steps / "init.json").read_text())["lengths"])
        model_dir = Path(json.loads((steps / f"{stage}.json").read_text())["model_dir"])
        written = json.loads((steps / "training_data.json").read_text())
        data = TrainingData(**{k: None if v is None else Path(v) for k, v in written.items()})
        questions = questions_from_rows(read_table(data.stage3_questions).to_pylist())
        return cls(directory, config, written_lengths, model_dir, memory_dir, data, questions)


def search_space(config: Config) -> dict:
    s = config.sweep
    return {
        "temperature": tune.loguniform(*s.temperature),
        "initial_temperature": tune.loguniform(*s.initial_temperature),
        "learning_rate": tune.loguniform(*s.learning_rate),
        "top_k": tune.choice(list(s.top_k)),
        "num_candidates": tune.choice(list(s.num_candidates)),
    }


def trial_config(base: Config, params: dict, steps: int, validation_fraction: float) -> Config:
    """`base` with a trial's stage-3 settings; the first temperature is never below the last."""
    tree = base.to_dict()
    stage3 = {**tree["stage3"], **{k: params[k] for k in SWEPT}, "steps": steps,
              "validation_fraction": validation_fraction}
    stage3["initial_temperature"] = max(stage3["initial_temperature"], stage3["temperature"])
    tree["stage3"] = stage3
    return config_from_dict(tree)


def trial_steps(config: Config) -> int:
    """Every step a trial trains: sweep.steps of the real schedule, then its counterfactual world steps."""
    return config.sweep.steps + config.stage3.world_steps(config.sweep.steps)


def _trial(params: dict, base: Config, model_dir: str, data: TrainingData, candidates: IndexActorCandidates,
           trials_dir: str) -> None:
    """A Tune function trainable: stage 3 through the pipeline's trainer; Tune receives
    rank 0's reports (validation recall included) through TuneReportCallback."""
    from ray.tune.integration.ray_train import TuneReportCallback

    config = trial_config(base, params, base.sweep.steps, base.sweep.validation_fraction)
    trial_dir = Path(trials_dir) / tune.get_context().get_trial_id()
    run_stage3(config, data, Path(model_dir), candidates, trial_dir, callbacks=[TuneReportCallback()])


def max_concurrent_trials(config: Config) -> int:
    """sweep.max_concurrent_trials, or the trials that fit beside the index actors:
    whole trials of train.num_workers workers."""
    if config.sweep.max_concurrent_trials is not None:
        return config.sweep.max_concurrent_trials
    available = ray.available_resources()
    if config.train.use_gpu:
        return max(1, int(available.get("GPU", 0) // config.train.num_workers))
    per_trial = config.train.num_workers * config.train.cpu_threads_per_worker
    return max(1, int(available.get("CPU", 0) // per_trial))


def run_sweep(source: SourceRun, name: str = "sweep", log=print) -> dict:
    """The sweep from `source` (``SourceRun.open(run_dir, overrides)``, see module doc) on
    the connected Ray cluster; returns its summary (also in results.md)."""
    config = source.config
    if config.stage3.compressor == CompressorMode.TRAINABLE:
        raise ConfigError("sweeps train stage 3 with a frozen compressor over the run's own index "
                          "(stage3.compressor=trainable would re-encode the corpus in every trial): "
                          "pass stage3.compressor=frozen")
    out = source.directory / name
    if (out / "results.csv").exists():
        raise FileExistsError(f"{out} holds a finished sweep; pass another --name or remove it")
    shutil.rmtree(out, ignore_errors=True)  # an interrupted one starts again
    out.mkdir(parents=True)
    # The whole config the sweep ran with (the run's, with --config and the overrides on it).
    (out / "sweep_config.yaml").write_text(f"# `clara-ray sweep --from-run {source.directory}`, as it ran.\n"
                                           + config.to_yaml())
    questions, validation = write_stage3_questions(source.questions, config.sweep.validation_fraction,
                                                   config.sweep.seed, out / "data")
    data = dataclasses.replace(source.data, stage3_questions=questions, stage3_validation=validation)
    log(f"[sweep] {len(source.questions)} training questions: {len(read_table(validation))} held out for validation; "
        f"stage 3 from {source.model_dir}")

    # The run's own index version over the same memory (built by its pipeline) is reused.
    index = start_index_actor(str(source.memory_dir), index_actor_name(out), settings=IndexSettings.from_config(config.index))
    concurrent = max_concurrent_trials(config)
    scheduler = tune.schedulers.ASHAScheduler(
        time_attr="step", max_t=trial_steps(config), grace_period=config.sweep.grace_steps,
        reduction_factor=config.sweep.reduction_factor,
    )
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=config, model_dir=str(source.model_dir), data=data,
                             candidates=IndexActorCandidates(index), trials_dir=str((out / "trials").resolve())),
        # The trial process only drives Ray Train (its workers hold the resources);
        # Tune needs a non-empty request.
        {"cpu": 0.01},
    )
    tuner = tune.Tuner(
        trainable,
        param_space=search_space(config),
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="max", scheduler=scheduler, num_samples=config.sweep.num_trials,
            # On the generator itself: Tune ignores TuneConfig.max_concurrent_trials for a
            # search generator passed in (it logs a warning and starts every trial).
            search_alg=tune.search.BasicVariantGenerator(random_state=config.sweep.seed, max_concurrent=concurrent),
        ),
        run_config=tune.RunConfig(name="tune", storage_path=str((out / "tune").resolve()), verbose=1),
    )
    log(f"[sweep] {config.sweep.num_trials} trials, {concurrent} at a time, up to {trial_steps(config)} steps each")
    results = tuner.fit()
    ray.kill(index)
    rows = _rows(results, config)
    best = rows[0]
    best_config = trial_config(config, best, config.sweep.steps, 0.0)
    tree = best_config.to_dict()
    tree["run"]["name"] = f"{config.run.name}-{name}-best"
    tree["model"].update(source.written_lengths)  # "auto" stays auto: the demo picks the same from the same data
    best_path = out / "best.yaml"
    best_path.write_text(
        f"# Best of {len(rows)} trials of `clara-ray sweep --from-run {source.directory}` (validation recall@1 "
        f"{best['best_val_recall_at_1']:.3f}).\n# Run it: clara-ray demo --config {best_path}\n"
        + config_from_dict(tree).to_yaml()
    )
    load_config(best_path)  # what the demo will read
    _write_tables(rows, out, source.directory, config)
    _plot(rows, out / "temperature.png")
    summary = {"sweep_dir": str(out), "trials": len(rows), "stopped_early": sum(r["stopped_early"] for r in rows),
               "best": {k: best[k] for k in (*SWEPT, "best_val_recall_at_1", "best_val_mrr")},
               "worst_best_val_recall_at_1": rows[-1]["best_val_recall_at_1"], "best_config": str(best_path)}
    log(f"[sweep] results: {out / 'results.md'}; best config: {best_path}")
    return summary


def _rows(results, config: Config) -> list[dict]:
    rows, failed = [], []
    for result in results:
        frame = result.metrics_dataframe
        if frame is None or METRIC not in frame:
            failed.append(f"{tune_trial_id(result.path)}: {result.error!r}"[:2000])
            continue
        last_step = int(frame["step"].max())
        rows.append({
            "trial": tune_trial_id(result.path), **{k: result.config[k] for k in SWEPT},
            "best_val_recall_at_1": float(frame["val_recall_at_1"].max()), "best_val_mrr": float(frame[METRIC].max()),
            "last_val_recall_at_1": float(frame["val_recall_at_1"].iloc[-1]),
            "last_val_recall_at_5": float(frame["val_recall_at_5"].iloc[-1]), "last_step": last_step,
            "stopped_early": last_step < trial_steps(config) and result.error is None,
            "error": "" if result.error is None else type(result.error).__name__,
        })
    if not rows:
        raise RuntimeError("no trial reported a validation metric:\n" + "\n".join(failed))
    for line in failed:
        print(f"[sweep] trial failed before its first report: {line}")
    return sorted(rows, key=lambda r: (-r["best_val_recall_at_1"], -r["best_val_mrr"]))


def tune_trial_id(path: str) -> str:
    """`_trial_<experiment>_<index>_...` -> `<experiment>_<index>` (the trial's id)."""
    parts = Path(path).name.split("_")
    return "_".join(parts[2:4]) if len(parts) > 3 else Path(path).name


def _write_tables(rows: list[dict], out: Path, run_dir: Path, config: Config) -> None:
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    s = config.sweep
    lines = [
        f"# Stage-3 sweep from {run_dir}",
        "",
        f"{len(rows)} trials (Ray Tune, random search, seed {s.seed}), ASHA on the validation MRR "
        f"(grace {s.grace_steps} steps, reduction factor {s.reduction_factor}, at most {trial_steps(config)} steps); "
        f"validation: {s.validation_fraction:.0%} of the training questions, held out by gold document.",
        "",
        "| trial | τ first | τ last | k | L | learning rate | best val R@1 | best val MRR | last val R@1 | last val R@5 | steps | stopped early |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['trial']} | {max(r['initial_temperature'], r['temperature']):.4f} | {r['temperature']:.4f} | "
            f"{r['top_k']} | {r['num_candidates']} | {r['learning_rate']:.2e} | {r['best_val_recall_at_1']:.3f} | "
            f"{r['best_val_mrr']:.3f} | "
            f"{r['last_val_recall_at_1']:.3f} | {r['last_val_recall_at_5']:.3f} | {r['last_step']} | "
            f"{'yes (ASHA)' if r['stopped_early'] else ('error: ' + r['error'] if r['error'] else 'no')} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    def first_temperature(row: dict) -> float:
        return math.log10(max(row["initial_temperature"], row["temperature"]))

    # One colour scale for both markers (each scatter call would otherwise scale its own).
    low, high = min(map(first_temperature, rows)), max(map(first_temperature, rows))
    fig, ax = plt.subplots(figsize=(6, 4))
    for stopped, marker, label in ((False, "o", "ran to the end"), (True, "x", "stopped by ASHA")):
        chosen = [r for r in rows if r["stopped_early"] == stopped]
        if chosen:
            points = ax.scatter([r["temperature"] for r in chosen], [r["best_val_recall_at_1"] for r in chosen],
                                c=[first_temperature(r) for r in chosen], vmin=low, vmax=high,
                                cmap="viridis", marker=marker, label=label)
    ax.set_xscale("log")
    # Labels at 1, 2 and 5 of each decade, as plain numbers (matplotlib's minor labels overlap).
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("top-k temperature at the last step (τ)")
    ax.set_ylabel("best validation recall@1")
    fig.colorbar(points, ax=ax, label="log10 τ at the first step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


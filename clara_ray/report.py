"""The run report: a Markdown table, a PNG of loss and recall over steps, metrics.json."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from clara_ray.data.lengths import LengthReport


def plot_training(stage1_history: list[dict], stage3_history: list[dict], path: Path) -> Path:
    refreshed = bool(stage3_history) and "index_staleness" in stage3_history[-1]  # a trainable compressor's run
    figure, axes = plt.subplots(1, 3 if refreshed else 2, figsize=(16 if refreshed else 11, 4))
    left, right = axes[0], axes[1]
    if stage1_history:
        left.plot([h["step"] for h in stage1_history], [h["loss"] for h in stage1_history], label="stage 1 loss")
    if stage3_history:
        offset = stage1_history[-1]["step"] if stage1_history else 0
        steps = [offset + h["step"] for h in stage3_history]
        left.plot(steps, [h["loss"] for h in stage3_history], label="stage 3 loss")
        if "train_recall_at_1" in stage3_history[-1]:  # only when training questions name gold documents
            right.plot([h["step"] for h in stage3_history], [h["train_recall_at_1"] for h in stage3_history],
                       label="recall@1 (training batches)")
            right.plot([h["step"] for h in stage3_history], [h["gold_in_candidates"] for h in stage3_history],
                       label="gold among L candidates")
    if refreshed:
        steps = [h["step"] for h in stage3_history]
        axes[2].plot(steps, [h["index_staleness"] for h in stage3_history], "o-", label="staleness at the window's end")
        axes[2].plot(steps, [h["index_version_step"] for h in stage3_history], "s--", label="live version's step")
        axes[2].set(xlabel="stage-3 step", ylabel="steps", title="index refreshes (trainable compressor)")
    left.set(xlabel="step (stage 3 continues after stage 1)", ylabel="loss", yscale="log", title="training loss")
    right.set(xlabel="stage-3 step", ylabel="fraction of questions", ylim=(0, 1.02), title="retrieval during stage 3")
    for axis in axes:
        axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _refresh_lines(refresh: dict | None) -> list[str]:
    """The index refreshes of a trainable compressor, one row each."""
    if not refresh:
        return []
    lines = ["## Index refreshes (trainable compressor)", "",
             f"{refresh['swapped']} swapped in, {len(refresh['skipped'])} skipped while one was running "
             f"(steps {refresh['skipped'] or 'none'}), {refresh['failed']} failed. Staleness over steps: the plot below.",
             "", "| step | outcome | encode s | build s | swap s | top-L overlap | error |", "|---|---|---|---|---|---|---|"]
    for e in refresh["events"]:
        overlap = "" if e["top_l_overlap"] is None else f"{e['top_l_overlap']:.2f}"
        lines.append(f"| {e['step']} | {e['outcome']} | {e['encode_seconds']:.1f} | {e['build_seconds']:.1f} | "
                     f"{e['swap_seconds']:.1f} | {overlap} | {e['error'] or ''} |")
    return lines + [""]


def _attempt_lines(attempts: list[dict], max_attempts: int, takeoff_recall: float) -> list[str]:
    """Stage 3's attempts (stage3.attempts > 1), the kept one in bold."""
    if not attempts:
        return []
    (kept,) = [a for a in attempts if a["kept"]]
    stopped = ""
    if len(attempts) < max_attempts and attempts[-1]["fit_value"] < takeoff_recall:
        stopped = (f" The last fit is below stage3.takeoff_recall ({takeoff_recall}): it took off on no kind of "
                   "question, so no further attempt ran and its world steps were skipped.")
    lines = ["## Stage-3 attempts", "",
             (f"Stage 3 ran {'once' if len(attempts) == 1 else f'{len(attempts)} times, each with its own seed'} "
              f"(up to {max_attempts}); attempt {kept['attempt'] + 1} is kept: the best fit over the last two report "
              f"windows (the plot shows its curves).{stopped}"), "",
             "| attempt | seed | fit | value |", "|---|---|---|---|"]
    for a in attempts:
        value = f"**{a['fit_value']:.3f}**" if a is kept else f"{a['fit_value']:.3f}"
        lines.append(f"| {a['attempt'] + 1} | {a['seed']} | {a['fit']} | {value} |")
    return lines + [""]


def _gold_reading_lines(gold: dict | None) -> list[str]:
    """The generator given each test question's gold document, before and after stage 3."""
    found = {when: g for when, g in (gold or {}).items() if g}
    if not found:
        return []
    figures = "; ".join(f"{when} **EM {g['em']:.3f}**, F1 {g['f1']:.3f}" for when, g in found.items())
    questions = next(iter(found.values()))["questions"]
    return [(f"The generator given each test question's gold document ({questions} questions): {figures}. "
             "That is the answers' ceiling: where the rows above fall short of it, retrieval missed; where "
             "it is low itself, the generator does not read its memory (stage 1)."), ""]


def write_report(run_dir: Path, summary: dict, stage1_history: list[dict], stage3_history: list[dict]) -> Path:
    """report.md + training.png + metrics.json in `run_dir`."""
    run_dir = Path(run_dir)
    plot_training(stage1_history, stage3_history, run_dir / "training.png")
    (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    lines = [
        f"# clara_ray run `{summary['run']}`",
        "",
        (f"Test split: {summary['data']['num_test_questions']} questions "
        f"({summary['data']['corpus']}). Gold documents are used only to score."),
        "",
        "| retriever | Recall@1 | Recall@5 | answer EM | answer F1 |",
        "|---|---|---|---|---|",
    ]
    for name, scores in summary["results"].items():
        lines.append(
            f"| {name} | {scores['recall@1']:.3f} | {scores['recall@5']:.3f} | {scores['em']:.3f} | {scores['f1']:.3f} |"
        )
    data = summary["data"]
    lines += [
        "",
        ("Answers are generated by the generator from the memory vectors of each retriever's "
        f"top-{summary['top_k']} documents (the stage-1 generator for the query reasoner before "
        "stage 3, the final generator otherwise)."),
        "",
        *_gold_reading_lines(summary.get("gold_reading")),
        "## Data accounting",
        "",
        "| file | rows in | used | quarantined |",
        "|---|---|---|---|",
    ]
    for name, counts in data["files"].items():
        lines.append(f"| {name} | {counts['input']} | {counts['used']} | {counts['quarantined']} |")
    lines += [
        "",
        (f"Encoded documents: {data['num_encoded']}, of which **{data['num_truncated']} "
        f"({data['num_truncated'] / max(1, data['num_encoded']):.1%}) were truncated** at {summary['doc_max_len']} tokens."),
        "",
        *_refresh_lines(summary.get("refresh")),
        *_attempt_lines(summary.get("stage3_attempts"), summary.get("stage3_max_attempts", 1),
                        summary.get("stage3_takeoff_recall", 0.0)),
        "## Token lengths",
        "",
        *[f"- {line}" for line in LengthReport.from_dict(summary["lengths"]).lines()],
        "",
        "## Timing",
        "",
        "| phase | seconds |",
        "|---|---|",
        *[f"| {phase} | {seconds:.1f} |" for phase, seconds in summary["seconds"].items()],
        "",
        "![loss and recall over steps](training.png)",
        "",
    ]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path

"""Does a recipe carry? Whole `clara-ray demo` runs over trap-corpus families and seeds.

    python benchmarks/carry.py benchmarks/carry.yaml --out runs/carry                 # tuning families
    python benchmarks/carry.py benchmarks/carry.yaml --out runs/carry --held-out      # + the held-out ones
    python benchmarks/carry.py benchmarks/carry.yaml --out runs/carry --summary       # table of what ran

The grid file (YAML) names a recipe (`config` plus `overrides`, applied to every run) and
groups of runs, each run a list of overrides on top of the recipe:

    config: jobs/configs/tiny.yaml
    overrides: []
    groups:
      bundled, corpus seeds: [[data.trap.seed=0], [data.trap.seed=1], [data.trap.seed=2]]
      held_out_a: {held_out: true, runs: [[data.trap.family=held_out_a, data.trap.seed=0], ...]}

Each run is a whole demo (a fresh Ray, stage 1 to the report) in `<out>/<run name>`;
a finished run (its metrics.json) is not run again, an interrupted one resumes
from its finished steps (the pipeline's own). Groups marked `held_out` run only with
`--held-out`: those families are for the final measurement of a recipe, never for
choosing one (BENCHMARKS.md, "Trap families"). The summary is one row per run and
one per group (median and range of test Recall@1 after stage 3, EM, and the
baselines' best Recall@1), printed and written to `<out>/summary.md`.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
AFTER, BEFORE = "query reasoner after stage 3", "query reasoner before stage 3"


def run_name(overrides: list[str]) -> str:
    """`data.trap.family=held_out_a data.trap.seed=1` -> `held_out_a_trap.seed1` (stable, file-safe)."""
    parts = []
    for item in overrides:
        key, _, value = item.partition("=")
        key = key.removeprefix("data.")
        parts.append(value if key == "trap.family" else f"{key}{value}")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(parts)) or "default"


def load_grid(path: Path) -> tuple[Path, list[str], dict[str, dict]]:
    grid = yaml.safe_load(path.read_text())
    groups = {}
    for name, group in grid["groups"].items():
        group = group if isinstance(group, dict) else {"runs": group}
        groups[name] = {"held_out": bool(group.get("held_out", False)), "runs": [list(r) for r in group["runs"]]}
    return ROOT / grid.get("config", "jobs/configs/tiny.yaml"), list(grid.get("overrides", [])), groups


def run_demo(config: Path, overrides: list[str], out: Path, name: str) -> None:
    if (out / name / "metrics.json").exists():
        print(f"[carry] {name}: finished earlier", flush=True)
        return
    command = [sys.executable, "-m", "clara_ray.cli", "demo", "--config", str(config), *overrides,
               f"run.output_dir={out}", f"run.name={name}"]
    print(f"[carry] {name}: {' '.join(command[3:])}", flush=True)
    started = time.time()
    with open(out / f"{name}.log", "a") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    status = "done" if code == 0 else f"FAILED (exit {code}, see {out / name}.log)"
    print(f"[carry] {name}: {status} in {(time.time() - started) / 60:.1f} min", flush=True)


def row(out: Path, name: str) -> dict | None:
    path = out / name / "metrics.json"
    if not path.exists():
        return None
    results = json.loads(path.read_text())["results"]
    baselines = [v["recall@1"] for k, v in results.items() if not k.startswith("query reasoner")]
    return {"run": name, "before": results[BEFORE]["recall@1"], "recall@1": results[AFTER]["recall@1"],
            "em": results[AFTER]["em"], "baselines": max(baselines, default=float("nan"))}


def summary(out: Path, groups: dict[str, dict], recipe: list[str]) -> str:
    lines = [f"Recipe overrides: `{' '.join(recipe) or '(none: the config as it is)'}`", "",
             "| group | run | R@1 before stage 3 | R@1 after | EM | best baseline R@1 |", "|---|---|---|---|---|---|"]
    totals = []
    for group, spec in groups.items():
        rows = [r for r in (row(out, run_name(o)) for o in spec["runs"]) if r is not None]
        for r in rows:
            lines.append(f"| {group} | {r['run']} | {r['before']:.3f} | {r['recall@1']:.3f} | {r['em']:.3f} "
                         f"| {r['baselines']:.3f} |")
        if rows:
            recalls = [r["recall@1"] for r in rows]
            totals.append(f"| **{group}** | {len(rows)} of {len(spec['runs'])} runs | | median "
                          f"{statistics.median(recalls):.3f} (range {min(recalls):.3f}-{max(recalls):.3f}) | median "
                          f"{statistics.median(r['em'] for r in rows):.3f} | max {max(r['baselines'] for r in rows):.3f} |")
    return "\n".join(lines + totals) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="run directories and summary.md go here")
    parser.add_argument("--held-out", action="store_true", help="also run the groups marked held_out")
    parser.add_argument("--summary", action="store_true", help="only print the table of finished runs")
    parser.add_argument("--only", help="run only this group")
    args = parser.parse_args()
    config, recipe, groups = load_grid(args.grid)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    chosen = {g: s for g, s in groups.items() if (args.held_out or not s["held_out"]) and args.only in (None, g)}
    if args.only and not chosen:
        sys.exit(f"error: no group {args.only!r} to run (held-out groups need --held-out)")
    if not args.summary:
        for spec in chosen.values():
            for overrides in spec["runs"]:
                run_demo(config, recipe + overrides, args.out, run_name(overrides))
    table = summary(args.out, chosen, recipe)
    (args.out / "summary.md").write_text(table)
    print(table, end="")


if __name__ == "__main__":
    main()

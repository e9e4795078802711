"""Search cost of `mttl sweep`: Optuna TPE + ASHA against the preset grid of the same tune space.

Both searches run through `mttl.sweep.run_sweep` (what `mttl sweep` runs) on the same held-out
synthetic task(s), seeds and step budget, one trial at a time (so the order of trials is exact and
TPE has seen every finished trial before suggesting the next). Cost is counted in trial-steps:
the optimizer steps each trial actually ran (ASHA stops some early), summed in the order the
trials ran. The grid's best score is the best seed mean of best validation scores among its
trials (mttl's scores run 0–100); the search "reaches" it at the end of the first trial whose
final seed mean is within 1 point of it, and its cost is every trial-step run until then. Target:
at most 0.4 of the grid's total trial-steps.

Without `-k checkpoint=PATH` a checkpoint is pre-trained first with the embedded default of
`mttl pretrain` (shortened with --quick). Any other `-k key=value` applies to both searches.

    python benchmarks/sweep.py --quick        # ~ 10-15 minutes on 2 shared CPU cores, half of it pre-training
    python benchmarks/sweep.py -k checkpoint=output/synthetic_poly
Writes benchmarks/out/sweep.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from _env import OUT  # first: the repo on sys.path, the Ray/DeepSpeed environment

from mttl.cli import add_config_arguments, flat_kwargs  # noqa: E402
from mttl.config import Config, load_config  # noqa: E402
from mttl.run_folder import atomic_write_text  # noqa: E402
from mttl.sweep import OBJECTIVE, TIME_ATTR, TRIAL_STEPS, trial_overrides  # noqa: E402

WITHIN = 1.0  # "within 1 point": mttl scores run 0–100
TARGET_RATIO = 0.4
# Poly adapters + routing (the default checkpoint's finetune type): the reference grid is
# learning_rate {1e-3, 1e-4} × module_logits_learning_rate {0.5, 0.1}, the largest preset grid.
# All 200 training rows of the task as shots, validated every epoch (25 steps): with the default
# 32 shots every grid point of the default checkpoint scores 0, and then any trial "reaches" the
# grid's best. Greedy decoding for validation, in both searches alike.
SWEEP_DEFAULTS = {"tune_space": "poly", "tasks": ["reverse>upper"], "seeds": [13], "num_shots": 200,
                  "eval_every_epochs": 1, "num_beams": 1, "max_concurrent_trials": 1, "trial_resources": {"CPU": 1},
                  "study_per_task": False, "tensorboard": False}
QUICK = {"total_steps": 150, "num_samples": 6}
FULL = {"total_steps": 400, "num_samples": 10, "seeds": [13, 42]}
PRETRAIN_QUICK_STEPS = 200  # phase two of the default (phase one runs twice that)


def pretrained_checkpoint(root: Path, quick: bool) -> Path:
    """The embedded default of `mttl pretrain` (two phases on the synthetic suite) under `root`."""
    from mttl.train.recipe import DEFAULTS, pretrain_default

    changes = {"output_dir": str(root / "runs"), "cache_dir": str(root / "cache"), "run_name": "bench_poly",
               "tensorboard": False}
    if quick:
        changes.update(total_steps=PRETRAIN_QUICK_STEPS, eval_every=None, save_every=None)
    return pretrain_default(load_config(None, changes, base=DEFAULTS))


def search_rows(study_dir: Path) -> list[dict]:
    """One entry per trial, in the order the trials started: its reports (Tune's result rows)."""
    trials = []
    for result in study_dir.glob("*/result.json"):
        reports = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if reports:
            params = json.loads((result.parent / "params.json").read_text())
            trials.append({"trial_id": reports[0]["trial_id"], "params": trial_overrides(params),
                           "started": reports[0]["timestamp"] - reports[0]["time_total_s"],
                           "ended": reports[-1]["timestamp"], "reports": reports})
    trials.sort(key=lambda t: (t["started"], t["trial_id"]))
    return [{"trial_id": t["trial_id"], "params": t["params"], "ended": t["ended"],
             "trial_steps": t["reports"][-1][TRIAL_STEPS], "validations": t["reports"][-1][TIME_ATTR],
             "complete": bool(t["reports"][-1].get("complete")),
             "score": t["reports"][-1][OBJECTIVE] if t["reports"][-1].get("complete") else None}
            for t in trials]


def steps_to_reach(trials: list[dict], target: float) -> int | None:
    """Trial-steps run up to the end of the first complete trial scoring at least `target`."""
    spent = 0
    for trial in trials:
        spent += trial["trial_steps"]
        if trial["complete"] and trial["score"] >= target:
            return spent
    return None


def run_search(cfg: Config, root: Path, search: str) -> dict:
    from mttl.sweep import run_sweep

    run_cfg = cfg.copy(search=search, output_dir=str(root / "sweeps"), run_name=search)
    started = time.perf_counter()
    sweep_dir, _ = run_sweep(run_cfg)
    wall = time.perf_counter() - started
    return {"trials": search_rows(sweep_dir / "all_tasks"), "wall_s": wall}


def describe(params: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(params.items()))


def markdown(report: dict) -> str:
    grid, tpe = report["grid"], report["optuna"]
    ratio = report["ratio"]
    lines = [f"# Sweep cost: Optuna TPE + ASHA vs the preset grid (`{report['tune_space']}`)", "",
             f"Tasks {report['tasks']}, seeds {report['seeds']}, {report['total_steps']} steps per seed, "
             f"{report['num_shots']} shots; checkpoint: {report['checkpoint']}; {report['machine']}.",
             f"Score: seed mean of the best validation {report['metric']} (0–100); "
             f"\"within 1 point\" = at least the grid's best − {WITHIN:g}.", "",
             "| search | trials | stopped by ASHA | total trial-steps | best score | trial-steps to within 1 point "
             "of the grid's best | ÷ grid total | wall s |", "|---|---|---|---|---|---|---|---|"]
    for name, run in (("grid (preset)", grid), ("Optuna TPE + ASHA", tpe)):
        reached = run["steps_to_target"]
        spent, share = ("not reached", "–") if reached is None else (reached, f"{reached / grid['total_steps']:.2f}")
        lines.append(f"| {name} | {len(run['trials'])} | {sum(not t['complete'] for t in run['trials'])} | "
                     f"{run['total_steps']} | {run['best_score']:.3f} | {spent} | {share} | {run['wall_s']:.0f} |")
    verdict = ("not reached" if ratio is None else
               f"{ratio:.2f} ({'meets' if ratio <= TARGET_RATIO else 'misses'} the ≤ {TARGET_RATIO} target)")
    grid_scores = [t["score"] for t in grid["trials"] if t["complete"]]
    lines += ["", f"TPE + ASHA trial-steps ÷ grid trial-steps: {verdict}. "
              f"Grid scores range {min(grid_scores, default=float('nan')):.1f}"
              f"–{max(grid_scores, default=float('nan')):.1f}."]
    if report["degenerate"]:
        lines.append("Every grid trial scored within 1 point of 0: any trial reaches the grid's best, so this "
                     "ratio says nothing about the search (the checkpoint cannot solve the held-out task yet).")
    for name, run in (("Grid", grid), ("Optuna TPE + ASHA", tpe)):
        lines += ["", f"{name} trials in the order they ran:", "",
                  "| # | trial | hyper-parameters | validations | trial-steps | status | score |",
                  "|---|---|---|---|---|---|---|"]
        for i, t in enumerate(run["trials"], 1):
            score = f"{t['score']:.3f}" if t["score"] is not None else "–"
            lines.append(f"| {i} | {t['trial_id']} | {describe(t['params'])} | {t['validations']} "
                         f"| {t['trial_steps']} | {'complete' if t['complete'] else 'stopped'} | {score} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"a shorter pre-training and {QUICK['total_steps']} steps per trial, "
                             f"{QUICK['num_samples']} TPE trials, one seed")
    parser.add_argument("--out", type=Path, default=OUT, help=f"folder for sweep.json and sweep.md (default {OUT})")
    add_config_arguments(parser)
    args = parser.parse_args()
    cfg = load_config(args.config_files, flat_kwargs(args), base={**SWEEP_DEFAULTS, **(QUICK if args.quick else FULL)})
    from mttl.sweep import load_space

    grid_size = len(load_space(cfg.tune_space).GRID)
    with tempfile.TemporaryDirectory(prefix="mttl-bench-sweep-") as tmp:
        tmp = Path(tmp)
        if cfg.checkpoint:
            checkpoint = f"given: {cfg.checkpoint}"
        else:
            from mttl.train.recipe import BACKBONE_STEP_FACTOR, DEFAULTS

            started = time.perf_counter()
            cfg.checkpoint = str(pretrained_checkpoint(tmp, args.quick))
            steps = PRETRAIN_QUICK_STEPS if args.quick else DEFAULTS["total_steps"]
            checkpoint = (f"built here by the default `mttl pretrain`, {BACKBONE_STEP_FACTOR * steps} + {steps} "
                          f"steps ({time.perf_counter() - started:.0f} s)")
        runs = {search: run_search(cfg, tmp, search) for search in ("grid", "optuna")}
    for run in runs.values():
        run["total_steps"] = sum(t["trial_steps"] for t in run["trials"])
        run["best_score"] = max((t["score"] for t in run["trials"] if t["complete"]), default=float("nan"))
    grid_best = runs["grid"]["best_score"]
    for run in runs.values():
        run["steps_to_target"] = steps_to_reach(run["trials"], grid_best - WITHIN)
    reached = runs["optuna"]["steps_to_target"]
    report = {"tune_space": cfg.tune_space, "grid_points": grid_size, "tasks": cfg.tasks, "seeds": cfg.seeds,
              "total_steps": cfg.total_steps, "num_shots": cfg.num_shots,
              "num_samples": cfg.num_samples, "metric": "exact match", "checkpoint": checkpoint,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU, one trial at a time, 1 CPU each",
              "within": WITHIN, "target_ratio": TARGET_RATIO,
              "ratio": None if reached is None else reached / runs["grid"]["total_steps"],
              "degenerate": grid_best <= WITHIN, "command": " ".join(["python", "benchmarks/sweep.py", *sys.argv[1:]]),
              **runs}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "sweep.json", json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    atomic_write_text(args.out / "sweep.md", f"`{report['command']}`\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()

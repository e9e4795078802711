"""Search cost of `mttl sweep`: Optuna TPE + ASHA against the preset grid of the same tune space.

Both searches run through `mttl.sweep.run_sweep` (what `mttl sweep` runs) on the same held-out
synthetic task(s), seeds and step budget, one trial at a time (so the order of trials is exact and
TPE has seen every finished trial before suggesting the next). Cost is counted in trial-steps:
the optimizer steps each trial actually ran (ASHA stops some early), summed in the order the
trials ran, after every step of the start race that orders the grid's points (a raced point's trial
continues from its lap, `start_race_continue`, so only its steps after the lap count again). The grid's best
score is the best seed mean of best validation scores among its trials (mttl's scores run 0–100); the search "reaches" it at the end of the first trial whose
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
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _env import OUT  # first: the repo on sys.path, the Ray/DeepSpeed environment

from mttl.cli import add_config_arguments, flat_kwargs  # noqa: E402
from mttl.config import Config, load_config  # noqa: E402
from mttl.run_folder import atomic_write_text, safe_name  # noqa: E402
from mttl.sweep import OBJECTIVE, RACE_ORDER, RACE_STEPS, TIME_ATTR, TRIAL_STEPS, VAL_LOSS, trial_overrides  # noqa: E402

WITHIN = 1.0  # "within 1 point": mttl scores run 0–100
TARGET_RATIO = 0.4
# The quick start's few-shot setting (mttl.quickstart.FINETUNE: 32 shots, batch 8 = 4 steps an
# epoch, 100 steps) validated every 2 epochs (8 steps) so ASHA has rungs to decide at; greedy
# decoding for validation in both searches alike. The space is the checkpoint's default (MHR →
# `mhr`, whose preset grid is the reference's lr {1e-3, 1e-4} × routing lr {0.5, 0.1}).
SWEEP_DEFAULTS = {"num_shots": 32, "train_batch_size": 8, "total_steps": 100, "eval_every_epochs": 2,
                  "num_beams": 1, "predict_batch_size": 200, "num_samples": 12, "max_concurrent_trials": 1,
                  "trial_resources": {"CPU": 1}, "study_per_task": False, "tensorboard": False}
QUICK = {"total_steps": 48, "num_samples": 4}
TASKS = ["caesar>upper", "double>swapfirst", "reverse>upper", "rotate>reverse"]
SEEDS = [13, 42]
PRETRAIN_QUICK_STEPS = 200  # phase two of the default (phase one runs twice that)


def pretrained_checkpoint(root: Path, quick: bool) -> Path:
    """The embedded default of `mttl pretrain` (two phases on the synthetic suite) under `root`."""
    from mttl.train.recipe import DEFAULTS, pretrain_default

    changes = {"output_dir": str(root / "runs"), "cache_dir": str(root / "cache"), "run_name": "bench_mhr",
               "tensorboard": False}
    if quick:
        changes.update(total_steps=PRETRAIN_QUICK_STEPS, eval_every=None, save_every=None)
    return pretrain_default(load_config(None, changes, base=DEFAULTS))


def data_for(cfg: Config, root: Path) -> None:
    """A synthetic checkpoint whose data folder is gone (a run moved from another machine) gets the
    suite prepared again from its seed, which reproduces it row for row."""
    from mttl.data.synthetic import prepare_synthetic
    from mttl.models.run import resolve_run_dir

    saved = Config.load(resolve_run_dir(cfg.checkpoint_path()) / "config.json")
    if cfg.data_dir or saved.dataset != "synthetic" or (saved.data_dir and Path(saved.data_dir).exists()):
        return
    out = root / f"synthetic-seed{saved.seed}"
    prepare_synthetic(out, seed=saved.seed)
    cfg.update({"data_dir": str(out)}, source="benchmark")


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
             # a trial that continued its start race lap ran only the steps after it (the race's are counted
             # there); one stopped while its lap's validations were reported again ran none
             "trial_steps": max(t["reports"][-1][TRIAL_STEPS] - t["reports"][-1].get(RACE_STEPS, 0), 0),
             "validations": t["reports"][-1][TIME_ATTR],
             "complete": bool(t["reports"][-1].get("complete")),
             # (validations, validation loss, score) at each report, running best as ASHA sees them: what a
             # start-race rule would have seen at its lap (`--grid-only` then compares rules on them)
             "curve": [[r.get(TIME_ATTR), r.get(VAL_LOSS), r.get(OBJECTIVE)] for r in t["reports"]],
             "score": t["reports"][-1][OBJECTIVE] if t["reports"][-1].get("complete") else None}
            for t in trials]


def race_laps(study_dir: Path) -> list[dict]:
    """The start race's laps (`mttl.sweep.race_start_points`), best first, with the steps each ran."""
    order = study_dir / RACE_ORDER
    if not order.exists():
        return []
    ranked = json.loads(order.read_text())["ranked"]
    # a lap's trial_steps are every step its point ran in the race (its earlier phases' included)
    return [{"params": lap["point"], "trial_steps": lap[TRIAL_STEPS], "validations": lap.get("validations"),
             "loss": lap.get(VAL_LOSS), "score": lap.get(OBJECTIVE)} for lap in ranked]


def steps_to_reach(trials: list[dict], target: float, eligible=lambda trial: True, spent: int = 0) -> int | None:
    """Trial-steps run (from `spent`: the start race's, which runs first) up to the end of the first
    complete (eligible) trial scoring at least `target`."""
    for trial in trials:
        spent += trial["trial_steps"]
        if trial["complete"] and trial["score"] >= target and eligible(trial):
            return spent
    return None


def run_search(cfg: Config, root: Path, search: str) -> dict:
    from mttl.sweep import run_sweep

    run_cfg = cfg.copy(search=search, output_dir=str(root), run_name=search)
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # run_sweep prints its summary table; ours is below
        sweep_dir, _ = run_sweep(run_cfg)
    wall = time.perf_counter() - started
    trials = search_rows(sweep_dir / "all_tasks")
    race = race_laps(sweep_dir / "all_tasks")
    race_steps = sum(lap["trial_steps"] for lap in race)
    return {"trials": trials, "race": race, "race_steps": race_steps, "wall_s": wall,
            "total_steps": race_steps + sum(t["trial_steps"] for t in trials),
            "best_score": max((t["score"] for t in trials if t["complete"]), default=float("nan"))}


def compare(cfg: Config, root: Path, task: str, seed: int, start_points: list[dict]) -> dict:
    """Grid and TPE + ASHA on one held-out task with one seed (few-shot split, training and TPE's sampler)."""
    pair = cfg.copy(tasks=[task], seeds=[seed], seed=seed)
    runs = {search: run_search(pair, root / f"{safe_name(task)}-{seed}", search) for search in ("grid", "optuna")}
    grid, tpe = runs["grid"], runs["optuna"]
    target = grid["best_score"] - WITHIN
    reached = steps_to_reach(tpe["trials"], target, spent=tpe["race_steps"])
    # the same run, crediting only trials TPE suggested (the start points' steps still count as spent)
    by_tpe = steps_to_reach(tpe["trials"], target, lambda t: t["params"] not in start_points, spent=tpe["race_steps"])
    return {"task": task, "seed": seed, "grid": grid, "optuna": tpe,
            "grid_steps_to_best": steps_to_reach(grid["trials"], grid["best_score"]),
            "steps_to_target": reached, "ratio": None if reached is None else reached / grid["total_steps"],
            "steps_to_target_by_tpe": by_tpe,
            "ratio_by_tpe": None if by_tpe is None else by_tpe / grid["total_steps"],
            "degenerate": grid["best_score"] <= WITHIN}


# Start races replayed on the grid's curves (a point's race lap runs exactly what its grid trial runs up to
# that validation: the same configuration and seed, `tests/test_sweep.py`). Each design: a list of
# (validations, points kept, ranked on) phases; "loss" = the lowest validation loss so far, "score" = the
# best score so far (ties on the loss). "successive rejects" is mttl's race (`mttl.sweep.race_phases`).
def race_designs(n_points: int) -> dict[str, list[tuple[int, int, str]]]:
    from mttl.sweep import race_phases

    rejects = race_phases(n_points, 1)
    return {"one lap of 1, on the loss": [(1, 1, "loss")],
            "one lap of 2, on the loss": [(2, 1, "loss")],
            "one lap of 2, on the score": [(2, 1, "score")],
            "successive rejects, all on the loss": [(lap, keep, "loss") for lap, keep in rejects],
            "successive rejects, the last two on the score (mttl)": [
                (lap, keep, "score" if keep == 1 else "loss") for lap, keep in rejects]}


def replay_race(trials: list[dict], design: list[tuple[int, int, str]], validation_steps: int,
                trial_steps: int) -> tuple[dict, int]:
    """The point `design` puts first among the grid's `trials`, and the trial-steps until it ends (the
    race, then the winner's steps after its lap)."""
    alive, done, spent = [t for t in trials if t["complete"]], 0, 0
    for lap, keep, on in design:
        spent += len(alive) * validation_steps * (lap - done)
        done = lap
        at = lambda t: t["curve"][min(lap, len(t["curve"])) - 1]  # noqa: E731
        alive = sorted(alive, key=(lambda t: at(t)[1]) if on == "loss" else (lambda t: (-at(t)[2], at(t)[1])))[:keep]
    return alive[0], spent + trial_steps - validation_steps * done


def grid_curves_markdown(pairs: list[dict], validation_steps: int, trial_steps: int) -> str:
    lines = ["| task | seed | point | loss / score after each validation (running best) | final best |",
             "|---|---|---|---|---|"]
    for pair in pairs:
        for t in pair["grid"]["trials"]:
            curve = " → ".join(f"{loss:.3f}/{score:.0f}" for _, loss, score in t["curve"][:4])
            lines.append(f"| `{pair['task']}` | {pair['seed']} | {describe(t['params'])} | {curve} … | "
                         f"{t['score']:.0f} |")
    lines += ["", "| start race | its first point ends within 1 point of the grid's best | trial-steps until that "
              "point's trial ends ÷ the grid's |", "|---|---|---|"]
    for name in race_designs(len(pairs[0]["grid"]["trials"])):
        hits, ratios = [], []
        for pair in pairs:
            design = race_designs(len(pair["grid"]["trials"]))[name]
            first, spent = replay_race(pair["grid"]["trials"], design, validation_steps, trial_steps)
            hits.append(first["score"] >= pair["grid"]["best_score"] - WITHIN)
            ratios.append(spent / pair["grid"]["total_steps"])
        lines.append(f"| {name} | {sum(hits)} of {len(hits)} | {max(ratios):.2f} |")
    return "\n".join(lines)


def describe(params: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(params.items()))


def _ratio(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.2f}"


def markdown(report: dict) -> str:
    rows = report["pairs"]
    lines = [f"# Sweep cost: Optuna TPE + ASHA vs the preset grid (`{report['tune_space']}`)", "",
             f"Checkpoint: {report['checkpoint']}. {report['machine']}.",
             f"Per trial: {report['num_shots']} shots, {report['total_steps']} steps, validation every "
             f"{report['eval_every_epochs']} epochs; TPE + ASHA: {report['num_samples']} trials, starting from "
             f"{report['start_points'] or 'no preset points'} (raced first in laps from {report['start_race_validations']} "
             f"validation(s), the worst dropped after each; their steps count), ASHA on validation {report['asha_metric']} "
             f"(grace {report['asha_grace_period']}, reduction {report['asha_reduction_factor']}).",
             f"Score: best validation exact match (0–100); \"within 1 point\" = at least the grid's best − "
             f"{WITHIN:g}, counted at the end of the first trial that gets there.", "",
             "| task | seed | grid best (its trial-steps to it) | TPE + ASHA best | TPE + ASHA trial-steps (stopped) "
             "| trial-steps to within 1 point of the grid's best | ÷ grid total | same, TPE's own trials only |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        grid, tpe = r["grid"], r["optuna"]
        stopped = sum(not t["complete"] for t in tpe["trials"])
        reached = "not reached" if r["steps_to_target"] is None else r["steps_to_target"]
        lines.append(f"| `{r['task']}` | {r['seed']} | {grid['best_score']:.1f} ({r['grid_steps_to_best']}) | "
                     f"{tpe['best_score']:.1f} | {tpe['total_steps']} ({stopped}) | {reached} | {_ratio(r['ratio'])} | "
                     f"{_ratio(r['ratio_by_tpe'])} |")
    summary = report["summary"]
    lines += ["", f"Grid total: {rows[0]['grid']['total_steps']} trial-steps per task and seed. "
              f"Within 1 point at ≤ {TARGET_RATIO} of it: {summary['met']} of {len(rows)} "
              f"(ratio median {_ratio(summary['median_ratio'])}); TPE's own trials: {summary['met_by_tpe']} of "
              f"{len(rows)}. Best score, mean over runs: grid {summary['grid_best_mean']:.1f}, TPE + ASHA "
              f"{summary['tpe_best_mean']:.1f}. Wall: grid {summary['grid_wall_s']:.0f} s, TPE + ASHA "
              f"{summary['tpe_wall_s']:.0f} s in all."]
    if any(r["degenerate"] for r in rows):
        lines.append("Some grid scored within 1 point of 0 on every point: there any trial reaches the grid's best.")
    for r in rows:
        for name in ("grid", "optuna"):
            lines += ["", f"`{r['task']}`, seed {r['seed']}, {'grid' if name == 'grid' else 'TPE + ASHA'}, "
                      "trials in the order they ran:", "",
                      "| # | hyper-parameters | validations | trial-steps | status | score |", "|---|---|---|---|---|---|"]
            for lap in r[name].get("race", []):
                value = "–" if lap["loss"] is None else f"loss {lap['loss']:.3g}, score {lap['score']:.1f}"
                lines.append(f"| race | {describe(lap['params'])} | {lap['validations']} | {lap['trial_steps']} | lap | "
                             f"{value} |")
            for i, t in enumerate(r[name]["trials"], 1):
                score = f"{t['score']:.1f}" if t["score"] is not None else "–"
                lines.append(f"| {i} | {describe(t['params'])} | {t['validations']} | {t['trial_steps']} | "
                             f"{'complete' if t['complete'] else 'stopped'} | {score} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"a shorter pre-training, {QUICK['total_steps']} steps per trial, "
                             f"{QUICK['num_samples']} TPE trials, one task and seed")
    parser.add_argument("--tasks", nargs="+", default=None, help=f"held-out tasks (default {TASKS})")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help=f"seeds (default {SEEDS})")
    parser.add_argument("--reverse-grid", action="store_true",
                        help="the space's grid in the opposite order, in both searches: what starting the search "
                             "from the grid costs when its best point is not first")
    parser.add_argument("--grid-only", action="store_true",
                        help="only the grid, and how start-race rules (loss, score, rank sum) would have ranked its "
                             "points after 1-3 validations: sweep-grid.json and .md")
    parser.add_argument("--out", type=Path, default=OUT, help=f"folder for sweep.json and sweep.md (default {OUT})")
    add_config_arguments(parser)
    args = parser.parse_args()
    cfg = load_config(args.config_files, flat_kwargs(args), base={**SWEEP_DEFAULTS, **(QUICK if args.quick else {})})
    tasks = args.tasks or (TASKS[:1] if args.quick else TASKS)
    seeds = args.seeds or (SEEDS[:1] if args.quick else SEEDS)
    from mttl.sweep import load_space, start_points, sweep_base_config

    with tempfile.TemporaryDirectory(prefix="mttl-bench-sweep-") as tmp:
        tmp = Path(tmp)
        if cfg.checkpoint:
            checkpoint = f"given: {cfg.checkpoint}"
        else:
            from mttl.train.recipe import BACKBONE_STEP_FACTOR, DEFAULTS

            started = time.perf_counter()
            cfg.update({"checkpoint": str(pretrained_checkpoint(tmp, args.quick))}, source="benchmark")
            steps = PRETRAIN_QUICK_STEPS if args.quick else DEFAULTS["total_steps"]
            checkpoint = (f"built here by the default `mttl pretrain`, {BACKBONE_STEP_FACTOR * steps} + {steps} "
                          f"steps ({time.perf_counter() - started:.0f} s)")
        data_for(cfg, tmp)
        _, _, space_name = sweep_base_config(cfg)
        if args.reverse_grid:  # the same space, its grid in the opposite order (for both searches)
            reversed_space = tmp / f"{Path(space_name).stem}_reversed.py"
            module = load_space(space_name)
            reversed_space.write_text(f"from {module.__name__} import *  # noqa: F403\n"
                                      f"from {module.__name__} import GRID as _GRID\n\nGRID = _GRID[::-1]\n")
            cfg.update({"tune_space": str(reversed_space)}, source="benchmark")
            _, _, space_name = sweep_base_config(cfg)
        starts = start_points(cfg, space_name)
        pairs = []
        args.out.mkdir(parents=True, exist_ok=True)
        for task in tasks:
            for seed in seeds:
                if args.grid_only:
                    pair = cfg.copy(tasks=[task], seeds=[seed], seed=seed)
                    pairs.append({"task": task, "seed": seed,
                                  "grid": run_search(pair, tmp / f"{safe_name(task)}-{seed}", "grid")})
                    atomic_write_text(args.out / "sweep-grid.json", json.dumps(pairs, indent=2) + "\n")
                    continue
                pairs.append(compare(cfg, tmp, task, seed, starts))
                # each pair as it ends: a run cut short still leaves what it measured
                atomic_write_text(args.out / "sweep.partial.json", json.dumps(pairs, indent=2) + "\n")
    if args.grid_only:
        # the benchmark's few-shot setting: 32 shots in batches of 8 = 4 steps an epoch
        validation_steps = cfg.eval_every_epochs * cfg.num_shots // cfg.train_batch_size
        table = grid_curves_markdown(pairs, validation_steps, cfg.total_steps)
        atomic_write_text(args.out / "sweep-grid.md", f"`{' '.join(['python', 'benchmarks/sweep.py', *sys.argv[1:]])}`"
                                                      f"\n\n{table}\n")
        print(table)
        return
    ratios = sorted(r["ratio"] if r["ratio"] is not None else float("inf") for r in pairs)
    summary = {"met": sum(r["ratio"] is not None and r["ratio"] <= TARGET_RATIO for r in pairs),
               "met_by_tpe": sum(r["ratio_by_tpe"] is not None and r["ratio_by_tpe"] <= TARGET_RATIO for r in pairs),
               "median_ratio": statistics.median(ratios) if ratios and statistics.median(ratios) != float("inf")
               else None,
               "grid_best_mean": statistics.fmean(r["grid"]["best_score"] for r in pairs),
               "tpe_best_mean": statistics.fmean(r["optuna"]["best_score"] for r in pairs),
               "grid_wall_s": sum(r["grid"]["wall_s"] for r in pairs),
               "tpe_wall_s": sum(r["optuna"]["wall_s"] for r in pairs)}
    report = {"tune_space": space_name, "reverse_grid": args.reverse_grid, "checkpoint": checkpoint,
              "tasks": tasks, "seeds": seeds,
              "total_steps": cfg.total_steps, "num_shots": cfg.num_shots, "eval_every_epochs": cfg.eval_every_epochs,
              "num_samples": cfg.num_samples, "start_points": starts, "asha_metric": cfg.asha_metric,
              "asha_grace_period": cfg.asha_grace_period, "asha_reduction_factor": cfg.asha_reduction_factor,
              "start_race_validations": cfg.start_race_validations,
              "metric": "exact match",
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU, one trial at a time, 1 CPU each",
              "within": WITHIN, "target_ratio": TARGET_RATIO, "summary": summary, "pairs": pairs,
              "command": " ".join(["python", "benchmarks/sweep.py", *sys.argv[1:]])}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "sweep.json", json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    atomic_write_text(args.out / "sweep.md", f"`{report['command']}`\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()

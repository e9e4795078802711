"""`build_report`: a report folder (report.md, CSV tables, figures/) built beside `--out` and moved into it.

A report never deletes what it did not write: it lists its files in `--out`'s REPORT_MARKER; a
later report into the same folder replaces those files one by one and leaves any other file there
alone, and an existing non-empty folder without the marker is refused.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from pathlib import Path

from mttl.errors import MttlError
from mttl.paths import check_out_dir
from mttl.report.figures import plot_curves, plot_routing
from mttl.report.routing import read_routing
from mttl.report.runs import Run, expand_run_dirs, read_run
from mttl.report.skills import SKILL_ALIGNMENT_MEASURE, skill_alignment, synthetic_manifest
from mttl.report.tables import (aggregate_results, best_trials, curve_summary, evaluation_key, markdown_table,
                                per_task_val_loss, series, wide_table)
from mttl.run_folder import atomic_write_text, make_staging, remove_stale_staging, write_csv

# In --out: the files the report there consists of, so the next report knows which files are its own.
REPORT_MARKER = ".mttl-report.json"


def build_report(run_dirs: list[str | os.PathLike], out: str | os.PathLike, max_heads: int = 8) -> Path:
    """Read the runs, write report.md + CSV + PNG into a temp folder, then rename it onto `out`."""
    runs = [read_run(p) for p in expand_run_dirs(run_dirs)]
    if not runs:
        raise MttlError("no run folders given; example: mttl report output/my_run --out report")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        shared_names = ", ".join(sorted({n for n in names if names.count(n) > 1}))
        raise MttlError(f"two run folders share a name ({shared_names}); report them separately or rename one")
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise MttlError(f"--out '{out}' is a file, not a report folder; choose an empty or new folder")
    out = check_out_dir(out, example="--out report")
    previous = previous_report_files(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    tmp = make_staging(out)
    try:
        (tmp / "figures").mkdir()
        _write_report(runs, tmp, max_heads)
        written = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        if out.exists():
            _replace_files(tmp, out, written, previous or set())
        else:
            _write_marker(tmp, written)
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / "report.md"


def previous_report_files(out: Path) -> set[str] | None:
    """The files an earlier report wrote into `out` (None when `out` is new or empty); MttlError when
    `out` holds files but no report marker: those are someone else's and are not to be mixed with."""
    if not out.is_dir() or not any(out.iterdir()):
        return None
    marker = out / REPORT_MARKER
    if not marker.is_file():
        example = next(p.name for p in sorted(out.iterdir()))
        raise MttlError(f"--out '{out}' exists and is not a report folder (it holds {example} and no {REPORT_MARKER}); "
                        "choose an empty or new folder")
    try:
        files = json.loads(marker.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError):
        files = None
    if not isinstance(files, list) or not all(isinstance(f, str) and _inside(f) for f in files):
        raise MttlError(f"{marker} is damaged, so which files are the report's is unknown; delete the folder's "
                        "report files and the marker by hand, or choose a new --out")
    return set(files)


def _inside(relative: str) -> bool:
    return bool(relative) and not os.path.isabs(relative) and ".." not in Path(relative).parts


def _write_marker(folder: Path, files: list[str]) -> None:
    atomic_write_text(folder / REPORT_MARKER, json.dumps({"files": files}, indent=1) + "\n")


def _replace_files(staging: Path, out: Path, written: list[str], previous: set[str]) -> None:
    """Move the new report's files into an existing `out`, file by file: the previous report's files
    are replaced or (when this report has no such file) removed; no other file is touched."""
    clash = [rel for rel in written if rel not in previous and (out / rel).exists()]
    if clash:
        raise MttlError(f"--out '{out}' already holds {clash[0]}, which mttl report did not write; move it away or "
                        "choose another folder")
    # The marker first names old and new files, so an interrupted replace still knows all of its own files.
    _write_marker(out, sorted(previous | set(written)))
    for rel in sorted(previous - set(written)):
        (out / rel).unlink(missing_ok=True)
    for rel in written:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / rel, out / rel)
    (out / "figures").mkdir(exist_ok=True)
    _write_marker(out, written)


def _write_report(runs: list[Run], folder: Path, max_heads: int) -> None:
    md = ["# Report\n", "| run | folder | holds |", "|---|---|---|"]
    md += [f"| {r.name} | `{r.path}` | {', '.join(r.holds)} |" for r in runs]
    md.append("")

    per_task, per_method = aggregate_results(runs)
    if per_task:
        write_csv(folder / "results_per_task.csv", per_task)
        write_csv(folder / "results_per_method.csv", per_method)
        md.append("## Fine-tuning results\n")
        md.append("Per task: median over seeds. Per method: mean (population std) over tasks of those medians. "
                  "Full tables: `results_per_task.csv`, `results_per_method.csv`.\n")
        summary = defaultdict(dict)
        for row in per_method:
            summary[(row["method"], row["metric"])][row["evaluation"]] = (
                f"{row['mean']:.4g} ({row['std']:.3g}, {row['n_tasks']} tasks)")
        evaluations = sorted({r["evaluation"] for r in per_method}, key=evaluation_key)
        md.append(markdown_table([{"method": m, "metric": metric, **{e: cells.get(e, "") for e in evaluations}}
                                   for (m, metric), cells in summary.items()]))
        for evaluation in evaluations:
            for metric in sorted({r["metric"] for r in per_task if r["evaluation"] == evaluation}):
                md.append(f"\n### Per task: {evaluation}, {metric} (median over seeds)\n")
                md.append(markdown_table(wide_table(per_task, evaluation, metric)))

    sweeps = best_trials(runs)
    if sweeps:
        write_csv(folder / "sweep_best.csv", sweeps)
        md.append("## Sweeps\n")
        md.append("Per study: the complete trial with the highest validation mean over seeds, its test mean, and "
                  "the median validation mean over all complete trials. `sweep_best.csv` holds the same.\n")
        md.append(markdown_table(sweeps))

    # Pre-training runs (metrics, no results) get the summary tables; every run with metrics gets curves.
    pretrain_runs = [r for r in runs if r.metrics and not r.results]
    if pretrain_runs:
        summaries = [curve_summary(r) for r in pretrain_runs]
        write_csv(folder / "training_summary.csv", summaries)
        curves = [{"run": r.name, "step": s, "loss": v}
                  for r in pretrain_runs for s, v in zip(*series(r.metrics, "loss"))]
        curves += [{"run": r.name, "step": s, "val_loss": v}
                   for r in pretrain_runs for s, v in zip(*series(r.metrics, "val_loss"))]
        write_csv(folder / "training_curves.csv", curves)
        md.append("## Pre-training\n")
        md.append("Losses as logged in `metrics.jsonl` (speeds are means over logged steps). "
                  "Curves as numbers: `training_curves.csv`.\n")
        md.append(markdown_table(summaries))
        task_losses = [row for r in pretrain_runs for row in per_task_val_loss(r)]
        if task_losses:
            write_csv(folder / "val_loss_per_task.csv", task_losses)
            md.append("\n### Validation loss per task (last evaluation)\n")
            md.append(markdown_table(task_losses))
    curve_figures = [(run, f"{run.name}_curves.png") for run in runs if run.metrics]
    curve_figures = [(run, name) for run, name in curve_figures if plot_curves(run, folder / "figures" / name)]
    if curve_figures:
        md.append("## Learning curves\n")
        md += [f"![{run.name}: learning curves](figures/{name})\n" for run, name in curve_figures]

    for run in runs:
        routing = read_routing(run)
        if routing is None:
            continue
        S = next(iter(routing.groups.values())).shape[1]
        K = next(iter(routing.groups.values())).shape[2]
        md.append(f"## Routing: {run.name}\n")
        md.append(f"{len(routing.task_names)} tasks, S={S} head(s), K={K} skills. Eval-mode weights "
                  "(the run's selector without sampling: by default sigmoid of the logits, normalised over skills), "
                  "averaged over the layers of each group. "
                  f"Numbers (heads averaged): `routing_{run.name}.csv`.\n")
        rows = [{"group": group, "task": task,
                 **{f"skill_{k}": round(float(w), 6) for k, w in enumerate(weights[t].mean(axis=0))}}
                for group, weights in routing.groups.items() for t, task in enumerate(routing.task_names)]
        write_csv(folder / f"routing_{run.name}.csv", rows)
        for name, caption in plot_routing(run.name, routing, folder / "figures", max_heads):
            md.append(f"![{caption}](figures/{name})\n")
        meta = synthetic_manifest(run)
        alignment = skill_alignment(routing, meta) if meta else None
        if alignment:
            write_csv(folder / f"skills_{run.name}.csv", alignment["per_task"])
            md.append(f"### Does the routing pick the skills each task is built from? ({run.name})\n")
            md.append(SKILL_ALIGNMENT_MEASURE)
            md.append(markdown_table(alignment["pairs"]))
            md.append("\n" + markdown_table(alignment["per_primitive"]))
            md.append("\n" + markdown_table(alignment["per_task"]))
    (folder / "report.md").write_text("\n".join(md).rstrip() + "\n")

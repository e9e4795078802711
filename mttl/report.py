"""`mttl report RUN_DIR… --out DIR`: tables and pictures from pre-training, fine-tuning and sweep runs.

Owns reading finished run folders (never a model): `metrics.jsonl` (learning curves),
`final/adapters.safetensors` + `adapters.json` + `tasks.json` (routing heatmaps, read straight
from the routing logits), `results.jsonl` (fine-tuning: median over seeds per task, then mean over
tasks) and a sweep's `results.csv` (best complete trial per study). Writes `report.md`, CSV tables and PNG
figures (matplotlib, headless) into a temporary folder that is renamed onto `--out` at the end.

A report never deletes what it did not write: it lists its files in `--out`'s REPORT_MARKER; a
later report into the same folder replaces those files one by one and leaves any other file there
alone, and an existing non-empty folder without the marker is refused.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mttl.errors import DataError, MttlError
from mttl.paths import check_out_dir
from mttl.run_folder import (ADAPTERS_FILE, CONFIG_FILE, FINAL_DIR, METRICS_FILE, RESULTS_CSV, RESULTS_FILE, aggregate,
                             atomic_write_text, make_staging, read_json, read_jsonl, remove_stale_staging, write_csv)

HELP = "write Markdown/CSV tables and PNG figures (routing heatmaps, learning curves) for runs"
DESCRIPTION = """\
Summarise finished runs into one folder: report.md, CSV tables and PNG figures.

A RUN_DIR is recognised by what it holds:
  pre-training  metrics.jsonl and/or final/adapters.safetensors (+ tasks.json, config.json)
  fine-tuning   results.jsonl (rows: task, seed, finetune_type, evaluation, metric, value)
  sweep         results.csv with a trial_id column (one row per trial)
A folder holding none of these but whose sub-folders are runs stands for those runs.

Fine-tuning scores: median over seeds per task, then mean (and std) over tasks, per method
(a method is a run and its finetune_type). Routing heatmaps show eval-mode weights
(for Poly/MHR: sigmoid of the logits, normalised over skills) averaged within each layer group
(encoder/decoder x self-attention/cross-attention/FFN), one panel per head when S > 1.

Example:
  mttl report output/mhr_synthetic output/mhr_synthetic_ft output/sweep_z --out report
"""

EVALUATION_ORDER = ["zero_shot", "best_val", "test"]
SUBLAYER_ORDER = ["self-attention", "cross-attention", "FFN"]
CODER_ORDER = ["encoder", "decoder", "shared"]
MARKDOWN_ROW_CAP = 50
RESULT_FIELDS = {"task", "seed", "evaluation", "metric", "value"}
# In --out: the files the report there consists of, so the next report knows which files are its own.
REPORT_MARKER = ".mttl-report.json"


# ---------------------------------------------------------------------------------- run reading
@dataclass
class Run:
    """What one run folder holds, read once."""

    path: Path
    name: str
    config: dict = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)
    results: list[dict] = field(default_factory=list)
    trials: list[dict] = field(default_factory=list)
    adapters_file: Path | None = None

    @property
    def holds(self) -> list[str]:
        found = [(self.metrics, "training curves"), (self.adapters_file, "routing"),
                 (self.results, "fine-tuning results"), (self.trials, "sweep trials")]
        return [label for present, label in found if present]


def _is_run_folder(path: Path) -> bool:
    markers = [METRICS_FILE, RESULTS_FILE, f"{FINAL_DIR}/{ADAPTERS_FILE}"]
    return any((path / m).is_file() for m in markers) or _is_sweep_csv(path / RESULTS_CSV)


def _is_sweep_csv(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open(newline="") as handle:
        header = next(csv.reader(handle), [])
    return "trial_id" in header


def read_run(path: str | os.PathLike) -> Run:
    """Read one run folder; raises DataError when it is not a pre-training, fine-tuning or sweep run."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"run folder '{path}' does not exist; give the folder of a run (e.g. output/<run_name>)")
    if not _is_run_folder(path):
        raise DataError(
            f"'{path}' is not a run folder: expected metrics.jsonl or final/adapters.safetensors (pre-training), "
            f"results.jsonl (fine-tuning) or results.csv with a trial_id column (sweep); pass the run's own folder")
    run = Run(path=path, name=path.resolve().name)
    if (path / CONFIG_FILE).is_file():
        run.config = read_json(path / CONFIG_FILE)
    if (path / METRICS_FILE).is_file():
        run.metrics = read_jsonl(path / METRICS_FILE)
    if (path / FINAL_DIR / ADAPTERS_FILE).is_file():
        run.adapters_file = path / FINAL_DIR / ADAPTERS_FILE
    if (path / RESULTS_FILE).is_file():
        run.results = read_jsonl(path / RESULTS_FILE)
        for number, row in enumerate(run.results, 1):
            missing = RESULT_FIELDS - row.keys()
            if missing:
                raise DataError(f"{path / RESULTS_FILE} line {number} lacks {sorted(missing)}; the file must come "
                                "from `mttl finetune` or `mttl evaluate`")
    if _is_sweep_csv(path / RESULTS_CSV):
        with (path / RESULTS_CSV).open(newline="") as handle:
            run.trials = list(csv.DictReader(handle))
    return run


def expand_run_dirs(paths: list[str | os.PathLike]) -> list[Path]:
    """Each path is a run, or a folder whose immediate sub-folders are runs (e.g. an output_dir)."""
    out = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir() and not _is_run_folder(path):
            children = sorted(p for p in path.iterdir() if p.is_dir() and _is_run_folder(p))
            if children:
                out.extend(children)
                continue
        out.append(path)
    return out


# ------------------------------------------------------------------------------------- routing
def layer_group(selector_name: str, granularity: str = "finegrained") -> str:
    """'encoder self-attention', 'decoder FFN', … for a selector saved under its first layer's name.

    A selector shared beyond one sub-layer (router_granularity coarsegrained, coderwise, blockwise)
    is named after the first layer holding it, so only its encoder/decoder part is meaningful."""
    if granularity == "coarsegrained":
        return "all layers"
    parts = selector_name.split(".")
    coder = next((c for c in ("encoder", "decoder") if c in parts), "shared")
    lowered = selector_name.lower()
    if granularity in ("coderwise", "blockwise"):
        return coder
    if "encdecattention" in lowered or "crossattention" in lowered:
        sublayer = "cross-attention"
    elif "attention" in lowered or "attn" in lowered:
        sublayer = "self-attention"
    elif "densereludense" in lowered or "mlp" in lowered or "ffn" in lowered:
        sublayer = "FFN"
    else:
        return coder
    return f"{coder} {sublayer}"


def _group_sort_key(group: str) -> tuple:
    coder, _, sublayer = group.partition(" ")
    return (CODER_ORDER.index(coder) if coder in CODER_ORDER else len(CODER_ORDER),
            SUBLAYER_ORDER.index(sublayer) if sublayer in SUBLAYER_ORDER else -1, group)


@dataclass
class Routing:
    """Eval-mode routing weights of one run, averaged within each layer group."""

    task_names: list[str]
    groups: dict[str, np.ndarray]  # group -> [T, S, K]

    def per_task(self) -> np.ndarray:
        """[T, K]: the average over heads and over the groups (each group weighted equally)."""
        return np.mean([w.mean(axis=1) for w in self.groups.values()], axis=0)


def read_routing(run: Run) -> Routing | None:
    """Eval-mode weights of every saved routing-logits tensor [T, S*K], computed by the run's own
    selector type (no model needed); None when the run has no learned routing."""
    if run.adapters_file is None:
        return None
    import torch
    from safetensors.torch import load_file

    from mttl.adapters.routing import build_selector
    from mttl.adapters.state import read_adapter_config

    acfg = read_adapter_config(run.adapters_file.parent)
    if not acfg.routed or acfg.selector != "poly":
        return None
    width = acfg.n_splits * acfg.n_skills
    per_group: dict[str, list[np.ndarray]] = defaultdict(list)
    for name, logits in load_file(str(run.adapters_file)).items():
        if not name.endswith("module_logits"):
            continue
        if logits.ndim != 2 or logits.shape[1] != width:
            raise DataError(f"{run.adapters_file}: tensor '{name}' has shape {list(logits.shape)} but adapters.json "
                            f"says n_splits={acfg.n_splits}, n_skills={acfg.n_skills} (expected [tasks, {width}]); "
                            f"the two files come from different saves")
        selector = build_selector(acfg.replace(n_tasks=logits.shape[0]))
        selector.load_state_dict({"module_logits": logits})
        selector.eval()
        with torch.no_grad():
            weights = selector(torch.arange(logits.shape[0]))
        per_group[layer_group(name, acfg.granularity)].append(weights.float().numpy())
    if not per_group:
        return None
    groups = {g: np.mean(per_group[g], axis=0) for g in sorted(per_group, key=_group_sort_key)}
    n_tasks = next(iter(groups.values())).shape[0]
    names = [f"task {i}" for i in range(n_tasks)]
    from mttl.models.run import read_tasks_file

    for task, row in read_tasks_file(run.path).items():
        if row < n_tasks:
            names[row] = task
    return Routing(task_names=names, groups=groups)


def _synthetic_manifest(run: Run) -> dict | None:
    data_dir = run.config.get("data_dir")
    if not data_dir or not (Path(data_dir) / "manifest.json").is_file():
        return None
    manifest = read_json(Path(data_dir) / "manifest.json")
    tasks = manifest.get("tasks", {})
    return tasks if any("skills" in meta for meta in tasks.values()) else None


SKILL_ALIGNMENT_MEASURE = """\
v_t is task t's routing averaged over heads and over the layer groups, each group weighted equally
(a distribution over the K skills).
Per task: its len(primitives) highest-weight skills. Per primitive: the skill with the highest mean
weight over the tasks built from it, and how many of those tasks have that skill among their top
skills. Pairs: cosine similarity of (v_t - 1/K) between tasks that share a primitive and between
tasks that share none (a task routed exactly uniformly has no direction and is left out). Shared-
primitive pairs clearly above the others mean the routing groups tasks by what they are built from;
similar values mean it does not.
"""


def skill_alignment(routing: Routing, task_meta: dict) -> dict | None:
    """Does routing follow the primitives each synthetic task is built from? (SKILL_ALIGNMENT_MEASURE)"""
    rows = {name: i for i, name in enumerate(routing.task_names)}
    built = {t: list(meta["skills"]) for t, meta in task_meta.items() if meta.get("skills") and t in rows}
    if not built:
        return None
    vectors = routing.per_task()
    n_skills = vectors.shape[1]
    top = {t: [int(k) for k in np.argsort(-vectors[rows[t]], kind="stable")[:len(prims)]] for t, prims in built.items()}
    per_task = [{"task": t, "built_from": "+".join(built[t]),
                 "top_skills": " ".join(f"{k} ({vectors[rows[t]][k]:.3f})" for k in top[t])} for t in sorted(built)]
    by_primitive: dict[str, list[str]] = defaultdict(list)
    for task, prims in built.items():
        for prim in prims:
            by_primitive[prim].append(task)
    per_primitive = []
    for prim, tasks in sorted(by_primitive.items()):
        mean = np.mean([vectors[rows[t]] for t in tasks], axis=0)
        dominant = int(np.argmax(mean))
        hits = sum(dominant in top[t] for t in tasks)
        per_primitive.append({"primitive": prim, "tasks": len(tasks), "dominant_skill": dominant,
                              "mean_weight": round(float(mean[dominant]), 4),
                              "tasks_with_it_in_top": f"{hits}/{len(tasks)}"})
    centred = {t: vectors[rows[t]] - 1.0 / n_skills for t in built}
    shared, disjoint = [], []
    names = sorted(built)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            na, nb = np.linalg.norm(centred[a]), np.linalg.norm(centred[b])
            if na < 1e-9 or nb < 1e-9:
                continue
            cosine = float(centred[a] @ centred[b] / (na * nb))
            (shared if set(built[a]) & set(built[b]) else disjoint).append(cosine)
    pairs = [{"pairs": label, "count": len(values),
              "mean_cosine": round(statistics.fmean(values), 4) if values else ""}
             for label, values in (("share a primitive", shared), ("share none", disjoint))]
    return {"per_task": per_task, "per_primitive": per_primitive, "pairs": pairs}


# ------------------------------------------------------------------------------- aggregation
def _evaluation_key(evaluation: str) -> tuple:
    return (EVALUATION_ORDER.index(evaluation) if evaluation in EVALUATION_ORDER else len(EVALUATION_ORDER), evaluation)


def method_label(run_name: str, finetune_type) -> str:
    return f"{run_name} ({finetune_type})" if finetune_type not in (None, "") else run_name


def aggregate_results(runs: list[Run]) -> tuple[list[dict], list[dict]]:
    """Fine-tuning rows → (per task: median over seeds; per method: mean and population std over
    tasks of those medians), for each run × finetune_type × metric × evaluation."""
    groups = defaultdict(list)
    for run in runs:
        for row in run.results:
            groups[(run.name, row.get("finetune_type"), row["metric"])].append(row)
    per_task, per_method = [], []
    for (run_name, ft, metric), rows in sorted(groups.items(), key=lambda kv: (kv[0][0], str(kv[0][1]), kv[0][2])):
        method = {"method": method_label(run_name, ft), "run": run_name, "finetune_type": ft}
        for evaluation in sorted({r["evaluation"] for r in rows}, key=_evaluation_key):
            summary = aggregate(rows, evaluation)
            seeds = defaultdict(list)
            for row in rows:
                if row["evaluation"] == evaluation:
                    seeds[row["task"]].append(f"{row['seed']}:{float(row['value']):.6g}")
            per_task += [{**method, "evaluation": evaluation, "metric": metric, "task": task,
                          "n_seeds": len(seeds[task]), "seed_values": " ".join(seeds[task]), "median": median}
                         for task, median in summary["per_task"].items()]
            per_method.append({**method, "evaluation": evaluation, "metric": metric,
                               "n_tasks": len(summary["per_task"]), "mean": summary["mean"], "std": summary["std"]})
    return per_task, per_method


def best_trials(runs: list[Run]) -> list[dict]:
    """Per sweep run and study (task): the complete trial with the highest validation `mean`."""
    out = []
    for run in runs:
        by_study = defaultdict(list)
        for trial in run.trials:
            by_study[trial.get("study") or trial.get("task", "")].append(trial)
        for study, trials in by_study.items():
            complete = [t for t in trials if t.get("status", "complete") == "complete" and t.get("mean") not in (None, "")]
            row = {"run": run.name, "study": study, "trials": len(trials), "complete": len(complete)}
            if complete:
                best = max(complete, key=lambda t: float(t["mean"]))
                row.update({"best_trial": best["trial_id"], "val_mean": float(best["mean"]),
                            "test_mean": float(best["test_mean"]) if best.get("test_mean") not in (None, "") else "",
                            "median_trial_val_mean": statistics.median(float(t["mean"]) for t in complete),
                            "hyper_parameters": " ".join(f"{k.removeprefix('hp/')}={v}" for k, v in best.items()
                                                         if k.startswith("hp/"))})
            out.append(row)
    return out


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`, one value per step (a resumed run's repeated step keeps its last row)."""
    by_step = {}
    for row in rows:
        if row.get(key) is not None and row.get("step") is not None:
            by_step[int(row["step"])] = float(row[key])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def curve_summary(run: Run) -> dict:
    steps, loss = series(run.metrics, "loss")
    val_steps, val = series(run.metrics, "val_loss")

    def mean_of(key):
        values = [float(r[key]) for r in run.metrics if r.get(key) is not None]
        return statistics.fmean(values) if values else ""

    return {"run": run.name, "last_step": max(steps + val_steps, default=""),
            "first_loss": loss[0] if loss else "", "last_loss": loss[-1] if loss else "",
            "best_val_loss": min(val) if val else "", "last_val_loss": val[-1] if val else "",
            "tokens_per_s": mean_of("tokens_per_s"), "step_time_s": mean_of("step_time_s"),
            "data_wait_s": mean_of("data_wait_s")}


def per_task_val_loss(run: Run) -> list[dict]:
    """Each task's val loss at the last evaluation that reported it."""
    last = {}
    for row in run.metrics:
        for key, value in row.items():
            if key.startswith("val_loss/") and value is not None:
                last[key.split("/", 1)[1]] = (row.get("step"), float(value))
    return [{"run": run.name, "task": task, "step": step, "val_loss": value}
            for task, (step, value) in sorted(last.items())]


# ---------------------------------------------------------------------------------- figures
def _figure(width: float, height: float):
    # A bare Figure renders through the Agg canvas: no pyplot state, no display needed.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def curve_panels(rows: list[dict]) -> list[tuple[str, str]]:
    """(metrics key, title) of what a metrics.jsonl can plot: pre-training's `loss`/`val_loss`,
    fine-tuning's `train/loss` and validation scores `val/<metric>`."""
    panels = []
    for key in dict.fromkeys(k for row in rows for k in row):
        if key in ("loss", "train/loss"):
            panels.append((key, "training loss"))
        elif key == "val_loss":
            panels.append((key, "validation loss"))
        elif key.startswith("val/"):
            panels.append((key, f"validation {key.removeprefix('val/')}"))
    return panels


def plot_curves(run: Run, path: Path) -> bool:
    """One panel per curve against step, one line per (task, seed) when rows carry them;
    False when the run logged nothing plottable."""
    groups = defaultdict(list)
    for row in run.metrics:
        groups[tuple(f"{k} {row[k]}" for k in ("task", "seed") if k in row)].append(row)
    panels = curve_panels(run.metrics)
    if not panels:
        return False
    fig = _figure(min(5.0 * len(panels), 20.0), 3.6)
    for axis, (key, title) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for label, rows in sorted(groups.items()):
            steps, values = series(rows, key)
            if steps:
                axis.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3,
                          label=", ".join(label) or None)
        axis.set_title(f"{run.name}: {title}")
        axis.set_xlabel("optimizer step")
        axis.set_ylabel(key)
        axis.grid(alpha=0.3)
        if 1 < len(groups) <= 10:
            axis.legend(fontsize=7)
    fig.savefig(path)
    return True


def _heatmap(axis, weights: np.ndarray, task_names: list[str], title: str, limits: tuple[float, float]):
    # Colours span the figure's own range (shown on the colour bar): routing near 1/K still shows its structure.
    image = axis.imshow(weights, aspect="auto", cmap="viridis", vmin=limits[0], vmax=limits[1], interpolation="nearest")
    axis.set_title(title, fontsize=9)
    axis.set_xlabel("skill")
    axis.set_xticks(range(weights.shape[1]))
    if len(task_names) <= 40:
        axis.set_yticks(range(len(task_names)), labels=task_names, fontsize=7)
    else:
        axis.set_ylabel(f"task (routing row, {len(task_names)} tasks)")
    return image


def head_selection(n_splits: int, max_heads: int) -> list[int]:
    """All heads, or `max_heads` evenly spaced ones (first and last included)."""
    if n_splits <= max_heads:
        return list(range(n_splits))
    return sorted({int(round(x)) for x in np.linspace(0, n_splits - 1, max_heads)})


def plot_routing(run_name: str, routing: Routing, folder: Path, max_heads: int) -> list[tuple[str, str]]:
    """Overview (one panel per group, heads averaged) + one figure per group with a panel per head."""
    figures = []
    n_tasks = len(routing.task_names)
    height = min(2.0 + 0.22 * n_tasks, 14.0)
    groups = list(routing.groups.items())
    head_means = {group: weights.mean(axis=1) for group, weights in groups}
    limits = (min(float(m.min()) for m in head_means.values()), max(float(m.max()) for m in head_means.values()))
    fig = _figure(min(3.2 * len(groups) + 1.2, 22.0), height)
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    for axis, (group, weights) in zip(axes, groups):
        image = _heatmap(axis, head_means[group], routing.task_names if axis is axes[0] else [],
                         f"{group} (mean of {weights.shape[1]} head(s))", limits)
    fig.colorbar(image, ax=list(axes), label="routing weight", shrink=0.8)
    fig.suptitle(f"{run_name}: routing weights, task x skill (eval mode)")
    name = f"{run_name}_routing.png"
    fig.savefig(folder / name)
    figures.append((name, f"{run_name}: routing per layer group (heads averaged)"))
    for index, (group, weights) in enumerate(groups):
        n_splits = weights.shape[1]
        if n_splits == 1:
            continue
        heads = head_selection(n_splits, max_heads)
        fig = _figure(min(2.6 * len(heads) + 1.2, 24.0), height)
        axes = fig.subplots(1, len(heads), squeeze=False)[0]
        limits = (float(weights[:, heads].min()), float(weights[:, heads].max()))
        for axis, head in zip(axes, heads):
            image = _heatmap(axis, weights[:, head, :], routing.task_names if axis is axes[0] else [],
                             f"head {head}", limits)
        fig.colorbar(image, ax=list(axes), label="routing weight", shrink=0.8)
        shown = "all heads" if len(heads) == n_splits else f"{len(heads)} of {n_splits} heads, evenly spaced"
        fig.suptitle(f"{run_name}: {group} ({shown})")
        name = f"{run_name}_routing_{index}_{group.replace(' ', '_')}.png"
        fig.savefig(folder / name)
        figures.append((name, f"{run_name}: {group}, {shown}"))
    return figures


# ---------------------------------------------------------------------------------- writing
def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _markdown_table(rows: list[dict], columns: list[str] | None = None, cap: int = MARKDOWN_ROW_CAP) -> str:
    if not rows:
        return "_(none)_\n"
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)).replace("|", "\\|") for c in columns) + " |" for row in rows[:cap]]
    if len(rows) > cap:
        lines.append(f"\n_{len(rows) - cap} more rows in the CSV file._")
    return "\n".join(lines) + "\n"


def _wide_table(per_task: list[dict], evaluation: str, metric: str) -> list[dict]:
    """task rows x method columns of per-task medians, for one evaluation and metric."""
    methods = list(dict.fromkeys(r["method"] for r in per_task if r["evaluation"] == evaluation and r["metric"] == metric))
    table = defaultdict(dict)
    for row in per_task:
        if row["evaluation"] == evaluation and row["metric"] == metric:
            table[row["task"]][row["method"]] = row["median"]
    return [{"task": task, **{m: table[task].get(m, "") for m in methods}} for task in sorted(table)]


def build_report(run_dirs: list[str | os.PathLike], out: str | os.PathLike, max_heads: int = 8) -> Path:
    """Read the runs, write report.md + CSV + PNG into a temp folder, then rename it onto `out`."""
    runs = [read_run(p) for p in expand_run_dirs(run_dirs)]
    if not runs:
        raise MttlError("no run folders given; example: mttl report output/my_run --out report")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise MttlError(f"two run folders share a name ({', '.join(sorted({n for n in names if names.count(n) > 1}))}); "
                        "report them separately or rename one")
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
            summary[(row["method"], row["metric"])][row["evaluation"]] = f"{row['mean']:.4g} ({row['std']:.3g}, {row['n_tasks']} tasks)"
        evaluations = sorted({r["evaluation"] for r in per_method}, key=_evaluation_key)
        md.append(_markdown_table([{"method": m, "metric": metric, **{e: cells.get(e, "") for e in evaluations}}
                                   for (m, metric), cells in summary.items()]))
        for evaluation in evaluations:
            for metric in sorted({r["metric"] for r in per_task if r["evaluation"] == evaluation}):
                md.append(f"\n### Per task: {evaluation}, {metric} (median over seeds)\n")
                md.append(_markdown_table(_wide_table(per_task, evaluation, metric)))

    sweeps = best_trials(runs)
    if sweeps:
        write_csv(folder / "sweep_best.csv", sweeps)
        md.append("## Sweeps\n")
        md.append("Per study: the complete trial with the highest validation mean over seeds, its test mean, and "
                  "the median validation mean over all complete trials. `sweep_best.csv` holds the same.\n")
        md.append(_markdown_table(sweeps))

    # Pre-training runs (metrics, no results) get the summary tables; every run with metrics gets curves.
    pretrain_runs = [r for r in runs if r.metrics and not r.results]
    if pretrain_runs:
        summaries = [curve_summary(r) for r in pretrain_runs]
        write_csv(folder / "training_summary.csv", summaries)
        curves = [{"run": r.name, "step": s, "loss": v} for r in pretrain_runs for s, v in zip(*series(r.metrics, "loss"))]
        curves += [{"run": r.name, "step": s, "val_loss": v} for r in pretrain_runs for s, v in zip(*series(r.metrics, "val_loss"))]
        write_csv(folder / "training_curves.csv", curves)
        md.append("## Pre-training\n")
        md.append("Losses as logged in `metrics.jsonl` (speeds are means over logged steps). "
                  "Curves as numbers: `training_curves.csv`.\n")
        md.append(_markdown_table(summaries))
        task_losses = [row for r in pretrain_runs for row in per_task_val_loss(r)]
        if task_losses:
            write_csv(folder / "val_loss_per_task.csv", task_losses)
            md.append("\n### Validation loss per task (last evaluation)\n")
            md.append(_markdown_table(task_losses))
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
        rows = [{"group": group, "task": task, **{f"skill_{k}": round(float(w), 6) for k, w in enumerate(weights[t].mean(axis=0))}}
                for group, weights in routing.groups.items() for t, task in enumerate(routing.task_names)]
        write_csv(folder / f"routing_{run.name}.csv", rows)
        for name, caption in plot_routing(run.name, routing, folder / "figures", max_heads):
            md.append(f"![{caption}](figures/{name})\n")
        meta = _synthetic_manifest(run)
        alignment = skill_alignment(routing, meta) if meta else None
        if alignment:
            write_csv(folder / f"skills_{run.name}.csv", alignment["per_task"])
            md.append(f"### Does the routing pick the skills each task is built from? ({run.name})\n")
            md.append(SKILL_ALIGNMENT_MEASURE)
            md.append(_markdown_table(alignment["pairs"]))
            md.append("\n" + _markdown_table(alignment["per_primitive"]))
            md.append("\n" + _markdown_table(alignment["per_task"]))
    (folder / "report.md").write_text("\n".join(md).rstrip() + "\n")


# --------------------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run folders (pre-training, fine-tuning or sweep), or a folder of runs. "
                             "Example: output/mhr_synthetic output/mhr_synthetic_ft")
    parser.add_argument("--out", default="report", metavar="DIR",
                        help="folder for report.md, the CSV tables and figures/: new, empty, or an earlier "
                             "report (whose files are replaced; other files are left alone). Default: report. "
                             "Example: --out reports/ni_s8")
    parser.add_argument("--max-heads", type=int, default=8, metavar="N",
                        help="routing heatmaps show at most N heads per layer group (evenly spaced) when S > N. "
                             "Default: 8. Example: --max-heads 16")


def run(args) -> int:
    if args.max_heads < 1:
        raise MttlError(f"--max-heads must be at least 1, got {args.max_heads}; example: --max-heads 8")
    path = build_report(args.run_dirs, args.out, max_heads=args.max_heads)
    print(f"report written to {path}")
    return 0

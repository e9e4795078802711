"""The numbers of a report: fine-tuning results per task and per method, the best trial of each sweep
study, pre-training curves and summaries, and their Markdown tables."""

from __future__ import annotations

import statistics
from collections import defaultdict

from mttl.report.runs import Run
from mttl.run_folder import aggregate

EVALUATION_ORDER = ["zero_shot", "best_val", "test"]
MARKDOWN_ROW_CAP = 50


def evaluation_key(evaluation: str) -> tuple:
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
        for evaluation in sorted({r["evaluation"] for r in rows}, key=evaluation_key):
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
            complete = [t for t in trials
                        if t.get("status", "complete") == "complete" and t.get("mean") not in (None, "")]
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


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def markdown_table(rows: list[dict], columns: list[str] | None = None, cap: int = MARKDOWN_ROW_CAP) -> str:
    if not rows:
        return "_(none)_\n"
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)).replace("|", "\\|") for c in columns) + " |" for row in rows[:cap]]
    if len(rows) > cap:
        lines.append(f"\n_{len(rows) - cap} more rows in the CSV file._")
    return "\n".join(lines) + "\n"


def wide_table(per_task: list[dict], evaluation: str, metric: str) -> list[dict]:
    """task rows x method columns of per-task medians, for one evaluation and metric."""
    methods = list(dict.fromkeys(r["method"] for r in per_task
                                 if r["evaluation"] == evaluation and r["metric"] == metric))
    table = defaultdict(dict)
    for row in per_task:
        if row["evaluation"] == evaluation and row["metric"] == metric:
            table[row["task"]][row["method"]] = row["median"]
    return [{"task": task, **{m: table[task].get(m, "") for m in methods}} for task in sorted(table)]

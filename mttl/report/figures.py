"""The pictures of a report (matplotlib, headless): learning curves and routing heatmaps."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from mttl.report.routing import Routing
from mttl.report.runs import Run
from mttl.report.tables import series

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

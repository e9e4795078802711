"""Does a run's routing follow the primitives each synthetic task is built from? The skills study's
measure (`benchmarks/study.py`, docs/results.md), shown by `mttl report` for runs on the synthetic suite."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np

from mttl.report.routing import Routing
from mttl.report.runs import Run
from mttl.run_folder import read_json

def synthetic_manifest(run: Run) -> dict | None:
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

"""Few-shot data of one held-out task: the k training rows for a seed, its validation and test rows.

`fewshot_split(data_dir, task, k, seed)` returns the same rows for the same arguments. The unit
drawn is an instance: one row, or for a T0 task (manifest `rows_per_instance` > 1) every
(instance, template) rendering of it, so k shots are k instances (`group_instances`).
- train: the prepared `fewshot_k<k>_seed<seed>` split when the source shipped one (T-Few files);
  else k instances drawn by `numpy.random.default_rng(seed)` from the largest prepared split of
  that seed with more instances (ANLI's 50-shot files give the reference's 32 shots); else k
  instances drawn the same way from the task's `train` split, or from its `validation` pool when
  it has no `train` split (NI held-out tasks). Instances are ordered by (instance_id, source)
  first, so the draw does not depend on how the rows were laid out in files.
- validation: from the task's `validation` rows minus the drawn ones, when the task has no
  separate `train` split, k instances drawn by `default_rng([seed, 1])` (the reference's NI
  protocol: the k instances after the training ones, not the whole remaining pool); else the
  whole `validation` split; the `test` rows when there is none (T0: val == test).
- test: the task's `test` rows, else its `validation` rows (the T-Few protocol, where both are
  the original validation set).
Rows are dicts of the shard columns (`shards.SCHEMA`). `eval_rows` returns one split of a task.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict

import numpy as np

from mttl.data.shards import read_manifest, read_rows
from mttl.errors import ConfigError, DataError


def fewshot_split_name(k: int, seed: int) -> str:
    return f"fewshot_k{k}_seed{seed}"


FEWSHOT_SPLIT = re.compile(r"fewshot_k(\d+)_seed(-?\d+)")


def _identity(row: dict) -> tuple:
    return row["instance_id"], row["source"], row["target"]


def instance_key(row: dict, templated: bool) -> str:
    """The instance a row renders: T0 held-out rows are `<task>/<split>/<index>/<template id>`."""
    return row["instance_id"].rsplit("/", 1)[0] if templated else row["instance_id"]


def group_instances(rows: list[dict], templated: bool) -> list[list[dict]]:
    """Rows grouped by instance, in order of first appearance (one row per group unless templated)."""
    if not templated:
        return [[row] for row in rows]
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(instance_key(row, True), []).append(row)
    return list(groups.values())


def _task_rows(data_dir, task: str) -> tuple[dict[str, list[dict]], bool]:
    """(rows by split, whether a row is one template of an instance) of `task`."""
    manifest = read_manifest(data_dir)
    if task not in manifest["tasks"]:
        raise DataError(f"task '{task}' is not in {os.path.join(data_dir, 'manifest.json')} "
                        f"(it has e.g. {sorted(manifest['tasks'])[:5]}); fix finetune_task_name")
    by_split = defaultdict(list)
    for row in read_rows(data_dir, tasks=[task]).to_pylist():
        by_split[row["split"]].append(row)
    return by_split, int(manifest["tasks"][task].get("rows_per_instance") or 1) > 1


def _draw(rows: list[dict], k: int, rng: np.random.Generator, templated: bool) -> list[dict]:
    """k instances of `rows` (ordered by (instance_id, source) first), all rows of each."""
    groups = sorted(group_instances(sorted(rows, key=lambda r: (r["instance_id"], r["source"])), templated),
                    key=lambda g: (instance_key(g[0], templated), g[0]["source"]))
    return [row for i in rng.choice(len(groups), size=k, replace=False) for row in groups[i]]


def fewshot_split(data_dir: str | os.PathLike, task: str, k: int,
                  seed: int) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, validation, test) rows of `task` for k shots and `seed` (see the module docstring)."""
    if k < 1:
        raise ConfigError(f"k={k} shots for task '{task}': give at least 1")
    rows, templated = _task_rows(data_dir, task)

    def n_instances(name: str) -> int:
        return len(group_instances(rows.get(name, []), templated))

    prepared = rows.get(fewshot_split_name(k, seed))
    larger = sorted((n_instances(name), name) for name in rows
                    if (m := FEWSHOT_SPLIT.fullmatch(name)) and int(m.group(2)) == seed and n_instances(name) > k)
    if prepared:
        train, pool_name = prepared, None
    elif larger:
        pool_name = larger[0][1]
        train = _draw(rows[pool_name], k, np.random.default_rng(seed), templated)
    else:
        pool_name = "train" if rows.get("train") else "validation"
        if k > n_instances(pool_name):
            shipped = sorted(name for name in rows if FEWSHOT_SPLIT.fullmatch(name))
            also = f"; its prepared k-shot splits: {shipped}" if shipped else ""
            raise DataError(f"task '{task}': {k} shots asked for seed {seed} but its '{pool_name}' pool has "
                            f"{n_instances(pool_name)} instances in {data_dir}{also}; use k <= "
                            f"{n_instances(pool_name)}, another seed, or prepare more instances")
        train = _draw(rows[pool_name], k, np.random.default_rng(seed), templated)
    drawn = {_identity(row) for row in train}
    validation = [row for row in rows.get("validation", []) if _identity(row) not in drawn]
    if validation and not rows.get("train"):
        # the rest of the pool the shots came from: k instances of it, as the reference's NI dev set
        n_val = min(k, len(group_instances(validation, templated)))
        validation = _draw(validation, n_val, np.random.default_rng([seed, 1]), templated)
    test = rows.get("test") or rows.get("validation", [])
    if not validation:
        validation = rows.get("test", [])
    if not validation or not test:
        raise DataError(f"task '{task}' in {data_dir} has no rows to evaluate on (splits: {sorted(rows)}); "
                        "it needs a 'validation' or 'test' split")
    return train, validation, test


def eval_rows(data_dir: str | os.PathLike, task: str, split: str) -> list[dict]:
    """All rows of one split of `task`; DataError listing the task's splits when it has none there."""
    rows, _ = _task_rows(data_dir, task)
    if not rows.get(split):
        raise DataError(f"task '{task}' has no '{split}' rows in {data_dir} (it has {sorted(rows)})")
    return rows[split]

"""Few-shot data of one held-out task: the k training rows for a seed, its validation and test rows.

`fewshot_split(data_dir, task, k, seed)` returns the same rows for the same arguments:
- train: the prepared `fewshot_k<k>_seed<seed>` split when the source shipped one (T-Few files),
  else k rows drawn without replacement by `numpy.random.default_rng(seed)` from the task's
  `train` split, or from its `validation` pool when it has no `train` split (NI held-out tasks).
  The pool is ordered by (instance_id, source) first, so the draw does not depend on how the
  rows were laid out in files.
- validation: the task's `validation` rows minus the drawn ones; the `test` rows when none remain.
- test: the task's `test` rows, else its `validation` rows (the T-Few protocol, where both are
  the original validation set).
Rows are dicts of the shard columns (`shards.SCHEMA`). `eval_rows` returns one split of a task.
"""

from __future__ import annotations

import os
from collections import defaultdict

import numpy as np

from mttl.data.shards import read_manifest, read_rows
from mttl.errors import ConfigError, DataError


def fewshot_split_name(k: int, seed: int) -> str:
    return f"fewshot_k{k}_seed{seed}"


def _identity(row: dict) -> tuple:
    return row["instance_id"], row["source"], row["target"]


def _task_rows(data_dir, task: str) -> dict[str, list[dict]]:
    manifest = read_manifest(data_dir)
    if task not in manifest["tasks"]:
        raise DataError(f"task '{task}' is not in {os.path.join(data_dir, 'manifest.json')} "
                        f"(it has e.g. {sorted(manifest['tasks'])[:5]}); fix finetune_task_name")
    by_split = defaultdict(list)
    for row in read_rows(data_dir, tasks=[task]).to_pylist():
        by_split[row["split"]].append(row)
    return by_split


def fewshot_split(data_dir: str | os.PathLike, task: str, k: int, seed: int) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, validation, test) rows of `task` for k shots and `seed` (see the module docstring)."""
    if k < 1:
        raise ConfigError(f"k={k} shots for task '{task}': give at least 1")
    rows = _task_rows(data_dir, task)
    prepared = rows.get(fewshot_split_name(k, seed))
    if prepared:
        train = prepared
    else:
        pool_name = "train" if rows.get("train") else "validation"
        pool = sorted(rows.get(pool_name, []), key=lambda r: (r["instance_id"], r["source"]))
        if k > len(pool):
            raise DataError(f"task '{task}': {k} shots asked but its '{pool_name}' pool has {len(pool)} rows "
                            f"in {data_dir}; use k <= {len(pool)} or prepare more instances")
        picks = np.random.default_rng(seed).choice(len(pool), size=k, replace=False)
        train = [pool[i] for i in picks]
    drawn = {_identity(row) for row in train}
    validation = [row for row in rows.get("validation", []) if _identity(row) not in drawn]
    test = rows.get("test") or rows.get("validation", [])
    if not validation:
        validation = rows.get("test", [])
    if not validation or not test:
        raise DataError(f"task '{task}' in {data_dir} has no rows to evaluate on (splits: {sorted(rows)}); "
                        "it needs a 'validation' or 'test' split")
    return train, validation, test


def eval_rows(data_dir: str | os.PathLike, task: str, split: str) -> list[dict]:
    """All rows of one split of `task`; DataError listing the task's splits when it has none there."""
    rows = _task_rows(data_dir, task)
    if not rows.get(split):
        raise DataError(f"task '{task}' has no '{split}' rows in {data_dir} (it has {sorted(rows)})")
    return rows[split]

"""Few-shot splits of held-out tasks on real NI shards: seeded draws, pools, prepared k-shot splits."""

from __future__ import annotations

import numpy as np
import pytest

from mttl.data.fewshot import eval_rows, fewshot_split
from mttl.data.shards import read_rows, write_prepared
from mttl.errors import DataError
from test_stream import TEST_TASKS, TRAIN_TASKS, ni_dir  # noqa: F401  (module fixture: real NI shards)


def ids(rows) -> list[str]:
    return [r["instance_id"] for r in rows]


def split_rows(data_dir, task, split) -> list[dict]:
    table = read_rows(data_dir, tasks=[task], splits=[split])
    return table.to_pylist()


def test_held_out_task_draws_from_validation_pool(ni_dir):
    task = TEST_TASKS[0]
    pool, test = split_rows(ni_dir, task, "validation"), split_rows(ni_dir, task, "test")
    assert len(pool) == 27 and len(test) == 100
    train, validation, test_rows = fewshot_split(ni_dir, task, 8, 13)
    assert len(set(ids(train))) == 8 and set(ids(train)) <= set(ids(pool))
    assert ids(test_rows) == ids(test)
    # the documented draw: default_rng(seed) picks k of the pool ordered by (instance_id, source)
    ordered = sorted(pool, key=lambda r: (r["instance_id"], r["source"]))
    assert ids(train) == [ordered[i]["instance_id"] for i in np.random.default_rng(13).choice(27, 8, replace=False)]
    # validation: k of the rest (the reference's NI dev set of k instances), not all 19 left
    rest = [r for r in ordered if r["instance_id"] not in set(ids(train))]
    assert len(validation) == 8 and not set(ids(validation)) & set(ids(train))
    picks = np.random.default_rng([13, 1]).choice(19, 8, replace=False)
    assert ids(validation) == [rest[i]["instance_id"] for i in picks]
    assert set(train[0]) == {"task_name", "task_id", "split", "source", "target", "references",
                             "answer_choices", "label", "instance_id"}


def test_same_arguments_same_rows_other_seeds_other_rows(ni_dir):
    task = TEST_TASKS[1]
    first = fewshot_split(ni_dir, task, 16, 42)
    assert fewshot_split(ni_dir, task, 16, 42) == first
    others = [ids(fewshot_split(ni_dir, task, 16, seed)[0]) for seed in (13, 58)]
    assert all(set(o) != set(ids(first[0])) for o in others) and others[0] != others[1]


def test_train_task_draws_from_train_and_keeps_validation(ni_dir):
    task = TRAIN_TASKS[0]
    train, validation, test = fewshot_split(ni_dir, task, 5, 0)
    assert set(ids(train)) <= set(ids(split_rows(ni_dir, task, "train")))
    assert ids(validation) == ids(split_rows(ni_dir, task, "validation"))
    assert ids(test) == ids(validation)  # no test split: the validation rows serve as test


def test_k_beyond_pool_names_task_and_size(ni_dir):
    with pytest.raises(DataError, match=f"{TEST_TASKS[0]}.*28 shots.*'validation' pool has 27 instances"):
        fewshot_split(ni_dir, TEST_TASKS[0], 28, 0)
    with pytest.raises(DataError, match="task_missing"):
        fewshot_split(ni_dir, "task_missing", 4, 0)


def test_prepared_fewshot_split_is_used_as_is(ni_dir, tmp_path):
    """A source that ships k-shot files (T-Few) writes them as `fewshot_k<k>_seed<seed>`."""
    task = TEST_TASKS[0]
    rows = read_rows(ni_dir, tasks=[task]).to_pylist()
    shipped = [dict(r, split="fewshot_k4_seed7") for r in rows if r["split"] == "validation"][-4:]
    write_prepared(tmp_path / "fs", rows + shipped, {task: {"role": "test"}}, source="test", args={})
    train, validation, test = fewshot_split(tmp_path / "fs", task, 4, 7)
    assert ids(train) == ids(shipped)
    rest = set(ids(r for r in rows if r["split"] == "validation")) - set(ids(shipped))
    assert len(validation) == 4 and set(ids(validation)) <= rest  # k instances of the rest of the pool
    assert len(test) == 100
    assert len(fewshot_split(tmp_path / "fs", task, 4, 8)[0]) == 4  # other seeds are drawn


def test_eval_rows(ni_dir):
    assert ids(eval_rows(ni_dir, TEST_TASKS[0], "test")) == ids(split_rows(ni_dir, TEST_TASKS[0], "test"))
    with pytest.raises(DataError, match=f"{TRAIN_TASKS[0]}.*no 'test' rows.*'train', 'validation'"):
        eval_rows(ni_dir, TRAIN_TASKS[0], "test")

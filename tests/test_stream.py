"""Streaming real NI shards with Ray Data: task selection, mixing, tokenization, batches, 2 workers.

Expected values come from the written formulas, explicit loops here, pyarrow reads of the same
shards and a transformers tokenizer called directly.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

from mttl.data import stream
from mttl.data.ni import prepare_ni
from mttl.data.shards import read_manifest
from mttl.errors import ConfigError, DataError
from conftest import shared_path

TRAIN_TASKS = ["task691_mmmlu_answer_generation_college_physics", "task859_prost_question_generation"]
TEST_TASKS = ["task121_zest_text_modification", "task1562_zest_text_modification"]
MAX_IN, MAX_OUT = 64, 16


@pytest.fixture(scope="module")
def ni_dir(tmp_path_factory) -> Path:
    """Four real NI tasks prepared by mttl.data.ni: train tasks 24+4 rows, test tasks with 27/42-row pools."""
    ni = shared_path("data", "natural-instructions")
    source = tmp_path_factory.mktemp("ni_source")
    (source / "tasks").symlink_to(ni / "tasks")
    (source / "splits" / "mini").mkdir(parents=True)
    (source / "splits" / "mini" / "train_tasks.txt").write_text("\n".join(TRAIN_TASKS) + "\n")
    (source / "splits" / "mini" / "test_tasks.txt").write_text("\n".join(TEST_TASKS) + "\n")
    out = tmp_path_factory.mktemp("ni_prepared") / "ni"
    prepare_ni(source, out, split="mini", max_instances_per_task=24, validation_per_task=4,
               use_task_descriptions=False, seed=7)
    return out


@pytest.fixture(scope="module")
def t5(t5_tokenizer_path):
    return AutoTokenizer.from_pretrained(str(t5_tokenizer_path))


def shard_rows(data_dir: Path, split: str) -> list[dict]:
    """Rows of one split read straight from the Parquet files listed in the manifest."""
    manifest = read_manifest(data_dir)
    rows = []
    for entry in manifest["files"]:
        rows += [r for r in pq.read_table(data_dir / entry["path"]).to_pylist() if r["split"] == split]
    return rows


def expected_examples(rows, tokenizer, table) -> Counter:
    """(input ids, label ids, routing row) of each row, tokenized here with truncation + EOS."""
    out = Counter()
    for row in rows:
        ids = tokenizer(row["source"], max_length=MAX_IN, truncation=True).input_ids
        labels = tokenizer(row["target"], max_length=MAX_OUT, truncation=True).input_ids
        out[(tuple(ids), tuple(labels), table[row["task_name"]])] += 1
    return out


def as_examples(records) -> Counter:
    return Counter((tuple(r["input_ids"]), tuple(r["labels"]), int(r["task_ids"])) for r in records)


def build(ni_dir, t5_tokenizer_path, tasks, split, **kwargs):
    """build_dataset with the T5 vocabulary and this module's length limits."""
    return stream.build_dataset(ni_dir, split=split, tasks=tasks, task_to_row=stream.task_table(tasks),
                                tokenizer_spec=str(t5_tokenizer_path), max_input_length=MAX_IN,
                                max_output_length=MAX_OUT, **kwargs)


def test_select_tasks_by_role_and_name(ni_dir):
    manifest = read_manifest(ni_dir)
    assert stream.select_tasks(manifest) == sorted(TRAIN_TASKS)
    assert stream.select_tasks(manifest, roles=("test",)) == sorted(TEST_TASKS)
    assert stream.select_tasks(manifest, roles=("train", "test")) == sorted(TRAIN_TASKS + TEST_TASKS)
    assert (stream.select_tasks(manifest, names=[TEST_TASKS[1], TRAIN_TASKS[0]])
            == sorted([TEST_TASKS[1], TRAIN_TASKS[0]]))
    with pytest.raises(DataError, match="task_nope.*task_zzz"):
        stream.select_tasks(manifest, names=["task_zzz", TRAIN_TASKS[0], "task_nope"])
    with pytest.raises(DataError, match="no task with role"):
        stream.select_tasks(manifest, roles=("warmup",))
    assert stream.task_table(["b", "a", "c"]) == {"b": 0, "a": 1, "c": 2}


def test_mixing_counts_follow_the_formulas():
    sizes = {"a": 4, "b": 1000, "c": 27, "d": 0}
    assert stream.mixing_counts(sizes, None, cap=10) == sizes
    assert stream.mixing_counts(sizes, "proportional", cap=100) == {"a": 4, "b": 100, "c": 27, "d": 0}
    # uniform: every non-empty task gets the mean capped size
    assert stream.mixing_counts(sizes, "uniform", cap=100) == {"a": 44, "b": 44, "c": 44, "d": 0}
    rates = {name: min(n, 100) ** (1 / 3) for name, n in sizes.items()}
    total = 4 + 100 + 27
    expected = {name: round(total * r / sum(rates.values())) for name, r in rates.items()}
    assert stream.mixing_counts(sizes, "temperature", cap=100, temperature=3) == expected
    assert expected["a"] > 4 and expected["b"] < 100  # temperature flattens the mixture
    with pytest.raises(ConfigError, match="task_mixing"):
        stream.mixing_counts(sizes, "bogus", cap=10)


def test_bad_input_fails_in_the_driver_with_one_line(ni_dir, t5_tokenizer_path, tmp_path):
    tasks = sorted(TRAIN_TASKS)
    with pytest.raises(DataError, match="task_zzz.*manifest.json"):
        build(ni_dir, t5_tokenizer_path, tasks + ["task_zzz"], "train")
    with pytest.raises(DataError, match="no rows in split 'test'"):
        build(ni_dir, t5_tokenizer_path, tasks, "test")
    with pytest.raises(ConfigError, match="task_mixing='often'"):
        build(ni_dir, t5_tokenizer_path, tasks, "train", mixing="often")
    with pytest.raises(ConfigError, match="no-tokenizer.*does not exist"):
        build(ni_dir, tmp_path / "no-tokenizer", tasks, "train")
    with pytest.raises(DataError, match="manifest.json.*not found"):
        build(tmp_path, t5_tokenizer_path, tasks, "train")


@pytest.fixture(scope="module")
def all_validation_rows(ray_cluster, ni_dir, t5_tokenizer_path):
    """Every validation row of the four tasks once (sizes 4, 4, 27, 42)."""
    return build(ni_dir, t5_tokenizer_path, sorted(TRAIN_TASKS + TEST_TASKS), "validation", mixing=None)


def test_every_row_once_tokenized_like_the_tokenizer(all_validation_rows, ni_dir, t5):
    from ray.data.dataset import MaterializedDataset

    # tokenized once: epochs read the materialized blocks, they do not run the tokenizer again
    assert isinstance(all_validation_rows, MaterializedDataset)
    assert all_validation_rows.schema().names == ["input_ids", "labels", "task_ids"]
    records = all_validation_rows.take_all()
    table = stream.task_table(sorted(TRAIN_TASKS + TEST_TASKS))
    assert as_examples(records) == expected_examples(shard_rows(ni_dir, "validation"), t5, table)
    assert all(r["input_ids"][-1] == t5.eos_token_id and len(r["input_ids"]) <= MAX_IN for r in records)
    assert all(r["labels"][-1] == t5.eos_token_id and len(r["labels"]) <= MAX_OUT for r in records)
    assert max(len(r["input_ids"]) for r in records) == MAX_IN  # some prompts really are truncated


def check_mixture(got: Counter, rows: list[dict], t5, tasks: list[str], want: dict[str, int]) -> None:
    """Each task contributes want[task] rows: all its rows q times, plus r distinct rows once more."""
    table = stream.task_table(tasks)
    for name in tasks:
        own = [r for r in rows if r["task_name"] == name]
        source = expected_examples(own, t5, table)
        drawn = Counter({key: n for key, n in got.items() if key[2] == table[name]})
        assert sum(drawn.values()) == want[name], name
        full_copies, extra = divmod(want[name], len(own))
        beyond = drawn - Counter({key: n * full_copies for key, n in source.items()})
        assert beyond <= source and sum(beyond.values()) == extra, name


@pytest.mark.parametrize("mixing, cap", [("uniform", 100), ("temperature", 100)])
def test_upsampling_mixtures_draw_exact_counts(ray_cluster, ni_dir, t5, t5_tokenizer_path, mixing, cap):
    tasks = sorted(TRAIN_TASKS + TEST_TASKS)
    rows = shard_rows(ni_dir, "validation")
    want = stream.mixing_counts(dict(Counter(r["task_name"] for r in rows)), mixing, cap=cap, temperature=2.0)
    assert want[TRAIN_TASKS[0]] > 4  # the 4-row tasks really are upsampled
    got = as_examples(build(ni_dir, t5_tokenizer_path, tasks, "validation", mixing=mixing, mixing_cap=cap,
                            seed=0).take_all())
    check_mixture(got, rows, t5, tasks, want)


def test_capped_sample_is_seeded(ray_cluster, ni_dir, t5, t5_tokenizer_path):
    tasks = sorted(TRAIN_TASKS + TEST_TASKS)
    rows = shard_rows(ni_dir, "validation")
    want = {name: min(n, 20) for name, n in Counter(r["task_name"] for r in rows).items()}
    runs = [as_examples(build(ni_dir, t5_tokenizer_path, tasks, "validation", mixing="proportional",
                              mixing_cap=20, seed=seed).take_all()) for seed in (0, 1)]
    for got in runs:
        check_mixture(got, rows, t5, tasks, want)
    assert runs[0] != runs[1]  # a different seed draws different rows (same seed: see the 2-worker test)


def test_a_driver_reuses_its_last_dataset_only_while_nothing_changed(ray_cluster, ni_dir, t5_tokenizer_path, tmp_path):
    """The same build twice is one build; another seed, a re-prepared folder or another split is not."""
    import shutil

    tasks = sorted(TEST_TASKS)
    data = tmp_path / "ni"
    shutil.copytree(ni_dir, data)

    def reuse(split="validation", seed=0):
        return stream.reuse_or_build_dataset(data, split=split, tasks=tasks, task_to_row=stream.task_table(tasks),
                                             tokenizer_spec=str(t5_tokenizer_path), max_input_length=MAX_IN,
                                             max_output_length=MAX_OUT, seed=seed)

    first = reuse()
    assert reuse() is first
    other_seed = reuse(seed=1)
    assert other_seed is not first and reuse(seed=1) is other_seed
    test = reuse(split="test")
    assert reuse(seed=1) is other_seed  # one dataset kept per split
    manifest = data / "manifest.json"
    manifest.write_text(manifest.read_text() + " ")  # prepared again: the shards may differ
    assert reuse(seed=1) is not other_seed
    assert reuse(split="test") is not test


def test_parquet_footer_readers_follow_the_file_count(monkeypatch):
    """Ray Data starts 32 footer-reader actors per read by default; a build asks for one per 10 files."""
    from ray.data._internal.datasource_v2.formats.parquet.footer_file_indexer import FooterFileIndexer

    def pool_size(n_files: int) -> int:
        with stream._footer_readers_for(n_files):
            return FooterFileIndexer(ignore_missing_paths=False)._num_actors

    monkeypatch.delenv("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", raising=False)
    assert [pool_size(n) for n in (1, 3, 10, 11, 1000)] == [1, 1, 1, 2, 32]
    assert "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS" not in os.environ
    monkeypatch.setenv("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "5")  # the user's own setting wins
    assert pool_size(3) == 5


def test_collate_pads_like_an_explicit_loop():
    batch = {"input_ids": np.array([np.array([5, 6, 1], np.int32), np.array([7, 1], np.int32)], dtype=object),
             "labels": np.array([np.array([9, 1], np.int32), np.array([3, 4, 8, 1], np.int32)], dtype=object),
             "task_ids": np.array([2, 0])}
    out = stream.collate(batch, pad_id=0)
    want_inputs, want_mask, want_labels = [], [], []
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        want_inputs.append(list(ids) + [0] * (3 - len(ids)))
        want_mask.append([1] * len(ids) + [0] * (3 - len(ids)))
        want_labels.append(list(labels) + [-100] * (4 - len(labels)))
    assert out["input_ids"].tolist() == want_inputs and out["input_ids"].dtype == torch.long
    assert out["attention_mask"].tolist() == want_mask
    assert out["labels"].tolist() == want_labels
    assert out["task_ids"].tolist() == [2, 0] and out["task_ids"].dtype == torch.long


def _epoch_rows(iterator, **kwargs) -> list[tuple]:
    rows = []
    for batch in stream.iter_epoch(iterator, pad_id=0, **kwargs):
        for ids, mask, task in zip(batch["input_ids"], batch["attention_mask"], batch["task_ids"]):
            rows.append((tuple(ids[mask.bool()].tolist()), int(task)))
    return rows


def test_epochs_are_seeded_and_skip_resumes(all_validation_rows):
    dataset = all_validation_rows
    iterator = dataset.iterator()
    args = dict(batch_size=8, seed=3, shuffle_buffer_rows=32)
    epoch0 = _epoch_rows(iterator, epoch=0, **args)
    assert len(epoch0) == dataset.count() and _epoch_rows(iterator, epoch=0, **args) == epoch0
    epoch1 = _epoch_rows(iterator, epoch=1, **args)
    assert sorted(epoch1) == sorted(epoch0) and epoch1 != epoch0
    assert _epoch_rows(iterator, epoch=1, skip_batches=3, **args) == epoch1[3 * 8:]
    assert stream.batches_per_epoch(77, num_workers=2, batch_size=8) == math.ceil(38 / 8)


def _worker_loop(config):
    """Each worker writes the rows it sees in two epochs, as (input ids, task id), to a JSON file."""
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    seen = {str(epoch): _epoch_rows(shard, batch_size=4, epoch=epoch, seed=11) for epoch in (0, 1)}
    rank = ray.train.get_context().get_world_rank()
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(seen))


def _fit(dataset, out: Path, storage: Path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out.mkdir()
    TorchTrainer(_worker_loop, train_loop_config={"out": str(out)},
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                 datasets={"train": dataset}, dataset_config=stream.data_config(),
                 run_config=RunConfig(name=out.name, storage_path=str(storage))).fit()
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow
def test_two_train_workers_get_disjoint_rows_covering_the_dataset(ray_cluster, ni_dir, t5, t5_tokenizer_path, tmp_path):
    # the worker loop lives in this test module, which Ray workers cannot import: ship it by value
    ray_cluster.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    tasks = sorted(TRAIN_TASKS)
    table = stream.task_table(tasks)
    mixed = dict(split="train", mixing="proportional", mixing_cap=20, seed=5)  # 20 of 24 rows per task
    dataset = build(ni_dir, t5_tokenizer_path, tasks, **mixed)
    examples = as_examples(dataset.take_all())
    check_mixture(examples, shard_rows(ni_dir, "train"), t5, tasks, {name: 20 for name in tasks})
    want = Counter((ids, task) for ids, _, task in examples.elements())
    first = _fit(dataset, tmp_path / "run1", tmp_path / "ray")
    for epoch in ("0", "1"):
        per_worker = [Counter((tuple(ids), task) for ids, task in ranks[epoch]) for ranks in first]
        assert per_worker[0] + per_worker[1] == want  # disjoint, and together every row once
        assert sum(per_worker[0].values()) == sum(per_worker[1].values())
    assert {task for ranks in first for _, task in ranks["0"]} == set(table.values())
    assert all(ranks["0"] != ranks["1"] for ranks in first)  # reshuffled per epoch
    # a restarted run rebuilds the dataset: each worker sees the same rows in the same order again
    assert _fit(build(ni_dir, t5_tokenizer_path, tasks, **mixed), tmp_path / "run2", tmp_path / "ray") == first

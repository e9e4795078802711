"""CrossFit: TSV files and partitions into train tasks, few-shot splits of test tasks, prompts."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from mttl.data.shards import read_rows
from mttl.data.xfit import prepare_xfit
from mttl.errors import DataError

SEEDS = (100, 13, 21)


def write_xfit(root: Path, k: int = 4) -> tuple[Path, Path]:
    """Task folders in the CrossFit layout (under the build's extra `data/` level) + a partition file."""
    data = root / "data"
    for task in ("glue-sst2", "ag_news", "quoref", "dev_only"):
        (data / task).mkdir(parents=True)
        for seed in SEEDS:
            prefix = f"{task}_{k}_{seed}"
            for kind, n in (("train", k), ("dev", k), ("test", 6)):
                lines = []
                for i in range(n):
                    tag = "t" if kind == "test" else f"s{seed}"
                    outputs = [f"ans {kind} {i}"] + ([f"alt {i}"] if i == 0 else [])
                    lines.append("\t".join([f"{task} {kind} {tag} {i}", *outputs]))
                (data / task / f"{prefix}_{kind}.tsv").write_text("\n".join(lines) + "\n")
    partition = root / "partition.json"
    partition.write_text(json.dumps({"train": ["glue-sst2", "ag_news"], "dev": ["dev_only"], "test": ["quoref"]}))
    return root, partition


def test_train_and_test_tasks_become_the_documented_splits(tmp_path):
    source, partition = write_xfit(tmp_path / "xfit")
    manifest = prepare_xfit(source, tmp_path / "out", partition=partition)
    assert {n: m["role"] for n, m in manifest["tasks"].items()} == {"ag_news": "train", "glue-sst2": "train",
                                                                    "quoref": "test"}
    assert manifest["skipped"]["dev_tasks"] == ["dev_only"]
    # prefixes in name order: seed 100 sorts before 13 and 21
    assert manifest["tasks"]["quoref"]["prefixes"] == ["quoref_4_100", "quoref_4_13", "quoref_4_21"]
    assert manifest["tasks"]["ag_news"]["rows"] == {"train": 4 * 3, "validation": 4 * 3}
    assert manifest["tasks"]["quoref"]["rows"] == {"fewshot_k4_seed100": 4, "fewshot_k4_seed13": 4,
                                                   "fewshot_k4_seed21": 4, "test": 6, "validation": 4}
    rows = read_rows(tmp_path / "out").to_pylist()
    by_id = {(r["task_name"], r["split"], r["instance_id"]): r for r in rows}
    row = by_id[("quoref", "fewshot_k4_seed13", "quoref_4_13_train-0")]
    assert row["source"] == "[quoref] quoref train s13 0"
    assert row["target"] == "ans train 0" and row["references"] == ["ans train 0", "alt 0"]
    validation = [r["source"] for r in rows if r["task_name"] == "quoref" and r["split"] == "validation"]
    assert validation == [f"[quoref] quoref dev s100 {i}" for i in range(4)]
    train_sources = Counter(r["source"].split()[-2] for r in rows
                            if r["task_name"] == "ag_news" and r["split"] == "train")
    assert train_sources == {f"s{seed}": 4 for seed in SEEDS}
    assert not any(r["task_name"] == "ag_news" and r["split"] == "test" for r in rows)


def test_task_descriptions_lead_the_prompt(tmp_path):
    source, partition = write_xfit(tmp_path / "xfit")
    descriptions = tmp_path / "desc.json"
    descriptions.write_text(json.dumps({"glue-sst2": "Classify the sentiment.", "ag_news": "Pick the news topic",
                                        "quoref": "Answer the question"}))
    prepare_xfit(source / "data", tmp_path / "out", partition=partition, descriptions=descriptions,
                 use_task_descriptions=True)
    sources = {r["instance_id"]: r["source"] for r in read_rows(tmp_path / "out", tasks=["glue-sst2", "ag_news"],
                                                                 splits=["train"]).to_pylist()}
    assert sources["glue-sst2_4_21_train-2"] == "Classify the sentiment. [glue-sst2] glue-sst2 train s21 2"
    assert sources["ag_news_4_13_train-0"] == "Pick the news topic. [ag_news] ag_news train s13 0"

    descriptions.write_text(json.dumps({"glue-sst2": "only this one"}))
    with pytest.raises(DataError, match="no description for task"):
        prepare_xfit(source, tmp_path / "out2", partition=partition, descriptions=descriptions,
                     use_task_descriptions=True)
    assert not (tmp_path / "out2").exists()


def test_missing_partition_tasks_fail_or_are_skipped(tmp_path):
    source, partition = write_xfit(tmp_path / "xfit")
    partition.write_text(json.dumps({"train": ["ag_news", "gone_a"], "test": ["quoref", "gone_b"]}))
    with pytest.raises(DataError, match="2 task.*gone_a, gone_b.*--allow-missing-tasks"):
        prepare_xfit(source, tmp_path / "out", partition=partition)
    assert not (tmp_path / "out").exists()
    manifest = prepare_xfit(source, tmp_path / "out", partition=partition, allow_missing_tasks=True)
    assert set(manifest["tasks"]) == {"ag_news", "quoref"}
    assert manifest["skipped"]["missing_tasks"] == ["gone_a", "gone_b"]


def test_shipped_random_partition_is_the_reference_split(tmp_path):
    """data/xfit/random.json against REFERENCE.md §4.4: 160 tasks, 120/20/20, and its 20 test tasks."""
    from conftest import shared_path
    from mttl.data.xfit import PARTITION_DIR, resolve_partition

    reference = shared_path("REFERENCE.md").read_text(encoding="utf-8")
    line = next(x for x in reference.splitlines() if "configs use `random.json`" in x)
    listed = line.split("Test tasks:", 1)[1].split(". ", 1)[0]
    reference_test = {name.strip() for name in listed.split(",")}
    assert len(reference_test) == 20 and "(all 160, train 120, dev 20, test 20)" in line

    shipped = json.loads((PARTITION_DIR / "random.json").read_text())
    assert {k: len(v) for k, v in shipped.items()} == {"train": 120, "dev": 20, "test": 20}
    assert len(set().union(*map(set, shipped.values()))) == 160  # the three lists are disjoint
    assert set(shipped["test"]) == reference_test

    # a bare name finds the shipped file; a path is taken as given
    assert resolve_partition("random.json") == PARTITION_DIR / "random.json"
    assert resolve_partition(tmp_path / "random.json") == tmp_path / "random.json"
    source, _ = write_xfit(tmp_path / "xfit")
    manifest = prepare_xfit(source, tmp_path / "out", partition="random.json", allow_missing_tasks=True)
    assert {n: m["role"] for n, m in manifest["tasks"].items()} == {"ag_news": "test", "glue-sst2": "train",
                                                                    "quoref": "test"}

"""Super-NaturalInstructions: prompt layout, splits, both task schemas, truncation, the real subset."""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from conftest import shared_path

from mttl.cli import main
from mttl.data.ni import prepare_ni
from mttl.data.shards import check, read_manifest, read_rows


def write_ni_repo(root: Path) -> Path:
    """A tiny natural-instructions checkout: a current-schema and a 2021-schema train task, one test task."""
    (root / "tasks").mkdir(parents=True)
    (root / "splits" / "default").mkdir(parents=True)
    current = {
        "Definition": ["Reverse the order of the words"], "Categories": ["Rewriting"],
        "Input_language": ["English"], "Output_language": ["English"],
        "Positive Examples": [{"input": "a b", "output": "b a", "explanation": "reversed"},
                              {"input": "c d e", "output": "e d c", "explanation": "reversed"}],
        "Negative Examples": [{"input": "x y", "output": "x y", "explanation": "not reversed"}],
        "Instances": [{"id": f"task001_new-{i:03d}", "input": f"w{i} v{i}",
                       "output": [f"v{i} w{i}", f"V{i} W{i}"] if i % 3 == 0 else [f"v{i} w{i}"]} for i in range(30)],
    }
    legacy = {  # 2021 schema: plain-string Definition, no ids, no language fields
        "Definition": "Copy the input", "Categories": ["Copying"],
        "Positive Examples": [], "Negative Examples": [],
        "Instances": [{"input": f"copy {i}", "output": [f"copy {i}"]} for i in range(12)],
    }
    test = {
        "Definition": ["Say yes or no?"], "Categories": ["Answerability Classification"],
        "Positive Examples": [{"input": "is it?", "output": ["yes"]}], "Negative Examples": [],
        "Instances": [{"id": f"t3-{i}", "input": f"question {i}", "output": ["yes" if i % 2 else "no"]}
                      for i in range(130)],
    }
    for name, task in (("task001_new", current), ("task002_old", legacy), ("task003_test", test)):
        (root / "tasks" / f"{name}.json").write_text(json.dumps(task))
    (root / "splits" / "default" / "train_tasks.txt").write_text("task001_new\ntask002_old\n")
    (root / "splits" / "default" / "test_tasks.txt").write_text("task003_test\n")
    return root


def _by_task_split(table):
    out = defaultdict(list)
    for row in table.to_pylist():
        out[(row["task_name"], row["split"])].append(row)
    return out


def test_prompt_layout_and_references(tmp_path):
    repo = write_ni_repo(tmp_path / "ni")
    prepare_ni(repo, tmp_path / "out", num_pos_examples=1, num_neg_examples=1, add_task_name=True,
               max_instances_per_task=30, validation_per_task=0)
    rows = {r["instance_id"]: r for r in read_rows(tmp_path / "out").to_pylist()}
    row = rows["task001_new-003"]
    assert row["source"] == ("task001_new. Definition: Reverse the order of the words.\n\n"
                             "Positive Example 1 -\nInput: a b.\nOutput: b a.\n\n"
                             "Negative Example 1 -\nInput: x y.\nOutput: x y.\n\n"
                             "Now complete the following example -\nInput: w3 v3.\nOutput:")
    assert row["target"] == "v3 w3" and row["references"] == ["v3 w3", "V3 W3"]
    # 2021 schema: string definition, ids made from the file position; input ending in '?' gets no '.'
    legacy = rows["task002_old-4"]
    assert legacy["source"] == ("task002_old. Definition: Copy the input.\n\n"
                                "Now complete the following example -\nInput: copy 4.\nOutput:")
    assert rows["t3-7"]["source"].endswith("Input: question 7.\nOutput:")
    assert rows["t3-7"]["source"].startswith("task003_test. Definition: Say yes or no?\n\n"
                                             "Positive Example 1 -\nInput: is it?\nOutput: yes.\n\n")

    prepare_ni(repo, tmp_path / "plain", use_task_descriptions=False)
    plain = {r["instance_id"]: r for r in read_rows(tmp_path / "plain").to_pylist()}
    assert plain["t3-7"]["source"] == "Now complete the following example -\nInput: question 7.\nOutput:"


def test_splits_roles_and_seeded_draws(tmp_path):
    repo = write_ni_repo(tmp_path / "ni")
    manifest = prepare_ni(repo, tmp_path / "a", max_instances_per_task=20, validation_per_task=5, seed=1)
    assert {n: (m["role"], m["metric"], m["category"]) for n, m in manifest["tasks"].items()} == {
        "task001_new": ("train", "rouge", "Rewriting"), "task002_old": ("train", "rouge", "Copying"),
        "task003_test": ("test", "rouge", "Answerability Classification")}
    groups = _by_task_split(read_rows(tmp_path / "a"))
    train_ids = {r["instance_id"] for r in groups[("task001_new", "train")]}
    val_ids = {r["instance_id"] for r in groups[("task001_new", "validation")]}
    assert len(train_ids) == 20 and len(val_ids) == 5 and not train_ids & val_ids
    assert train_ids != {f"task001_new-{i:03d}" for i in range(20)}  # drawn, not the first ones
    assert len(groups[("task002_old", "train")]) == 12 and ("task002_old", "validation") not in groups
    # test task: the first 100 instances in file order are the test split, the rest the k-shot pool
    assert [r["instance_id"] for r in groups[("task003_test", "test")]] == [f"t3-{i}" for i in range(100)]
    assert sorted(r["instance_id"] for r in groups[("task003_test", "validation")]) == sorted(
        f"t3-{i}" for i in range(100, 130))
    assert manifest["tasks"]["task003_test"]["rows"] == {"test": 100, "validation": 30}

    prepare_ni(repo, tmp_path / "b", max_instances_per_task=20, validation_per_task=5, seed=1)
    prepare_ni(repo, tmp_path / "c", max_instances_per_task=20, validation_per_task=5, seed=2)
    same = {r["instance_id"] for r in _by_task_split(read_rows(tmp_path / "b"))[("task001_new", "train")]}
    other = {r["instance_id"] for r in _by_task_split(read_rows(tmp_path / "c"))[("task001_new", "train")]}
    assert same == train_ids and other != train_ids


def test_long_inputs_are_cut_keeping_the_output_suffix(tmp_path):
    repo = write_ni_repo(tmp_path / "ni")
    task = json.loads((repo / "tasks" / "task002_old.json").read_text())
    task["Instances"][0]["input"] = " ".join(f"tok{i}" for i in range(500))
    (repo / "tasks" / "task002_old.json").write_text(json.dumps(task))
    prepare_ni(repo, tmp_path / "out", max_input_length=30, num_pos_examples=2)
    rows = {r["instance_id"]: r for r in read_rows(tmp_path / "out").to_pylist()}
    long_prompt = rows["task002_old-0"]["source"]
    head = "Definition: Copy the input.\n\nNow complete the following example -\nInput:"
    assert long_prompt.startswith(head) and long_prompt.endswith(" tok17\nOutput:")  # 11 + 18 + 1 words
    assert len(long_prompt.split()) == 30
    # with both examples this prompt has 39 words, with the first one 27: only that one is shown
    shown = rows["task001_new-000"]["source"]
    assert "Positive Example 1 -" in shown and "Positive Example 2" not in shown
    assert all(len(r["source"].split()) <= 30 and r["source"].endswith("\nOutput:") for r in rows.values())


def test_length_in_tokenizer_tokens(tmp_path, t5_tokenizer_path):
    from transformers import AutoTokenizer

    repo = write_ni_repo(tmp_path / "ni")
    tokenizer = AutoTokenizer.from_pretrained(t5_tokenizer_path)
    for limit in (16, 40):  # 16: every prompt is cut; 40: some fit whole, some lose examples or text
        out = tmp_path / f"out{limit}"
        prepare_ni(repo, out, max_input_length=limit, tokenizer=str(t5_tokenizer_path), num_pos_examples=2)
        sources = read_rows(out, columns=["source"])["source"].to_pylist()
        lengths = [len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in sources]
        assert max(lengths) == limit and all(s.endswith("\nOutput:") for s in sources)
        if limit == 40:
            assert min(lengths) < limit - 8 and any("Positive Example 1" in s for s in sources)


def test_real_subset_available_split(tmp_path):
    source = shared_path("data", "natural-instructions")
    out = tmp_path / "ni"
    argv = ["prepare", "ni", "--source", str(source), "--split", "available", "--out", str(out)]
    assert main(argv) == 0
    manifest = read_manifest(out)
    expected = {line.strip(): role for role in ("train", "test")
                for line in (source / "splits" / "available" / f"{role}_tasks.txt").read_text().splitlines()
                if line.strip()}
    assert len(expected) == 248
    assert {n: m["role"] for n, m in manifest["tasks"].items()} == expected
    assert sorted(m["task_id"] for m in manifest["tasks"].values()) == list(range(248))
    rows = read_rows(out, columns=["task_name", "split"])
    counts = Counter(zip(rows["task_name"].to_pylist(), rows["split"].to_pylist()))
    for name, role in expected.items():
        n_instances = len(json.loads((source / "tasks" / f"{name}.json").read_text())["Instances"])
        if role == "test":
            assert counts[(name, "test")] == 100
            assert counts[(name, "validation")] == n_instances - 100
        else:
            assert counts[(name, "train")] == min(100, n_instances)
            assert counts[(name, "validation")] == min(10, max(n_instances - 100, 0))
    assert check(out) == []

    mtime = os.stat(out / "manifest.json").st_mtime_ns
    assert main(argv) == 0
    assert os.stat(out / "manifest.json").st_mtime_ns == mtime


def test_length_in_bytes_with_the_byte_tokenizer(tmp_path):
    from transformers import ByT5Tokenizer

    repo = write_ni_repo(tmp_path / "ni")
    task = json.loads((repo / "tasks" / "task002_old.json").read_text())
    task["Instances"][0]["input"] = "naïve café " * 30  # multi-byte characters
    (repo / "tasks" / "task002_old.json").write_text(json.dumps(task))
    prepare_ni(repo, tmp_path / "out", max_input_length=120, tokenizer="byte")
    sources = read_rows(tmp_path / "out", columns=["source"])["source"].to_pylist()
    tokenizer = ByT5Tokenizer()
    lengths = [len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in sources]
    assert all(n == len(s.encode("utf-8")) <= 120 for n, s in zip(lengths, sources))
    assert max(lengths) >= 119 and all(s.endswith("\nOutput:") for s in sources)

"""Shard format: manifest contents, atomic replacement, no-op re-runs, check and read_rows."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter

import pyarrow.parquet as pq
import pytest

from mttl.data import shards
from mttl.errors import DataError


def _rows():
    rows = []
    for task in ("zeta", "alpha", "mid"):
        for split, n in (("train", 7), ("validation", 2)):
            for i in range(n):
                rows.append({"task_name": task, "split": split, "source": f"{task} in {i}",
                             "target": f"out {i}", "instance_id": f"{task}-{split}-{i}"})
    rows.append({"task_name": "alpha", "split": "test", "source": "q", "target": "b",
                 "references": ["b", "B"], "answer_choices": ["a", "b"], "label": 1, "instance_id": "mc"})
    return rows


TASKS = {"zeta": {"role": "train", "metric": "rouge"},
         "alpha": {"role": "test", "metric": "accuracy", "category": "qa"},
         "mid": {"role": "train", "metric": "rouge"}}


def _write(out, rows=None, **kwargs):
    return shards.write_prepared(out, _rows() if rows is None else rows, TASKS, source="unit",
                                 args={"k": 1}, **kwargs)


def test_manifest_and_rows_match_what_was_written(tmp_path):
    out = tmp_path / "prep"
    manifest = _write(out, rows_per_file=4)
    assert {n: m["task_id"] for n, m in manifest["tasks"].items()} == {"alpha": 0, "mid": 1, "zeta": 2}
    assert manifest["tasks"]["alpha"]["category"] == "qa" and manifest["tasks"]["alpha"]["role"] == "test"
    expected_counts = Counter((r["task_name"], r["split"]) for r in _rows())
    for name, meta in manifest["tasks"].items():
        assert meta["rows"] == {split: n for (task, split), n in expected_counts.items() if task == name}
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    for entry in manifest["files"]:
        path = out / entry["path"]
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry["rows"] == pq.read_metadata(path).num_rows <= 4
        assert path.parent.name == pq.read_table(path)["split"][0].as_py()
    assert sum(f["rows"] for f in manifest["files"]) == len(_rows())
    assert shards.check(out) == []

    table = shards.read_rows(out)
    assert table.schema == shards.SCHEMA
    by_id = {r["instance_id"]: r for r in table.to_pylist()}
    assert by_id["zeta-train-3"] == {"task_name": "zeta", "task_id": 2, "split": "train", "source": "zeta in 3",
                                     "target": "out 3", "references": ["out 3"], "answer_choices": None,
                                     "label": -1, "instance_id": "zeta-train-3"}
    assert by_id["mc"]["answer_choices"] == ["a", "b"] and by_id["mc"]["label"] == 1
    assert by_id["mc"]["references"] == ["b", "B"]

    picked = shards.read_rows(out, tasks=["mid"], splits=["validation"], columns=["instance_id"])
    assert picked.column_names == ["instance_id"]
    assert sorted(picked["instance_id"].to_pylist()) == ["mid-validation-0", "mid-validation-1"]
    with pytest.raises(DataError, match="nosuch"):
        shards.read_rows(out, tasks=["nosuch"])


def test_task_ids_from_meta_are_kept(tmp_path):
    tasks = {"b": {"task_id": 0}, "a": {}, "c": {"task_id": 1}}
    rows = [{"task_name": t, "split": "train", "source": "s", "target": "t"} for t in tasks]
    manifest = shards.write_prepared(tmp_path / "o", rows + rows[:1], tasks, source="unit", args={})
    assert {n: m["task_id"] for n, m in manifest["tasks"].items()} == {"b": 0, "c": 1, "a": 2}
    # rows without an instance_id get "<task>-<position within the task>"
    assert sorted(shards.read_rows(tmp_path / "o")["instance_id"].to_pylist()) == ["a-0", "b-0", "b-1", "c-0"]


def test_same_fingerprint_is_a_noop_and_a_new_one_replaces(tmp_path):
    src = tmp_path / "raw.txt"
    src.write_text("v1")
    out = tmp_path / "prep"
    fp = shards.fingerprint_sources([src], {"k": 1})
    assert fp == shards.fingerprint_sources([src], {"k": 1}) != shards.fingerprint_sources([src], {"k": 2})
    first = _write(out, fingerprint=fp)
    mtime = (out / "manifest.json").stat().st_mtime_ns
    again = _write(out, fingerprint=fp)
    assert again["unchanged"] is True
    assert (out / "manifest.json").stat().st_mtime_ns == mtime

    src.write_text("v2 changed")
    fp2 = shards.fingerprint_sources([src], {"k": 1})
    assert fp2 != fp
    rows = [r for r in _rows() if r["task_name"] != "mid"]
    second = shards.write_prepared(out, rows, {k: v for k, v in TASKS.items() if k != "mid"}, source="unit",
                                   args={}, fingerprint=fp2)
    assert "unchanged" not in second and set(second["tasks"]) == {"alpha", "zeta"} != set(first["tasks"])
    assert shards.check(out) == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_failure_while_writing_leaves_old_output_untouched(tmp_path):
    out = tmp_path / "prep"
    _write(out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def broken_rows():
        yield from _rows()[:5]
        raise DataError("source went bad")

    with pytest.raises(DataError, match="source went bad"):
        _write(out, rows=broken_rows())
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prep"]

    fresh = tmp_path / "fresh"
    with pytest.raises(DataError, match="lacks"):
        _write(fresh, rows=[{"task_name": "alpha", "split": "train", "source": "x"}])
    assert not fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prep"]


def test_refuses_to_replace_a_folder_that_is_not_prepared(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a prepared folder"):
        _write(out)
    assert (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_check_and_read_rows_report_damaged_shards(tmp_path):
    out = tmp_path / "prep"
    manifest = _write(out, rows_per_file=5)
    first, second, third = (out / manifest["files"][i]["path"] for i in range(3))

    data = first.read_bytes()
    first.write_bytes(data[: len(data) // 2])  # truncated
    second.unlink()
    with open(third, "r+b") as fh:  # same length, flipped bytes in the footer
        fh.seek(-12, 2)
        fh.write(b"\0" * 4)
    problems = shards.check(out)
    assert any(str(first) in p and "sha256" in p for p in problems)
    assert any(str(first) in p and "unreadable Parquet" in p for p in problems)
    assert any(str(second) in p and "missing" in p for p in problems)
    assert any(str(third) in p for p in problems)
    with pytest.raises(DataError, match=str(first)):
        shards.read_rows(out)


def test_check_reports_manifest_row_counts_that_do_not_match(tmp_path):
    out = tmp_path / "prep"
    _write(out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"][0]["rows"] += 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    problems = shards.check(out)
    assert len(problems) == 1 and manifest["files"][0]["path"] in problems[0] and "rows" in problems[0]


def test_read_manifest_errors_say_how_to_fix(tmp_path):
    with pytest.raises(DataError, match="mttl prepare"):
        shards.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        shards.read_manifest(tmp_path)
    assert "not valid JSON" in shards.check(tmp_path)[0]


def test_verify_shards_hashes_each_file_once_per_size_and_mtime(tmp_path, monkeypatch):
    out = tmp_path / "prep"
    manifest = _write(out, rows_per_file=5)
    hashed = []
    real = shards._file_sha256
    monkeypatch.setattr(shards, "_file_sha256", lambda path: hashed.append(path) or real(path))
    assert shards.verify_shards(out) == manifest
    assert len(hashed) == len(manifest["files"]) and (out / shards.VERIFIED_CACHE).is_file()
    shards.read_manifest(out, verify=True)
    assert len(hashed) == len(manifest["files"])  # unchanged files: not hashed again

    first = out / manifest["files"][0]["path"]
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    stat = first.stat()
    first.write_bytes(bytes(data))
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    with pytest.raises(DataError, match=f"{first}: sha256 differs.*run `mttl prepare` again"):
        shards.verify_shards(out)

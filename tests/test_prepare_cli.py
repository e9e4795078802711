"""`mttl prepare` through the real CLI: bad input fails cleanly, check finds damage, re-runs are no-ops.

`expect_clean_failure` is the harness for every bad-input case (other sources' tests import it):
exit code != 0, exactly one stderr line naming the file/task and the problem, no traceback, and
the --out folder and its parent exactly as before (no manifest, no partial or temporary output).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_ni import write_ni_repo
from test_xfit import write_xfit

from mttl.cli import main
from mttl.data.shards import read_manifest

REPO = Path(__file__).resolve().parent.parent


def _snapshot(folder: Path) -> dict | None:
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def expect_clean_failure(argv: list[str], capsys, out_dir: Path, *mentions: str) -> str:
    """Run `mttl ARGV`; assert the clean-failure contract above; return the error line."""
    out_dir = Path(out_dir)
    before, siblings = _snapshot(out_dir), sorted(out_dir.parent.iterdir()) if out_dir.parent.exists() else []
    code = main(argv)
    captured = capsys.readouterr()
    assert code != 0, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err + captured.out
    for text in mentions:
        assert text in lines[0], (text, lines[0])
    assert _snapshot(out_dir) == before
    after = sorted(out_dir.parent.iterdir()) if out_dir.parent.exists() else []
    assert after == siblings, "temporary or partial output left beside --out"
    return lines[0]


def _ni_argv(repo: Path, out: Path, *extra: str) -> list[str]:
    return ["prepare", "ni", "--source", str(repo), "--out", str(out), *extra]


def test_malformed_task_json_keeps_previous_output(tmp_path, capsys):
    repo = write_ni_repo(tmp_path / "ni")
    out = tmp_path / "out" / "ni"
    assert main(_ni_argv(repo, out)) == 0
    capsys.readouterr()
    bad = repo / "tasks" / "task002_old.json"
    bad.write_text(bad.read_text()[:-40])
    line = expect_clean_failure(_ni_argv(repo, out), capsys, out, str(bad), "malformed JSON")
    assert line.startswith("mttl: error: ")
    # a fresh --out gets nothing at all
    expect_clean_failure(_ni_argv(repo, tmp_path / "out" / "fresh"), capsys, tmp_path / "out" / "fresh", str(bad))


def test_missing_split_tasks_are_listed_or_skipped(tmp_path, capsys):
    repo = write_ni_repo(tmp_path / "ni")
    with open(repo / "splits" / "default" / "train_tasks.txt", "a") as fh:
        fh.write("task900_absent\ntask901_absent\n")
    out = tmp_path / "out"
    expect_clean_failure(_ni_argv(repo, out), capsys, out, "task900_absent", "task901_absent",
                         "--allow-missing-tasks")
    assert main(_ni_argv(repo, out, "--allow-missing-tasks")) == 0
    assert "skipped: missing_tasks 2" in capsys.readouterr().out
    manifest = read_manifest(out)
    assert manifest["skipped"]["missing_tasks"] == ["task900_absent", "task901_absent"]
    assert "task900_absent" not in manifest["tasks"] and len(manifest["tasks"]) == 3


def test_task_without_instances(tmp_path, capsys):
    repo = write_ni_repo(tmp_path / "ni")
    path = repo / "tasks" / "task001_new.json"
    task = json.loads(path.read_text())
    task["Instances"] = []
    path.write_text(json.dumps(task))
    expect_clean_failure(_ni_argv(repo, tmp_path / "out"), capsys, tmp_path / "out", str(path), "no instances")


def test_instance_without_output(tmp_path, capsys):
    repo = write_ni_repo(tmp_path / "ni")
    path = repo / "tasks" / "task001_new.json"
    task = json.loads(path.read_text())
    task["Instances"][5]["output"] = []
    path.write_text(json.dumps(task))
    expect_clean_failure(_ni_argv(repo, tmp_path / "out"), capsys, tmp_path / "out", str(path),
                         "task001_new-005", "no output")

    source, partition = write_xfit(tmp_path / "xfit")
    tsv = source / "data" / "quoref" / "quoref_4_13_train.tsv"
    tsv.write_text(tsv.read_text() + "a line with no tab\n")
    out = tmp_path / "xout"
    expect_clean_failure(["prepare", "xfit", "--source", str(source), "--partition", str(partition), "--out", str(out)],
                         capsys, out, f"{tsv}:5", "without output")


def test_unknown_split_and_malformed_partition(tmp_path, capsys):
    repo = write_ni_repo(tmp_path / "ni")
    out = tmp_path / "out"
    expect_clean_failure(_ni_argv(repo, out, "--split", "nosuch"), capsys, out, "splits/nosuch", "default")
    source, partition = write_xfit(tmp_path / "xfit")
    partition.write_text('{"train": ["ag_news",]}')
    expect_clean_failure(["prepare", "xfit", "--source", str(source), "--partition", str(partition), "--out", str(out)],
                         capsys, out, str(partition), "malformed JSON")


def test_rerun_on_unchanged_source_is_a_noop(tmp_path, capsys):
    source, partition = write_xfit(tmp_path / "xfit")
    out = tmp_path / "out"
    argv = ["prepare", "xfit", "--source", str(source), "--partition", str(partition), "--out", str(out)]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert f"{out}: written" in first and "tasks: 3 (test 1, train 2)" in first
    mtime = os.stat(out / "manifest.json").st_mtime_ns
    assert main(argv) == 0
    assert f"{out}: unchanged" in capsys.readouterr().out
    assert os.stat(out / "manifest.json").st_mtime_ns == mtime
    tsv = source / "data" / "ag_news" / "ag_news_4_13_dev.tsv"
    tsv.write_text(tsv.read_text() + "one more\tanswer\n")
    assert main(argv) == 0
    assert f"{out}: written" in capsys.readouterr().out
    assert read_manifest(out)["tasks"]["ag_news"]["rows"]["validation"] == 13


def test_check_reports_corrupt_shards_and_manifest_mismatch(tmp_path, capsys):
    repo = write_ni_repo(tmp_path / "ni")
    out = tmp_path / "out"
    assert main(_ni_argv(repo, out)) == 0
    assert main(["prepare", "check", str(out)]) == 0
    assert "ok:" in capsys.readouterr().out

    manifest = json.loads((out / "manifest.json").read_text())
    shard = out / manifest["files"][0]["path"]
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    assert main(["prepare", "check", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err and all(line.startswith(str(shard)) for line in err) and "Traceback" not in "\n".join(err)
    assert any("unreadable Parquet" in line for line in err) and any("sha256" in line for line in err)

    assert main(_ni_argv(repo, out)) == 0  # same fingerprint, but damaged: rebuilt, not a no-op
    assert f"{out}: written" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"][1]["rows"] += 3
    manifest["files"].append({"path": "train/part-00099.parquet", "rows": 1, "sha256": "0" * 64})
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert main(["prepare", "check", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{out / manifest['files'][1]['path']}: " in err and "rows" in err
    assert f"{out / 'train/part-00099.parquet'}: missing" in err

    assert main(["prepare", "check", str(tmp_path / "nothing")]) == 1
    assert "manifest.json not found" in capsys.readouterr().err


def test_process_exit_code_and_debug_traceback(tmp_path):
    repo = write_ni_repo(tmp_path / "ni")
    (repo / "tasks" / "task003_test.json").write_text("{")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "mttl.cli", "prepare", "ni", "--source", str(repo), "--out", str(tmp_path / "o")]
    plain = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert plain.returncode == 2 and plain.stdout == ""
    assert plain.stderr.count("\n") == 1 and "task003_test.json: malformed JSON" in plain.stderr
    debug = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "DataError" in debug.stderr
    assert not (tmp_path / "o").exists()

"""Several held-out tasks in one `mttl finetune`: every task × seed a Ray task, a killed driver resumed.

The first driver runs as its own `mttl` process on the session's Ray cluster and is SIGKILLed as
soon as results.jsonl holds a finished pair; the same command is then run again (in this process,
on the same cluster): the pairs written before the kill are neither run again nor changed, and the
final table covers all four pairs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path


from mttl.cli import main
from mttl.data.shards import read_manifest
from test_finetune import make_checkpoint, synthetic  # noqa: F401 (the small held-out suite, a fixture)

FAST = ["seeds=[13,42]", "total_steps=2", "train_batch_size=4", "eval_every_epochs=1", "num_shots=4", "num_beams=1",
        "predict_batch_size=16", "tensorboard=False", "log_every=1", "do_zs=False"]


def _test_rows(run_dir: Path) -> dict:
    path = run_dir / "results.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["task"], r["seed"]): r for r in rows if r["evaluation"] == "test"}


def test_killed_driver_reruns_only_the_unfinished_pairs(tmp_path, synthetic, ray_cluster, capsys):
    data_dir = synthetic[0]  # 8 test rows per held-out task: the default suite's 200 cost minutes here
    held_out = sorted(t for t, m in read_manifest(data_dir)["tasks"].items() if m["role"] == "test")[:2]
    assert len(held_out) == 2
    checkpoint = make_checkpoint(tmp_path, data_dir, "poly")
    address = ray_cluster.get_runtime_context().gcs_address
    mttl = shutil.which("mttl", path=str(Path(sys.executable).parent)) or "mttl"
    command = [mttl, "finetune", "-k", f"checkpoint={checkpoint}", f"finetune_task_name={held_out!r}",
               f"output_dir={tmp_path}", "run_name=ft", "finetune_type=Z", f"ray_address={address}",
               "resources_per_run={'CPU': 2}", *FAST]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run_dir = tmp_path / "ft"

    driver = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 900  # a bound, under a loaded CI machine
    while not _test_rows(run_dir) and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    first_out = driver.communicate()[0]
    before = _test_rows(run_dir)
    assert driver.returncode == -signal.SIGKILL, first_out
    assert 1 <= len(before) < 4, first_out  # killed with at least one pair written and one still to run

    # the same command again, here (a fresh driver on the same cluster, without a second interpreter's start)
    capsys.readouterr()
    assert main(command[1:]) == 0
    out = capsys.readouterr().out
    after = _test_rows(run_dir)
    assert set(after) == {(t, s) for t in held_out for s in (13, 42)}
    for pair, row in before.items():
        assert after[pair] == row  # the same row, not a new one
    # the rerun names the finished pairs as skipped, and runs (one progress line each) only the others
    skipped = f"{len(before)} of 4 task x seed pairs already in"
    assert skipped in out, out
    ran = {(line.split()[1], int(line.split()[3])) for line in out.splitlines() if line.startswith("[")}
    assert ran == set(after) - set(before), out
    assert all("ETA" in line for line in out.splitlines() if line.startswith("["))
    # the table: median over the two seeds per task, mean over the tasks, from the rows themselves
    medians = [statistics.median(after[(t, s)]["value"] for s in (13, 42)) for t in held_out]
    assert f"mean over 2 tasks\ttest\t{statistics.fmean(medians):.2f}" in out, out
    for task, median in zip(held_out, medians):
        assert f"{task}\ttest\tmedian over seeds {median:.2f}" in out


def _fails_for_seed_42(cfg, task, seed):
    if seed == 42:
        raise ValueError(f"no rows left for {task}\nsecond line")
    return seed


def test_a_failed_pair_names_its_cause_and_logs_the_traceback(tmp_path, ray_cluster, monkeypatch):
    import pytest

    from mttl import console
    from mttl.config import Config
    from mttl.errors import MttlError
    from mttl.finetune.fanout import run_as_ray_tasks

    import ray.cloudpickle

    # Ray's workers cannot import this test module: send the failing function by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    log = tmp_path / "internal.log"
    monkeypatch.setitem(console._state, "path", log)
    monkeypatch.setitem(console._state, "file", open(log, "a", encoding="utf-8", buffering=1))
    try:
        with pytest.raises(MttlError) as raised:
            list(run_as_ray_tasks(_fails_for_seed_42, Config(), [("t1", 42)], {"CPU": 1},
                                  lambda unit: f"task {unit[0]} seed {unit[1]}"))
    finally:
        console._state["file"].close()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    # one line: the pair, the cause's type and first line (not Ray's "ray::..." header), where to look
    assert str(raised.value) == f"task t1 seed 42 failed: ValueError: no rows left for t1 (the traceback is in {log})"
    logged = log.read_text()
    assert "task t1 seed 42 failed:" in logged and "_fails_for_seed_42" in logged and "second line" in logged

"""`ray job submit` of jobs/pretrain.py to a real head started with `ray start` on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from mttl.data.synthetic import prepare_synthetic
from cluster_support import plain_env, ray_cli as _ray_cli, start_head, stop_cluster as _stop_cluster
from train_support import TASKS

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _submit_when_ready(command: list[str], env: dict) -> subprocess.CompletedProcess:
    """`ray job submit`, retried while the head's dashboard agent is still starting."""
    deadline = time.time() + 300
    while True:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=560)
        if "No available agent" not in done.stderr + done.stdout or time.time() > deadline:
            return done
        time.sleep(3)


def test_submitted_pretrain_job_writes_its_run_folder(tmp_path):
    data_dir = tmp_path / "synthetic"
    prepare_synthetic(data_dir, seed=0)
    out = tmp_path / "runs"  # absolute: the job runs in an uploaded copy of the working dir
    temp_dir = Path("/tmp") / f"mttl-job-test-{os.getpid()}"  # short: Ray's socket paths have a length limit
    # a plain shell's environment: the test session's own cluster (RAY_ADDRESS, RAY_API_SERVER_ADDRESS)
    # must not leak into the head, or Ray Train's actors there would ask that cluster for theirs
    env = plain_env(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token", DS_ACCELERATOR="cpu")
    _, dashboard_port = start_head(temp_dir, env)
    try:
        runtime_env = {"env_vars": {"RAY_AUTH_MODE": "token", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
                                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
                       "excludes": [".venv", ".git", "output", "cache", "benchmarks/out", "**/__pycache__"]}
        command = (
            [_ray_cli(), "job", "submit", "--address", f"http://127.0.0.1:{dashboard_port}",
             "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--",
             "python", "jobs/pretrain.py", "-k", "model=tiny-t5", "tiny_d_model=32", "tiny_num_layers=1",
             "model_modifier=poly", "n_skills=2", "lora_rank=2", f"data_dir={data_dir}", f"tasks={TASKS!r}",
             f"output_dir={out}", "run_name=submitted", "max_input_length=16", "max_output_length=16",
             "num_workers=2", "train_batch_size=8", "total_steps=6", "save_every=3", "eval_every=6",
             "log_every=2", f"cache_dir={tmp_path / 'cache'}"]
        )
        submit = _submit_when_ready(command, env)
        assert submit.returncode == 0, (submit.stdout[-3000:], submit.stderr[-3000:])
        assert "succeeded" in submit.stdout
    finally:
        _stop_cluster(temp_dir)
    run_dir = out / "submitted"
    assert json.loads((run_dir / "config.json").read_text())["num_workers"] == 2
    assert json.loads((run_dir / "tasks.json").read_text()) == {name: row for row, name in enumerate(TASKS)}
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 6
    assert (run_dir / "final" / "adapters.safetensors").is_file()
    assert (run_dir / "final" / "backbone" / "config.json").is_file()  # tiny-t5 is built from a config
    assert len(list(run_dir.glob("checkpoint_*/trainer_state.json"))) == 2

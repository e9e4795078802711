"""Resume and faults: continuing a run, refusing a changed config, a killed worker, a killed driver."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from mttl.cli import main
from mttl.data.synthetic import prepare_synthetic
from mttl.train.loop import pretrain
from train_support import (TASKS, registered_checkpoint_steps, tiny_config, train_rows, train_worker_pids,
                           wait_for_registered_checkpoint)

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    prepare_synthetic(out / "synthetic", seed=0)
    return out


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _checkpoint_steps(run_dir: Path) -> list[int]:
    steps = []
    for state in run_dir.glob("checkpoint_*/trainer_state.json"):
        try:
            steps.append(json.loads(state.read_text())["step"])
        except (json.JSONDecodeError, OSError):  # being written
            continue
    return sorted(steps)


def test_finished_run_continues_to_a_larger_total(suite, ray_cluster):
    cfg = tiny_config(suite / "synthetic", suite / "runs", "grow", num_workers=1, total_steps=6, save_every=3,
                      eval_every=None)
    run_dir = pretrain(cfg)
    assert _checkpoint_steps(run_dir)[-1] == 6
    # checkpoints carry the trained tensors and DeepSpeed state, never the frozen backbone
    for path in run_dir.glob("checkpoint_*/deepspeed/**/*.pt"):
        module = torch.load(path, map_location="cpu", weights_only=True).get("module") or {}
        assert module and all("lora_" in k or "module_logits" in k for k in module), sorted(module)[:3]

    pretrain(cfg.copy(total_steps=10))
    rows = _rows(run_dir)
    assert {"step": 6, "resumed_from_step": 6} in rows
    assert [r["step"] for r in train_rows(run_dir)] == list(range(1, 11))
    assert _checkpoint_steps(run_dir)[-1] == 10
    # the warm-up fixed at the start (3 steps) stays; the decay now ends at the new total
    peak = cfg.adapters_learning_rate
    for row in train_rows(run_dir)[6:]:
        assert row["lr/adapters"] == pytest.approx(peak * (10 - row["step"]) / (10 - 3))


def test_changed_config_is_refused_naming_the_keys(suite, capsys):
    cfg = tiny_config(suite / "synthetic", suite / "runs", "refuse", total_steps=4, n_tasks=len(TASKS))
    run_dir = Path(cfg.output_dir) / cfg.run_name
    cfg.save(run_dir)
    (run_dir / "tasks.json").write_text(json.dumps({name: row for row, name in enumerate(TASKS)}))
    config_file = run_dir.parent / "refuse.json"
    config_file.write_text(json.dumps(cfg.to_dict()))
    code = main(["pretrain", "-c", str(config_file), "-k", "learning_rate=0.5", "lora_rank=3"])
    err = capsys.readouterr().err
    assert code == 2
    assert "learning_rate" in err and "lora_rank" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_killed_worker_restarts_from_its_last_checkpoint(suite, ray_cluster):
    cfg = tiny_config(suite / "synthetic", suite / "runs", "killed_worker", total_steps=150, save_every=10,
                      eval_every=None, log_every=5, max_failures=1)
    run_dir = Path(cfg.output_dir) / cfg.run_name
    failure = []
    thread = threading.Thread(target=lambda: _capture(failure, pretrain, cfg))
    thread.start()
    killed_after = wait_for_registered_checkpoint(run_dir)
    workers = train_worker_pids(os.getpid())
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    thread.join(timeout=600)
    assert not thread.is_alive() and not failure, failure
    resumed = [r["resumed_from_step"] for r in _rows(run_dir) if "resumed_from_step" in r]
    assert resumed and killed_after <= resumed[0] < cfg.total_steps
    assert _checkpoint_steps(run_dir)[-1] == cfg.total_steps
    assert train_rows(run_dir)[-1]["step"] == cfg.total_steps


def _capture(errors: list, fn, *args):
    try:
        fn(*args)
    except BaseException as err:  # reported by the test thread
        errors.append(err)


def test_killed_driver_resumes_with_the_same_command(suite):
    out = suite / "runs"
    command = [sys.executable, str(REPO / "jobs" / "pretrain.py"), "-k", "model=tiny-t5", "tiny_d_model=32",
               "tiny_num_layers=1", "model_modifier=poly", "n_skills=2", "lora_rank=2", f"data_dir={suite / 'synthetic'}",
               f"tasks={TASKS!r}", f"output_dir={out}", "run_name=killed_driver", "max_input_length=16",
               "max_output_length=16", "num_workers=1", "total_steps=200", "save_every=10", "log_every=10",
               "tensorboard=False", f"cache_dir={out / 'cache'}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run_dir = out / "killed_driver"
    first = subprocess.Popen(command, env=env, cwd=REPO, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_registered_checkpoint(run_dir, timeout=400)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    killed_at = registered_checkpoint_steps(run_dir)[-1]  # what a restart can resume from
    assert killed_at < 200
    second = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=500)
    assert second.returncode == 0, second.stderr[-3000:]
    resumed = [r["resumed_from_step"] for r in _rows(run_dir) if "resumed_from_step" in r]
    assert resumed and resumed[0] >= killed_at
    assert _checkpoint_steps(run_dir)[-1] == 200
    assert (run_dir / "final" / "adapters.safetensors").is_file()

"""Helpers shared by the pre-training tests: a prepared synthetic suite and tiny run configs."""

from __future__ import annotations

import json
from pathlib import Path

from mttl.config import Config

# A few composition tasks keep every run short; their routing rows are 0..3 in this order.
TASKS = ["caesar>reverse", "double>rotate", "novowel>upper", "reverse>swapfirst"]


def tiny_config(data_dir: Path, output_dir: Path, run_name: str, **overrides) -> Config:
    """A poly run of a few steps on a 32-wide, 1-layer T5 with byte tokens (seconds per step at most)."""
    values = dict(
        model="tiny-t5", tiny_d_model=32, tiny_num_layers=1, tokenizer="byte",
        model_modifier="poly", n_skills=2, lora_rank=2, n_splits=1,
        trainable_param_names=".*lora_[ab].*|.*module_logits.*",
        data_dir=str(data_dir), tasks=TASKS, output_dir=str(output_dir), run_name=run_name,
        cache_dir=str(output_dir / "cache"), max_input_length=16, max_output_length=16,
        train_batch_size=8, predict_batch_size=50, num_workers=2, total_steps=12, warmup_steps=3,
        learning_rate=1e-2, adapters_learning_rate=1e-2, module_logits_learning_rate=0.1,
        log_every=1, eval_every=12, save_every=6, tensorboard=False, seed=7,
    )
    values.update(overrides)
    cfg = Config()
    cfg.update(values, source="test")
    return cfg


def train_rows(run_dir: Path) -> list[dict]:
    """Training rows of metrics.jsonl, last occurrence per step (a restart may repeat steps)."""
    rows = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            rows[row["step"]] = row
    return [rows[s] for s in sorted(rows)]


def eval_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]


def train_worker_pids(root_pid: int) -> list[int]:
    """PIDs of Ray Train worker processes below `root_pid` (a driver or a raylet started by this test).

    Looking only below our own processes keeps other Ray clusters on the machine out of reach.
    """
    import psutil

    pids = []
    for proc in psutil.Process(root_pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                pids.append(proc.pid)
        except psutil.Error:  # exited meanwhile
            continue
    return pids


def registered_checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the checkpoints Ray Train has registered (and would resume from), oldest first.

    A checkpoint folder appears on disk before the controller records it; only recorded ones
    count for a restart.
    """
    try:
        snapshot = json.loads((Path(run_dir) / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, json.JSONDecodeError):  # not written yet, or being replaced
        return []
    return sorted(r["metrics"]["step"] for r in snapshot.get("checkpoint_results", []))


def wait_for_registered_checkpoint(run_dir: Path, timeout: float = 600) -> int:
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = registered_checkpoint_steps(run_dir)
        if steps:
            return steps[-1]
        time.sleep(0.2)
    raise AssertionError(f"Ray Train registered no checkpoint in {run_dir} within {timeout} s")


def kill_a_worker_after_a_checkpoint(cfg, registered_steps, timeout: float = 900) -> int:
    """Pre-train `cfg` on a thread, SIGKILL one of its Ray Train workers once `registered_steps()`
    lists a checkpoint, and wait for the run to end by itself; returns the last registered step
    before the kill. The run must recover (no exception) and a worker must still be alive to kill."""
    import os
    import signal
    import threading
    import time

    from mttl.train.loop import pretrain

    failure: list = []

    def run():
        try:
            pretrain(cfg)
        except BaseException as err:  # reported by the assertion below
            failure.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + timeout
    while not registered_steps() and thread.is_alive() and time.time() < deadline:
        time.sleep(0.05)
    workers = train_worker_pids(os.getpid())
    assert len(workers) == 2 and thread.is_alive(), "the run ended before a worker could be killed"
    killed_after = registered_steps()[-1]
    os.kill(workers[0], signal.SIGKILL)
    thread.join(timeout=600)
    assert not thread.is_alive() and not failure, failure
    return killed_after

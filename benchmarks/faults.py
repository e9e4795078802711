"""What each fault costs a pre-training run, measured as a user meets it: `mttl pretrain` from a shell.

One point (ZeRO stage, precision; 2 workers, tiny T5 with Poly adapters, 120 steps, a checkpoint
every 20), every run a fresh `mttl pretrain` process that starts its own local Ray cluster:

- uninterrupted: the wall time every fault is compared with;
- SIGKILLed worker: a training worker killed after the first registered checkpoint (max_failures=1):
  Ray Train restarts the worker group in the same command; extra wall time over uninterrupted;
- killed driver: the command's process group (driver and local cluster) SIGKILLed after the first
  registered checkpoint, then the same command again; wall of both ÷ the extra over uninterrupted;
- damaged latest checkpoint: a finished run's newest state file truncated and `final/` removed,
  then the same command: the time to end again (one more checkpoint interval retrained);
- Ctrl-C: seconds from SIGINT to the exit (130) with the resume line;
- unreachable ray_address and resources no node has (worker_start_timeout_s=5): seconds to the
  one-line error.

Every resumed run's adapters are compared with the uninterrupted run's (max |difference|).

    python benchmarks/faults.py                        # ZeRO-2, bf16
    python benchmarks/faults.py --stage 3 --precision 32
Writes benchmarks/out/faults.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _env import OUT  # first: the repo on sys.path, the Ray/DeepSpeed environment

TASKS = ["caesar>reverse", "double>rotate", "novowel>upper", "reverse>swapfirst"]
MTTL = str(Path(sys.executable).with_name("mttl"))


def command(data: Path, out: Path, run_name: str, stage: int, precision: str, *extra: str) -> list[str]:
    return [MTTL, "pretrain", "-k", "model=tiny-t5", "tiny_d_model=32", "tiny_num_layers=1", "tokenizer=byte",
            "model_modifier=poly", "n_skills=2", "lora_rank=2", f"data_dir={data}", f"tasks={TASKS!r}",
            f"output_dir={out}", f"run_name={run_name}", "max_input_length=16", "max_output_length=16",
            "num_workers=2", "train_batch_size=8", "total_steps=120", "save_every=20", "log_every=20",
            "eval_every=0", f"zero_stage={stage}", f"precision={precision}", "tensorboard=False",
            "lora_dropout=0.1", f"cache_dir={out / 'cache'}", *extra]


def registered_steps(run_dir: Path) -> list[int]:
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, json.JSONDecodeError):
        return []
    return sorted(r["metrics"]["step"] for r in snapshot.get("checkpoint_results", []))


def wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path) -> int:
    while proc.poll() is None:
        steps = registered_steps(run_dir)
        if steps:
            return steps[-1]
        time.sleep(0.05)
    raise SystemExit(f"{run_dir.name} ended (exit {proc.returncode}) before its first checkpoint")


def timed(cmd: list[str], **kwargs) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    return time.perf_counter() - started, done


def max_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(str(a / "final" / "adapters.safetensors")), load_file(str(b / "final" / "adapters.safetensors"))
    return max(float((x[k].float() - y[k].float()).abs().max()) for k in x)


def train_worker_pids(root_pid: int) -> list[int]:
    import psutil

    found = []
    for proc in psutil.Process(root_pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--precision", default="bf16")
    args = parser.parse_args()
    from mttl.data.synthetic import prepare_synthetic

    work = Path(tempfile.mkdtemp(prefix="mttl-faults-"))
    data, out = work / "synthetic", work / "runs"
    prepare_synthetic(data, seed=0)
    point = (args.stage, args.precision)
    rows: dict[str, dict] = {}

    def run(name: str, *extra: str, **kwargs):
        return timed(command(data, out, name, *point, *extra), **kwargs)

    base_s, done = run("whole")
    assert done.returncode == 0, done.stderr[-2000:]
    whole = out / "whole"
    rows["uninterrupted"] = {"wall_s": base_s}

    proc = subprocess.Popen(command(data, out, "killed_worker", *point, "max_failures=1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = time.perf_counter()
    at = wait_for_checkpoint(proc, out / "killed_worker")
    os.kill(train_worker_pids(proc.pid)[0], signal.SIGKILL)
    assert proc.wait() == 0
    wall = time.perf_counter() - started
    rows["SIGKILLed worker"] = {"wall_s": wall, "extra_s": wall - base_s, "killed_after_step": at,
                                "max_diff": max_difference(out / "killed_worker", whole)}

    proc = subprocess.Popen(command(data, out, "killed_driver", *point), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = time.perf_counter()
    at = wait_for_checkpoint(proc, out / "killed_driver")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = time.perf_counter() - started
    again_s, done = run("killed_driver")
    assert done.returncode == 0, done.stderr[-2000:]
    rows["killed driver, same command again"] = {"wall_s": first + again_s, "extra_s": first + again_s - base_s,
                                                 "killed_after_step": at, "rerun_s": again_s,
                                                 "max_diff": max_difference(out / "killed_driver", whole)}

    damaged = out / "damaged"
    shutil.copytree(whole, damaged)
    shutil.rmtree(damaged / "final")
    config = json.loads((damaged / "config.json").read_text())
    config["run_name"] = "damaged"
    (damaged / "config.json").write_text(json.dumps(config))
    latest = json.loads((damaged / "checkpoint_manager_snapshot.json").read_text())["latest_checkpoint_result"]
    state_file = sorted((damaged / latest["checkpoint_dir_name"] / "deepspeed").rglob("*.pt"))[0]
    state_file.write_bytes(state_file.read_bytes()[:200])
    again_s, done = run("damaged")
    assert done.returncode == 0 and "trying the previous checkpoint" in done.stderr, done.stderr[-2000:]
    rows["damaged latest checkpoint, same command again"] = {"wall_s": again_s,
                                                             "max_diff": max_difference(damaged, whole)}

    proc = subprocess.Popen(command(data, out, "interrupted", *point, "total_steps=100000", "save_every=200"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(proc, out / "interrupted")
    started = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate()
    rows["Ctrl-C"] = {"to_exit_s": time.perf_counter() - started, "exit": proc.returncode,
                      "last_line": err.strip().splitlines()[-1]}

    wall, done = run("unreachable", "ray_address=127.0.0.1:9")
    rows["unreachable ray_address"] = {"to_error_s": wall, "exit": done.returncode,
                                       "last_line": done.stderr.strip().splitlines()[-1]}
    wall, done = run("infeasible", "worker_start_timeout_s=5", "resources_per_worker={'CPU': 64}")
    rows["resources no node has (worker_start_timeout_s=5)"] = {"to_error_s": wall, "exit": done.returncode,
                                                                "last_line": done.stderr.strip().splitlines()[-1]}
    shutil.rmtree(work, ignore_errors=True)

    result = {"point": {"zero_stage": args.stage, "precision": args.precision}, "machine": platform.platform(),
              "cpus": os.cpu_count(), "rows": rows}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "faults.json").write_text(json.dumps(result, indent=2))
    lines = [f"ZeRO-{args.stage}, precision {args.precision}, 2 workers, 120 steps, checkpoint every 20, "
             f"{os.cpu_count()} CPUs", "", "| fault | wall s | extra over uninterrupted s | max abs Δ adapters |",
             "|---|---|---|---|"]
    for name, row in rows.items():
        wall = row.get("wall_s", row.get("to_exit_s", row.get("to_error_s")))
        extra = f"{row['extra_s']:.1f}" if "extra_s" in row else ""
        diff = f"{row['max_diff']:.1e}" if "max_diff" in row else ""
        lines.append(f"| {name} | {wall:.1f} | {extra} | {diff} |")
    (OUT / "faults.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

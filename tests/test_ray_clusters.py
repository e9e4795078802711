"""The CLI on the clusters users really have, run as from a plain shell.

Every command here is a subprocess whose environment has none of the test session's Ray
variables (cluster_support.plain_env): a cluster without token auth (by environment, or joined
after `ray start` without it), two runs on one machine at once, a sweep, an unreachable address,
resources no node has, and Ctrl-C.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cluster_support import REPO, mttl_cli, plain_env, start_head, stop_cluster
from train_support import TASKS, wait_for_registered_checkpoint

pytestmark = pytest.mark.slow
# What a run must never print: another run's cluster looked up, or a process in the wrong auth mode.
CROSS_TALK = ("Found multiple active Ray instances", "Missing authorization header")


@pytest.fixture(scope="module")
def suite(tmp_path_factory, default_synthetic):
    out = tmp_path_factory.mktemp("clusters")
    (out / "synthetic").symlink_to(default_synthetic)
    return out


def pretrain_command(suite: Path, run_name: str, *extra: str, total_steps: int = 4) -> list[str]:
    return [mttl_cli(), "pretrain", "-k", "model=tiny-t5", "tiny_d_model=32", "tiny_num_layers=1",
            "tokenizer=byte", "model_modifier=poly", "n_skills=2", "lora_rank=2",
            f"data_dir={suite / 'synthetic'}", f"tasks={TASKS!r}", f"output_dir={suite / 'runs'}",
            f"run_name={run_name}", "max_input_length=16", "max_output_length=16", "num_workers=2",
            "train_batch_size=8", f"total_steps={total_steps}", "log_every=2", "tensorboard=False",
            f"cache_dir={suite / 'cache'}", *extra]


def _finished(done: subprocess.CompletedProcess | subprocess.Popen, output: str, run_dir: Path) -> None:
    assert done.returncode == 0, output[-3000:]
    assert (run_dir / "final" / "adapters.safetensors").is_file()
    # Ray's own lines go to the run's log file; the cross-talk errors must be in neither place
    internal = run_dir / "logs" / "internal.log"
    assert internal.is_file(), "the run's internal log is missing"
    for text in CROSS_TALK:
        assert text not in output + internal.read_text(errors="replace"), text


def _console_is_ours(output: str, internal: Path) -> None:
    """Issue 16 §2: the terminal shows mttl's lines only; Ray's start and its workers' chatter went
    to the log file (`verbose=False`, the default)."""
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines and all(line.startswith("[mttl]") for line in lines), lines[:20]
    logged = internal.read_text(errors="replace")
    assert "Started a local Ray instance" in logged and "RayTrainWorker" in logged


def listening_addresses(root_pid: int) -> set[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket of `root_pid` and its descendants."""
    import psutil

    try:
        root = psutil.Process(root_pid)
        tree = {root.pid: root.name()} | {c.pid: c.name() for c in root.children(recursive=True)}
    except psutil.Error:  # finished meanwhile
        return set()
    return {(c.laddr.ip, c.laddr.port, tree[c.pid]) for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in tree}


def test_two_runs_at_once_one_with_auth_disabled_both_on_loopback_only(suite):
    """Points 2, 3 and 8: a local run with RAY_AUTH_MODE=disabled finishes (its workers inherit the
    mode), while a second run with Ray's default (token) runs beside it; neither sees the other.
    Every port their processes open (Ray's, the workers', torch.distributed's store and gloo's) is
    on 127.0.0.1, sampled through both runs."""
    import ipaddress

    logs = {name: open(suite / f"{name}.log", "w+") for name in ("disabled", "default")}
    runs = {
        "disabled": subprocess.Popen(pretrain_command(suite, "auth_disabled", total_steps=12), cwd=suite,
                                     stdout=logs["disabled"], stderr=subprocess.STDOUT,
                                     env=plain_env(RAY_AUTH_MODE="disabled")),
        "default": subprocess.Popen(pretrain_command(suite, "auth_default", total_steps=12), cwd=suite,
                                    stdout=logs["default"], stderr=subprocess.STDOUT, env=plain_env()),
    }
    seen: set = set()
    deadline = time.monotonic() + 900  # a hang guard, not a goal: CI shares its cores with a second test process
    try:
        while any(proc.poll() is None for proc in runs.values()) and time.monotonic() < deadline:
            for proc in runs.values():
                seen |= listening_addresses(proc.pid)
            # every listener here lives for its whole run (Ray's servers, the workers' gRPC ports, the
            # process group's store and gloo pairs); a scan of every socket costs CPU the runs need
            time.sleep(1.0)
    finally:
        for proc in runs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for name, proc in runs.items():
        logs[name].seek(0)
        output = logs[name].read()
        _finished(proc, output, suite / "runs" / f"auth_{name}")
        _console_is_ours(output, suite / "runs" / f"auth_{name}" / "logs" / "internal.log")
    names = {name for _, _, name in seen}
    assert any("raylet" in n for n in names) and any("gcs" in n for n in names), names
    assert any("RayTrainWorker" in n or "ray::" in n for n in names), names  # the workers' own sockets
    public = sorted(entry for entry in seen if not ipaddress.ip_address(entry[0].removeprefix("::ffff:")).is_loopback)
    assert not public, public


def test_joins_a_ray_start_head_without_auth(suite, ray_cluster):
    """Point 2: most existing clusters run without token auth; joining one from a plain shell works.

    `ray_cluster` keeps a second Ray instance up on this machine meanwhile, as on a shared node: Ray
    Train's actors must be told which cluster they are on, not look it up among all instances.
    """
    temp_dir = Path("/tmp") / f"mttl-noauth-{os.getpid()}"  # short: Ray's socket paths have a length limit
    env = plain_env(RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", DS_ACCELERATOR="cpu")
    port, _ = start_head(temp_dir, env)
    try:
        done = subprocess.run(pretrain_command(suite, "joined", f"ray_address=127.0.0.1:{port}"), cwd=suite,
                              env=plain_env(), capture_output=True, text=True, timeout=900)
    finally:
        stop_cluster(temp_dir)
    _finished(done, done.stdout + done.stderr, suite / "runs" / "joined")


def test_unreachable_address_fails_in_seconds_and_writes_nothing(suite):
    started = time.perf_counter()
    done = subprocess.run(pretrain_command(suite, "unreachable", "ray_address=127.0.0.1:9"), cwd=suite,
                          env=plain_env(), capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - started
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no Ray cluster answers at ray_address='127.0.0.1:9'" in lines[0], done.stderr
    assert elapsed < 60, elapsed  # imports and the synthetic suite; Ray's own retry took over 11 minutes
    assert not (suite / "runs" / "unreachable").exists()


def test_resources_no_node_has_end_the_run_with_one_line(suite):
    """Point 10: Ray Train retries a worker group it cannot place forever; the run stops instead."""
    done = subprocess.run(pretrain_command(suite, "infeasible", "worker_start_timeout_s=5",
                                           "resources_per_worker={'CPU': 64}"),
                          cwd=suite, env=plain_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("mttl: error: the 2 training workers did not get {'CPU': 64} each within "
                           "worker_start_timeout_s=5 s"), last


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_stops_pretrain_and_says_how_to_resume(suite, sig, code):
    """Point 9: Ctrl-C (or a scheduler's SIGTERM) ends the command, not just Ray Train's run."""
    run_dir = suite / "runs" / f"interrupted_{sig.name}"
    proc = subprocess.Popen(pretrain_command(suite, run_dir.name, "save_every=5", "num_workers=1",
                                            total_steps=100_000),
                            cwd=suite, env=plain_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        wait_for_registered_checkpoint(run_dir, timeout=600)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last == (f"mttl: {'interrupted' if code == 130 else 'terminated'}; the checkpoints of {run_dir} are "
                    "kept; run the same command again to resume"), last


def test_sweep_from_a_plain_shell(tmp_path):
    """Point 5: `mttl sweep` imported ray.tune before mttl set Ray's environment (AuthenticationError
    from a plain shell). With RAY_AUTH_MODE=disabled the same import order failed too; that mode's
    worker inheritance is what the two-runs test above checks, for pretraining."""
    from test_sweep import FAST, WIDE_SPACE
    from test_finetune import make_checkpoint, t0_cb_subset

    data = t0_cb_subset(tmp_path, n_fewshot=8)
    space = tmp_path / "wide_space.py"
    space.write_text(WIDE_SPACE)
    checkpoint = make_checkpoint(tmp_path, data, "poly", dataset="t0")
    done = subprocess.run([mttl_cli(), "sweep", "-k", f"checkpoint={checkpoint}", f"tune_space={space}",
                           "num_samples=2", f"output_dir={tmp_path}", "run_name=plain", *FAST],
                          cwd=tmp_path, env=plain_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "plain" / "results.csv").is_file()
    internal = "".join(p.read_text(errors="replace") for p in (tmp_path / "logs").glob("internal-*.log"))
    for text in CROSS_TALK + ("AuthenticationError",):
        assert text not in done.stdout + done.stderr + internal, text
    # issue 16 §2: the console has the sweep's own lines only; Tune's experiment box and paths (printed
    # whatever its verbosity) are in the log file, Optuna's study lines nowhere
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert all(re.match(r"\[\d+/2\] |\[sweep\] |\||results: ", line) for line in lines), lines
    assert not done.stderr.strip(), done.stderr[-2000:]
    assert "Configuration for experiment" in internal and "View detailed results here" in internal


def test_repo_root_is_the_working_tree():
    # the subprocesses above run the installed `mttl`; it must be this checkout (pip install -e)
    import mttl

    assert Path(mttl.__file__).resolve().parent.parent == REPO

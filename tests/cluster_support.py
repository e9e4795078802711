"""Helpers for tests that start their own Ray heads or run the CLI as a user's shell would."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Variables the test session (or a Ray cluster it started in-process) may have set and a user's
# shell would not have: a CLI test run with them could pass for the wrong reason.
SESSION_ONLY = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_API_SERVER_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
                "RAY_JOB_ID", "RAY_RAYLET_PID")


def plain_env(**extra: str) -> dict[str, str]:
    """The environment of a plain shell: this one without Ray's session variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in SESSION_ONLY}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # the venv's mttl, ray and ninja
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli() -> str:
    return str(Path(sys.executable).with_name("ray"))


def mttl_cli() -> str:
    return str(Path(sys.executable).with_name("mttl"))


def start_head(temp_dir: Path, env: dict[str, str], num_cpus: int = 2) -> tuple[int, int]:
    """`ray start --head` on 127.0.0.1 with every port a free one; returns its GCS and dashboard ports."""
    port, dashboard_port = free_port(), free_port()
    # other Ray clusters may run on the machine (the default agent port 52365, once taken, leaves
    # the head without a job agent)
    agent_ports = [f"--{flag}={free_port()}" for flag in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
        "metrics-export-port", "ray-client-server-port")]
    subprocess.run([ray_cli(), "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                    f"--port={port}", f"--dashboard-port={dashboard_port}", *agent_ports, f"--num-cpus={num_cpus}",
                    "--disable-usage-stats", f"--temp-dir={temp_dir}"],
                   env=env, check=True, capture_output=True, timeout=120)
    return port, dashboard_port


def stop_cluster(temp_dir: Path) -> None:
    """Stop only the processes of this head (`ray stop` would stop every Ray cluster on the machine)."""
    import psutil

    ours = [p for p in psutil.process_iter(["cmdline"])
            if any(str(temp_dir) in arg for arg in (p.info["cmdline"] or []))]
    for proc in ours:
        proc.terminate()
    _, alive = psutil.wait_procs(ours, timeout=15)
    for proc in alive:
        proc.kill()
    shutil.rmtree(temp_dir, ignore_errors=True)

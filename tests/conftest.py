"""Shared test fixtures: the shared data folder, one Ray cluster per test session, tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Only what a user's shell would not have: the CLI and mttl set their own Ray environment (tests of
# plain-shell behaviour strip even these; see cluster_support.plain_env).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Train's controller collects reports every 2 s by default and a worker's next report waits
# for the previous one to be collected; tests checkpoint every few tiny steps, so at the default
# most of a test run is that wait (1.7 s of every checkpoint, measured). Propagated by Ray Train
# to the controller, including in runs started by subprocesses and submitted jobs.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

# Sweep-state signatures are keyed by a per-user file (~/.config/mttl); tests never touch the user's.
if "MTTL_STATE_KEY_FILE" not in os.environ:
    import tempfile

    os.environ["MTTL_STATE_KEY_FILE"] = str(Path(tempfile.mkdtemp(prefix="mttl-test-key-")) / "sweep-state.key")

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("MTTL_SHARED_DIR", REPO.parent / "shared")).resolve()


def shared_path(*parts: str) -> Path:
    """A path inside ../shared; skips the test when absent, fails under CI=true."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        reason = f"shared data not found at {path} (set MTTL_SHARED_DIR)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return shared_path()


@pytest.fixture(scope="session")
def t5_tokenizer_path() -> Path:
    return shared_path("tokenizers", "t5")


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session (starting Ray costs seconds)."""
    import ray

    if not ray.is_initialized():
        # as `mttl` starts one (loopback, its dashboard named to Ray Train), so clusters that tests
        # start beside it are never mistaken for it; 4 logical CPUs fit 2 workers beside Ray Data
        from mttl.ray_utils import start_local_cluster

        start_local_cluster(ray, num_cpus=4, log_to_driver=False,
                            env_vars={"DS_ACCELERATOR": "cpu", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    yield ray
    # left running until the interpreter exits; other session fixtures may still need it


@pytest.fixture(scope="session")
def default_synthetic(tmp_path_factory) -> Path:
    """The default synthetic suite (seed 0), prepared once per session and only read by runs.

    Runs of one session on the same data, tasks and lengths then share the training dataset the
    driver built first (`reuse_or_build_dataset`), as they would in a user's notebook.
    """
    from mttl.data.synthetic import prepare_synthetic

    out = tmp_path_factory.mktemp("default_synthetic") / "synthetic"
    prepare_synthetic(out, seed=0)
    return out


@pytest.fixture
def one_torch_thread():
    """Tiny models on 2 shared cores: one intra-op thread avoids spinning threads fighting (~100× here).

    Modules that run models in the test process use it with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

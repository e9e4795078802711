"""How a training worker loads DeepSpeed: its import, and the just-in-time compiled ops it needs
before `deepspeed.init_distributed`.

DeepSpeed's autotuner imports MLflow when DeepSpeed is imported, only to log its own autotuning
experiments, which mttl never runs; that import is 2–3 s of every worker's start on a CPU core
(measured: `import torch, deepspeed` 5.2–6.7 s with it, 3.2–3.4 s without). `import_deepspeed`
keeps MLflow out of that one import; mttl's own MLflow logging imports it when a run asks for it.

On CPU workers DeepSpeed's torch backend compiles its shared-memory collective op
(`deepspeed_shm_comm`) on first use, through torch's extension loader, into the shared
`~/.cache/torch_extensions` (TORCH_EXTENSIONS_DIR). That loader guards the build with a plain
`lock` file which a killed builder (an out-of-memory kill, a stopped job) never removes; every later
worker on the machine then waits on it forever, silently. Here each build runs under an OS lock
(`flock`, released by the kernel when its holder dies), so a torch `lock` file found while holding it
can only be a dead builder's and is removed before the build or load goes on.
"""

from __future__ import annotations

import fcntl
import sys
from pathlib import Path

SHM_COMM = "ShareMemCommBuilder"


def import_deepspeed():
    """`import deepspeed`, without its autotuner's MLflow import unless MLflow is already loaded."""
    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        import deepspeed

        return deepspeed
    sys.modules["mlflow"] = None  # makes the autotuner's `import mlflow` fail, which it handles
    try:
        import deepspeed
    finally:
        del sys.modules["mlflow"]
    return deepspeed


def prepare_comm_op() -> None:
    """Build (or load the built) shared-memory collective op of this accelerator, if it has one."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return  # GPUs use NCCL; the shared-memory op is the CPU accelerator's
    builder = get_accelerator().create_op_builder(SHM_COMM)
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return  # this DeepSpeed build cannot compile it; its torch backend then uses gloo as is
    from torch.utils.cpp_extension import _get_build_directory

    build_dir = Path(_get_build_directory(builder.NAME, verbose=False))
    with open(build_dir.parent / f".{builder.NAME}.build-lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            clear_dead_builder_lock(build_dir)
            builder.load(verbose=False)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def clear_dead_builder_lock(build_dir: Path) -> bool:
    """Remove torch's build `lock` in `build_dir`; only call while holding the build's flock."""
    lock = build_dir / "lock"
    if lock.exists():
        lock.unlink(missing_ok=True)
        return True
    return False

"""Memory a DeepSpeed engine holds that a run does not need: the fp32 "master" clone of a ZeRO-3
partition that is already fp32, the optimizer states once the last step is taken, and heap pages
freed while the engine was set up.

Both reach into DeepSpeed's stage-3 optimizer by attribute; where the attributes are not there (another
DeepSpeed version, an offload or NVMe path) nothing is changed and the run holds what DeepSpeed made.
"""

from __future__ import annotations


def share_fp32_partition(engine) -> int:
    """ZeRO-3 in fp32: let the optimizer step the trained partition itself instead of a clone of it.

    DeepSpeed's stage 3 means to skip the clone when the partition is already fp32 on the optimizer's
    device (its own torch-autocast path steps the partition directly), but it compares a
    `torch.device` with a device name, which is never equal, so every fp32 run holds the trained
    partition twice (0.34 GB per worker for MHR on the T5-large-shaped benchmark). Call right after
    `deepspeed.initialize`, before a step or a checkpoint load. Returns the bytes no longer held."""
    optimizer = engine.optimizer
    masters = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    partitions = getattr(optimizer, "fp16_partitioned_groups_flat", None)
    if (not masters or partitions is None or len(masters) != len(partitions)
            or getattr(optimizer, "offload_optimizer", True) or getattr(optimizer, "params_in_nvme_and_cpu", True)):
        return 0  # offloaded masters live elsewhere by design; not a stage-3 optimizer we know
    state = getattr(getattr(optimizer, "optimizer", None), "state", {})
    freed = 0
    for i, (master, partition) in enumerate(zip(masters, partitions)):
        if (master is partition or master in state or master.dtype != partition.dtype
                or master.device != partition.device or master.shape != partition.shape):
            continue
        partition.ds_id = master.ds_id
        partition.requires_grad = True  # as DeepSpeed marks its masters (an inner optimizer may check it)
        masters[i] = partition
        freed += master.numel() * master.element_size()
    return freed


def release_optimizer_states(engine) -> None:
    """Drop the optimizer's states (Adam's two moments) after the last step, before `final/` is
    written: under ZeRO-3 writing gathers tensors group by group, and that should not come on top of
    states nothing will read again (the last checkpoint holds them). The engine cannot step after."""
    optimizer = engine.optimizer
    inner = getattr(optimizer, "optimizer", optimizer)
    state = getattr(inner, "state", None)
    if state is not None:
        state.clear()


def return_freed_heap() -> None:
    """Give the heap's free pages back to the OS (glibc's `malloc_trim`; nothing elsewhere).

    Tensors under `MALLOC_MMAP_THRESHOLD_` (1 MB for training workers, 128 KB under ZeRO-3:
    `mttl.ray_utils.worker_env`) come from the heap; setting up a ZeRO-3 engine frees many of them
    (each adapter tensor built whole, then partitioned and copied into DeepSpeed's flat buffers)
    between live ones, and glibc only trims the heap's top, so those pages stayed resident for the
    whole run."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        trim = None
    if trim is not None:
        trim(0)

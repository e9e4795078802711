"""Device and numeric precision of every command: where a process computes, and in which dtype.

Owns the meaning of `use_gpu` (auto / True / False), `precision` (32 / bf16 / 16) and
`backbone_dtype` (auto / 32 / bf16 / 16) for pre-training workers, `mttl finetune`,
`mttl evaluate`, sweep trials and the quick start's tasks:
- the GPUs a process may use: inside a Ray task or actor only those Ray assigned to it
  (`ray.get_gpu_ids()`), elsewhere the CUDA devices torch sees; a Ray cluster's are its `GPU`
  resources. `auto` uses a GPU when there is one; `True` where none can be had is a ConfigError
  naming the key, raised before Ray starts any worker.
- plain-torch loops (fine-tuning, evaluation) keep the model and the batches on the device and
  compute under `torch.autocast` in bf16 or fp16, fp16 with a gradient scaler; every trainable
  parameter, adapters and routing logits included, stays an fp32 master weight. A frozen backbone
  may be held in half precision (`backbone_dtype`), halving its memory.
- DeepSpeed engines (pre-training) get the same precision through their bf16/fp16 sections
  (`mttl.train.deepspeed_config`); the driver resolves `auto` against the cluster's GPUs.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import torch

from mttl.errors import ConfigError

DTYPES = {"32": torch.float32, "bf16": torch.bfloat16, "16": torch.float16}
AUTO = "auto"
_FALLBACK = "set -k use_gpu=auto (a GPU when there is one) or use_gpu=False"


def requested_gpu(cfg) -> bool | None:
    """`use_gpu` as True, False, or None for `auto`."""
    return None if cfg.use_gpu == AUTO else bool(cfg.use_gpu)


def in_ray_worker() -> bool:
    """True inside a Ray task or actor (not on a driver), without starting Ray."""
    if "ray" not in sys.modules:
        return False
    import ray

    if not ray.is_initialized():
        return False
    from ray._private.worker import WORKER_MODE, global_worker

    return global_worker.mode == WORKER_MODE


def process_gpus() -> int:
    """GPUs this process may use: in a Ray task or actor the ones Ray assigned it, else CUDA's."""
    if not torch.cuda.is_available():
        return 0
    if in_ray_worker():
        import ray

        return len(ray.get_gpu_ids())
    return torch.cuda.device_count()


def uses_gpu(cfg) -> bool:
    """Whether this process computes on a GPU under `cfg` (auto: when it has one); no check."""
    wanted = requested_gpu(cfg)
    return process_gpus() > 0 if wanted is None else wanted


def resolve_device(cfg) -> torch.device:
    """The device of a plain-torch loop in this process; ConfigError for use_gpu=True without a GPU."""
    wanted = requested_gpu(cfg)
    if wanted is False:
        return torch.device("cpu")
    if process_gpus() > 0:
        return torch.device("cuda", torch.cuda.current_device())  # Ray narrows CUDA_VISIBLE_DEVICES
    if wanted:
        if in_ray_worker():
            raise ConfigError("use_gpu=True but Ray gave this task no GPU; give trials GPUs with "
                              f"-k trial_resources=\"{{'CPU': 1, 'GPU': 0.25}}\", or {_FALLBACK}")
        raise ConfigError(f"use_gpu=True but this machine has no GPU torch can use (torch.cuda.is_available() is "
                          f"False); {_FALLBACK}")
    return torch.device("cpu")


def check_before_ray(cfg, *, deepspeed: bool = False) -> None:
    """The checks a command makes before Ray starts: precision keys, and use_gpu=True on a machine
    without a GPU when the command would start its own local cluster (a joined cluster's GPUs are
    checked by `cluster_uses_gpu` once connected, still before any worker starts).

    `deepspeed`: DeepSpeed's bf16/fp16 modes hold the whole module in that dtype, so an fp32
    backbone cannot be kept there and asking for one is refused rather than ignored."""
    dtype = backbone_dtype(cfg)
    if deepspeed and cfg.precision != "32" and dtype == torch.float32 and cfg.backbone_dtype != AUTO:
        raise ConfigError(f"backbone_dtype=32 cannot hold in pre-training with precision={cfg.precision}: DeepSpeed's "
                          f"{cfg.precision} mode keeps the whole module in that dtype (fp32 master weights for "
                          "the trained ones); set -k backbone_dtype=auto, or precision=32")
    joining = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if requested_gpu(cfg) and not (joining and joining != "local") and process_gpus() == 0:
        raise ConfigError(f"use_gpu=True but this machine has no GPU torch can use (torch.cuda.is_available() is "
                          f"False) and no Ray cluster is joined (ray_address); {_FALLBACK}")


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def cluster_uses_gpu(cfg) -> bool:
    """Ray workers get GPUs: use_gpu=True (the cluster must have some), auto (when it has some)."""
    wanted = requested_gpu(cfg)
    if wanted is False:
        return False
    gpus = cluster_gpus()
    if wanted and gpus <= 0:
        raise ConfigError(f"use_gpu=True but the Ray cluster has no GPU resources; start its nodes with GPUs "
                          f"(`ray start --num-gpus=N`), or {_FALLBACK}")
    return gpus > 0


def backbone_dtype(cfg) -> torch.dtype:
    """The dtype of the frozen backbone weights: `backbone_dtype`, auto = bf16 under precision=bf16.

    A half-precision backbone runs under autocast of the same dtype, so it must match `precision`."""
    value = cfg.backbone_dtype
    if value == AUTO:
        # T5's activations overflow fp16, so auto keeps an fp32 backbone under precision=16
        value = "bf16" if cfg.precision == "bf16" else "32"
    if value != "32" and value != cfg.precision:
        raise ConfigError(f"backbone_dtype={value} needs precision={value} (a half-precision backbone runs under "
                          f"autocast of its dtype); set -k precision={value}, or backbone_dtype=auto")
    return DTYPES[value]


def check_precision(precision: str, device: torch.device) -> None:
    if precision == "16" and device.type != "cuda":
        raise ConfigError("precision=16 needs a GPU (fp16 autocast with a gradient scaler); on CPU set "
                          "-k precision=bf16 or precision=32")


@dataclass(frozen=True)
class Precision:
    """How a plain-torch loop computes on `device`: autocast dtype and gradient scaler."""

    device: torch.device
    precision: str = "32"

    def __post_init__(self):
        check_precision(self.precision, self.device)

    def autocast(self):
        if self.precision == "32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=DTYPES[self.precision])

    def scaler(self) -> torch.amp.GradScaler:
        """A GradScaler that scales under fp16 and passes through otherwise."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "16")

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def for_model(model: torch.nn.Module, precision: str) -> Precision:
    """The precision policy of a model already placed on its device."""
    return Precision(model_device(model), precision)


def adapter_tensor_ids(model: torch.nn.Module) -> set[int]:
    """ids of the adapter and routing parameters (not the wrapped layers' own weight and bias)."""
    from mttl.adapters.base import AdaptedLinear

    ids = set()
    for module in model.modules():
        if type(module).__module__.startswith("mttl.adapters."):
            for name, param in module.named_parameters(recurse=False):
                if not (isinstance(module, AdaptedLinear) and name in ("weight", "bias")):
                    ids.add(id(param))
    return ids


@torch.no_grad()
def cast_frozen_backbone(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Frozen backbone parameters to `dtype`; adapters, routing logits and trained weights stay fp32.

    Casting after loading (not loading in `dtype`) keeps every trained weight's fp32 values."""
    if dtype == torch.float32:
        return
    keep = adapter_tensor_ids(model)
    for param in model.parameters():
        if not param.requires_grad and id(param) not in keep and param.is_floating_point():
            param.data = param.data.to(dtype)


@torch.no_grad()
def place_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` on `device`, every trainable parameter an fp32 master weight (the optimizer's)."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model.to(device)

"""The DeepSpeed config of a run: explicit batch arithmetic, ZeRO stage, precision, clipping.

`train_batch_size` is the global batch: micro batch × gradient_accumulation_steps × workers. It
must divide exactly; DeepSpeed checks the same identity and would otherwise fail inside a worker.
Offload: `offload_optimizer` / `offload_params` = cpu map to DeepSpeed's offload sections.
ZeRO-3: `zero3_live_parameters` bounds the gathered parameters (`zero3_gather_limits`).
Precision: `bf16` and `16` turn on DeepSpeed's bf16 / fp16 (dynamic loss scaling) modes, which hold
the module in half precision and keep fp32 master copies of the trained parameters in the optimizer.
"""

from __future__ import annotations

from mttl.config import Config
from mttl.device import uses_gpu
from mttl.errors import ConfigError


def micro_batch_size(cfg: Config, world_size: int) -> int:
    per_step = cfg.gradient_accumulation_steps * world_size
    if cfg.gradient_accumulation_steps < 1 or cfg.train_batch_size % per_step:
        raise ConfigError(
            f"train_batch_size={cfg.train_batch_size} is not divisible by gradient_accumulation_steps="
            f"{cfg.gradient_accumulation_steps} × num_workers={world_size}; set train_batch_size to a "
            f"multiple of {per_step}")
    return cfg.train_batch_size // per_step


def offload_sections(cfg: Config) -> dict:
    """`offload_optimizer` / `offload_params` as DeepSpeed's `zero_optimization` offload sections."""
    sections: dict = {}
    if cfg.offload_optimizer == "cpu":
        if cfg.zero_stage < 1:
            raise ConfigError("offload_optimizer=cpu needs ZeRO (stage 1-3); "
                              "set -k zero_stage=2, or offload_optimizer=none")
        sections["offload_optimizer"] = {"device": "cpu", "pin_memory": uses_gpu(cfg)}
    if cfg.offload_params == "cpu":
        if cfg.zero_stage != 3:
            raise ConfigError("offload_params=cpu needs zero_stage=3 (only ZeRO-3 partitions the weights); set "
                              "-k zero_stage=3, or offload_params=none")
        sections["offload_param"] = {"device": "cpu", "pin_memory": uses_gpu(cfg)}
    return sections


# the fewest elements an optimizer sub-group gets: many tiny groups would make the step slow
SUB_GROUP_FLOOR = 10**7


def zero3_gather_limits(cfg: Config, largest_layer: int) -> dict:
    """DeepSpeed's stage-3 settings bounding the parameters gathered at once: `zero3_live_parameters`,
    else twice the largest layer. DeepSpeed's defaults (1e9 live, 1e9 reuse distance) keep every
    gathered layer of a sub-billion backbone until the step ends: the partition plus the whole
    model, more than ZeRO-0 holds."""
    live = int(cfg.zero3_live_parameters or 2 * largest_layer)
    # the gradient reduce bucket too: DeepSpeed's 5e8 elements are 2 GB (fp32) allocated per worker;
    # and the optimizer's sub-groups: Adam's step makes temporaries the size of the group it updates,
    # which at DeepSpeed's 1e9 elements is the worker's whole trained partition at once
    return {"stage3_max_live_parameters": live, "stage3_max_reuse_distance": live,
            "stage3_prefetch_bucket_size": max(live // 2, 1), "reduce_bucket_size": live,
            "sub_group_size": max(live, SUB_GROUP_FLOOR)}


def largest_layer_params(model) -> int:
    """Most parameters held directly by one module, counted whole under ZeRO-3 (`ds_numel`)."""
    return max((sum(getattr(p, "ds_numel", p.numel()) for p in m.parameters(recurse=False)) for m in model.modules()),
               default=0)


def save_group_numel(cfg: Config, model) -> int:
    """The most elements gathered at once to save a ZeRO-3 model (its adapters, a trained backbone):
    the same bound as the training steps' live parameters, so a save never peaks above a step."""
    return zero3_gather_limits(cfg, largest_layer_params(model))["stage3_max_live_parameters"]


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """A DeepSpeed config dict for `deepspeed.initialize` with a client optimizer and scheduler."""
    if cfg.precision == "16" and not uses_gpu(cfg):
        raise ConfigError("precision=16 needs GPUs (use_gpu=True or auto on GPU workers); on CPU use precision=bf16 "
                          "or 32")
    zero: dict = {"stage": cfg.zero_stage}
    zero.update(offload_sections(cfg))
    if cfg.zero_stage == 3:
        # adapters are gathered explicitly when saved; never gather the whole model implicitly
        zero["stage3_gather_16bit_weights_on_model_save"] = False
        if cfg.zero3_live_parameters:
            zero.update(zero3_gather_limits(cfg, 0))  # else from the built model: `zero3_gather_limits`
    config = {
        "train_batch_size": cfg.train_batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size(cfg, world_size),
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "zero_optimization": zero,
        # the client optimizer (AdamW, Adafactor …) is not one of DeepSpeed's own
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.offload_optimizer == "cpu":
        # the client torch optimizer then steps on the CPU copies; DeepSpeed otherwise insists on its
        # own CPU Adam, a compiled op that Adafactor/SGD runs and CPU-only machines do not have
        config["zero_force_ds_cpu_optimizer"] = False
    if cfg.max_grad_norm and cfg.max_grad_norm > 0:
        config["gradient_clipping"] = cfg.max_grad_norm
    if cfg.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif cfg.precision == "16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return config

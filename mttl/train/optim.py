"""Client optimizer and learning-rate schedule handed to DeepSpeed.

Parameter groups come from `mttl.adapters.param_groups` (routing logits, adapters, the rest,
each with its own learning rate and weight decay). The schedule is linear warm-up then linear
decay to zero at `total_steps`, applied to every group relative to its own peak rate.
"""

from __future__ import annotations

import torch

from mttl.config import Config
from mttl.errors import ConfigError


def optimizer_groups(model: torch.nn.Module, cfg: Config) -> list[dict]:
    from mttl.adapters import param_groups

    groups = param_groups(model, learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
                          adapters_learning_rate=cfg.adapters_learning_rate,
                          adapters_weight_decay=cfg.adapters_weight_decay,
                          module_logits_learning_rate=cfg.module_logits_learning_rate)
    groups = [g for g in groups if len(list(g["params"]))]
    if not groups:
        raise ConfigError(f"trainable_param_names={cfg.trainable_param_names!r} matches no parameter of "
                          f"model={cfg.model!r} with model_modifier={cfg.model_modifier!r}; fix the regex")
    return groups


def build_optimizer(groups: list[dict], cfg: Config) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, eps=cfg.adam_epsilon)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.learning_rate, eps=cfg.adam_epsilon)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.learning_rate)
    from transformers.optimization import Adafactor

    return Adafactor(groups, lr=None if cfg.adafactor_relative_step else cfg.learning_rate,
                     scale_parameter=cfg.adafactor_scale_parameter,
                     relative_step=cfg.adafactor_relative_step, warmup_init=cfg.adafactor_warmup_init)


def warmup_steps(cfg: Config, total_steps: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps >= 0 else int(cfg.warmup_proportion * total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, total_steps: int, warmup: int):
    from transformers import get_constant_schedule, get_linear_schedule_with_warmup

    if cfg.scheduler == "constant":
        return get_constant_schedule(optimizer)
    return get_linear_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)

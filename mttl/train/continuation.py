"""Pre-training that starts from a previous run, and the paper's zero-shot extensions (MHR-µ).

- `checkpoint` (a finished run folder): the new run starts from that run's adapters and routing,
  on its trained backbone when it saved one; the architecture and data keys the user did not set
  come from that run's config (the rule `mttl finetune` follows). Optimizer, schedule and step
  count start afresh, as the reference's `load_from_checkpoint` in pl_train.py.
- `switch_to_avg_modules`: after loading, every learned router is replaced by the uniform 1/K
  average, so the run trains the averaged adapters on the multi-task data.
- `uniform_interp_steps` = N: over the last N steps routing is pulled towards uniform,
  w ← α·w + (1 − α)/K with α = cos(π/2 · n/N), n = N − (total_steps − step).

`continuation_config` and `check_checkpoint_tasks` run on the driver, so a wrong combination fails
as one line before Ray starts; `start_from_checkpoint` and `uniform_alpha` run on every worker.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from mttl.adapters.registry import LEARNED_ROUTING_MODIFIERS
from mttl.config import Config
from mttl.errors import ConfigError

# Keys that must equal the checkpoint's for its tensors to fit, plus the data it trained on; a key
# the user leaves unset takes the checkpoint's value.
INHERITED_KEYS = (
    "model", "tokenizer", "tiny_d_model", "tiny_num_layers", "model_modifier", "lora_rank", "lora_alpha",
    "n_skills", "n_splits", "router_selector", "router_granularity", "modify_modules", "modify_layers",
    "module_logits_relaxed_bernoulli", "module_logits_straight_through", "module_logits_l2_norm",
    "poly_use_shared_skill", "poly_average_correction", "trainable_param_names", "non_trainable_param_names",
    "dataset", "data_dir", "tasks", "custom_tasks_splits", "max_input_length", "max_output_length",
)
# AdapterConfig field -> config key, for the settings that decide the saved tensors' shapes
SHAPE_KEYS = (("modifier", "model_modifier"), ("rank", "lora_rank"), ("n_skills", "n_skills"),
              ("n_splits", "n_splits"), ("granularity", "router_granularity"),
              ("modify_modules", "modify_modules"), ("modify_layers", "modify_layers"))


def checkpoint_run(cfg: Config) -> Path:
    from mttl.models.run import resolve_run_dir

    return resolve_run_dir(cfg.checkpoint_path())


def continuation_config(cfg: Config) -> Config:
    """`cfg` with the checkpoint's unset keys filled in; ConfigError for a combination that cannot run."""
    from mttl.adapters import AdapterConfig, read_adapter_config
    from mttl.models.run import ADAPTERS_DESCRIPTION, FINAL_DIR, backbone_source

    if not cfg.checkpoint:
        if cfg.switch_to_avg_modules:
            raise ConfigError("switch_to_avg_modules continues a pre-trained run's adapters: set "
                              "-k checkpoint=$output_dir/$run_name of a finished `mttl pretrain` run")
        check_uniform_interp(cfg)
        return cfg
    run_dir = checkpoint_run(cfg)
    run_cfg = Config.load(run_dir / "config.json")
    merged = cfg.copy()
    for key in INHERITED_KEYS:
        if not cfg.was_overridden(key):
            setattr(merged, key, getattr(run_cfg, key))
    if not cfg.was_overridden("model"):
        # a backbone the checkpoint trained (or built from a config) is saved in its final/
        merged.model = backbone_source(run_cfg, run_dir)
    merged.checkpoint = str(run_dir)
    merged._derive()
    has_adapters = (run_dir / FINAL_DIR / ADAPTERS_DESCRIPTION).is_file()
    if merged.switch_to_avg_modules and not (has_adapters and merged.model_modifier in LEARNED_ROUTING_MODIFIERS):
        raise ConfigError(f"switch_to_avg_modules needs a checkpoint with routed adapters (model_modifier poly or "
                          f"poly_ia3); '{run_dir}' has model_modifier={run_cfg.model_modifier!r}")
    if has_adapters:
        saved = read_adapter_config(run_dir / FINAL_DIR)
        wanted = AdapterConfig.from_config(merged.copy(n_tasks=saved.n_tasks))
        for field, key in SHAPE_KEYS:
            if getattr(saved, field) != getattr(wanted, field):
                raise ConfigError(f"config key '{key}' is {getattr(wanted, field)!r} but the checkpoint '{run_dir}' "
                                  f"was trained with {getattr(saved, field)!r}; leave it unset to take the "
                                  "checkpoint's value, or use a new run without checkpoint")
    check_uniform_interp(merged)
    return merged


def check_uniform_interp(cfg: Config) -> None:
    if not cfg.uniform_interp_steps:
        return
    if cfg.model_modifier not in LEARNED_ROUTING_MODIFIERS or cfg.router_selector != "poly":
        raise ConfigError(f"uniform_interp_steps anneals learned routing to uniform; it needs model_modifier poly "
                          f"or poly_ia3 with router_selector=poly (got {cfg.model_modifier!r}, "
                          f"{cfg.router_selector!r}); set -k uniform_interp_steps=0")
    if cfg.switch_to_avg_modules:
        raise ConfigError("uniform_interp_steps has nothing to anneal with switch_to_avg_modules=True (routing is "
                          "already uniform); set -k uniform_interp_steps=0")
    if cfg.uniform_interp_steps > cfg.total_steps:
        raise ConfigError(f"uniform_interp_steps={cfg.uniform_interp_steps} is more than total_steps="
                          f"{cfg.total_steps}; the annealing covers the last N steps, so choose N <= total_steps")


def check_checkpoint_tasks(cfg: Config, tasks: dict[str, int]) -> None:
    """Learned routing rows carry over only onto the same task table."""
    from mttl.adapters import read_adapter_config
    from mttl.models.run import ADAPTERS_DESCRIPTION, FINAL_DIR, read_tasks_file

    if not cfg.checkpoint or cfg.switch_to_avg_modules:
        return
    run_dir = Path(cfg.checkpoint)
    if not (run_dir / FINAL_DIR / ADAPTERS_DESCRIPTION).is_file():
        return
    if read_adapter_config(run_dir / FINAL_DIR).selector != "poly":
        return
    if read_tasks_file(run_dir) != tasks:
        raise ConfigError(f"checkpoint '{run_dir}' routed other tasks than this run's {len(tasks)}; continue on the "
                          "same tasks (leave data_dir and tasks unset), or set -k switch_to_avg_modules=True, which "
                          "replaces the routing by the average")


def start_from_checkpoint(model: torch.nn.Module, cfg: Config) -> None:
    """Load the checkpoint's adapters and routing into a freshly built model; then average it if asked."""
    from mttl.adapters import load_adapters, ops, read_adapter_config
    from mttl.models.run import ADAPTERS_DESCRIPTION, FINAL_DIR

    final = Path(cfg.checkpoint) / FINAL_DIR
    if (final / ADAPTERS_DESCRIPTION).is_file():
        saved = read_adapter_config(final)
        if cfg.switch_to_avg_modules and saved.selector == "poly" and saved.n_tasks != cfg.n_tasks:
            # the saved routing only has to fit until it is replaced by the average
            ops.resize_routing(model, saved.n_tasks)
        load_adapters(model, final)
    if cfg.switch_to_avg_modules:
        ops.switch_to_average(model)


def uniform_alpha(step: int, total_steps: int, interp_steps: int) -> float:
    """α after `step` completed optimizer steps (the reference's PolytroponUniformInterpolation)."""
    if interp_steps <= 0:
        return 1.0
    n = interp_steps - (total_steps - step)
    if n < 0:
        return 1.0
    return math.cos(math.pi / 2 * n / interp_steps)

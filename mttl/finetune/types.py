"""Finetune types: which checkpoint settings a few-shot run inherits and which weights it trains.

What each type trains and starts from is the table `mttl.finetune.type_table.FINETUNE_TYPES`; this
module builds the model it describes. Architecture keys come from the checkpoint's config unless
the user set them (`was_overridden`), as the reference's ARGS_TO_OVERWRITE; learning rates are
never inherited. On T0 data the keys the user did not set then take the reference's T0 few-shot
values (`mttl.finetune.presets`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mttl.adapters.registry import ROUTED_MODIFIERS
from mttl.config import Config
from mttl.errors import CheckpointError, ConfigError
from mttl.finetune.type_table import FINETUNE_TYPE_CHOICES, finetune_type

# The reference's ARGS_TO_OVERWRITE in this repo's key names, plus the keys that rebuild the same
# backbone and tokenizer (tiny-t5 size, tokenizer, LoRA scaling) and find the held-out data. Its
# prompt keys (use_task_descriptions, num_pos_examples, use_t0_templates_as_tasks) are not here:
# they shaped the data, which `mttl prepare` fixed in the shards.
INHERITED_KEYS = (
    "dataset", "data_dir", "router_granularity", "lora_rank", "lora_alpha", "max_input_length",
    "max_output_length", "model", "tokenizer", "tiny_d_model", "tiny_num_layers", "n_skills",
    "n_splits", "n_tasks", "module_logits_relaxed_bernoulli",
    "module_logits_straight_through", "module_logits_l2_norm", "poly_use_shared_skill",
    "poly_average_correction", "router_selector", "modify_modules", "modify_layers", "model_modifier",
    "trainable_param_names",
)
# The (IA)³ recipe (T-Few; the reference's t0/ia3.json): scale keys, values and the FFN's first
# branch only, whatever layers the checkpoint's own (absent) adapters would have used.
IA3_MODULES, IA3_LAYERS = ".*SelfAttention|.*EncDecAttention|.*DenseReluDense", "k|v|wi_1.*"


@dataclass
class FinetuneModel:
    cfg: Config  # the fine-tuning config after inheritance and the type's trainable regex
    model: torch.nn.Module  # RoutedModel; the held-out task is routing row 0
    tokenizer: object
    run_dir: Path  # the checkpoint's run folder


def inherit_checkpoint_config(run_cfg: Config, cfg: Config) -> Config:
    """`cfg` with every architecture key taken from the checkpoint unless the user set it, then the
    dataset's few-shot presets for the keys still unset (T0: the reference's T0 settings)."""
    from mttl.finetune.presets import apply_presets

    merged = cfg.copy()
    for key in INHERITED_KEYS:
        if not cfg.was_overridden(key):
            setattr(merged, key, getattr(run_cfg, key))
    merged._derive()
    return apply_presets(merged, cfg, cfg.finetune_task_name)


def finetune_config(run_cfg: Config, cfg: Config) -> Config:
    """The inherited config with the type's trainable parameters; ConfigError for impossible pairs."""
    kind = cfg.finetune_type
    merged = inherit_checkpoint_config(run_cfg, cfg)
    routed = merged.model_modifier in ROUTED_MODIFIERS
    if finetune_type(kind).needs_routed_checkpoint and not routed:
        raise ConfigError(f"finetune_type={kind} needs a routed checkpoint (model_modifier poly/poly_ia3), but "
                          f"'{cfg.checkpoint}' has model_modifier={merged.model_modifier!r}; "
                          "use finetune_type=A or None")
    if kind == "A":
        if run_cfg.model_modifier in ROUTED_MODIFIERS:
            raise ConfigError(f"finetune_type=A is for lora/ia3 or full-model checkpoints, but '{cfg.checkpoint}' "
                              f"is routed ({run_cfg.model_modifier}); use finetune_type=Poly, Z or MuZ")
        if merged.model_modifier is None:
            raise ConfigError(f"finetune_type=A adds adapters to '{cfg.checkpoint}', which has none: "
                              "set -k model_modifier=ia3 (or lora), e.g. -c t0/ia3.json")
        if merged.model_modifier in ROUTED_MODIFIERS:
            raise ConfigError(f"finetune_type=A trains lora/ia3 adapters, got model_modifier="
                              f"{merged.model_modifier}; use finetune_type=PolyRand for fresh routed adapters")
        if run_cfg.model_modifier is None and merged.model_modifier == "ia3":
            for key, value in (("modify_modules", IA3_MODULES), ("modify_layers", IA3_LAYERS)):
                if not cfg.was_overridden(key):
                    setattr(merged, key, value)
    trainable = finetune_type(kind).trainable_param_names
    if trainable is not None and not cfg.was_overridden("trainable_param_names"):
        merged.trainable_param_names = trainable
    return merged


def checkpoint_finetune_config(cfg: Config) -> Config:
    """`finetune_config` against the checkpoint `cfg.checkpoint` names (its run folder's config.json)."""
    from mttl.models.run import resolve_run_dir

    if not cfg.checkpoint:
        raise ConfigError("fine-tuning needs a pre-trained run: -k checkpoint=$output_dir/$run_name")
    return finetune_config(Config.load(resolve_run_dir(cfg.checkpoint_path()) / "config.json"), cfg)


def load_for_finetuning(cfg: Config) -> FinetuneModel:
    """The checkpoint's model prepared for `cfg.finetune_type`, with routing row 0 for the new task,
    on the device `use_gpu` gives this process (frozen backbone in `backbone_dtype`)."""
    from mttl import device
    from mttl.adapters import load_adapters, ops
    from mttl.adapters.inject import adapter_config
    from mttl.models.run import FINAL_DIR, backbone_source, build_routed_model, resolve_run_dir
    from mttl.models.tokenizer import load_tokenizer

    if cfg.finetune_type not in FINETUNE_TYPE_CHOICES:
        raise ConfigError(f"finetune_type={cfg.finetune_type!r} is not one of "
                          f"{[t for t in FINETUNE_TYPE_CHOICES if t]} or None")
    if not cfg.checkpoint:
        raise ConfigError("fine-tuning needs a pre-trained run: -k checkpoint=$output_dir/$run_name")
    run_dir = resolve_run_dir(cfg.checkpoint_path())
    run_cfg = Config.load(run_dir / "config.json")
    merged = finetune_config(run_cfg, cfg)
    target = device.resolve_device(merged)
    device.check_precision(merged.precision, target)
    backbone = backbone_source(run_cfg, run_dir)
    tokenizer = load_tokenizer(merged.tokenizer, model=backbone, cache_dir=merged.cache_dir)
    model = build_routed_model(merged, tokenizer, backbone=backbone, dtype=device.backbone_dtype(merged))
    kind = finetune_type(cfg.finetune_type)
    same_adapters = merged.model_modifier == run_cfg.model_modifier and run_cfg.model_modifier is not None
    if not kind.fresh_adapters and same_adapters:
        if not (run_dir / FINAL_DIR / "adapters.json").is_file():
            raise CheckpointError(f"run folder '{run_dir}' has no {FINAL_DIR}/adapters.json; finish the run first")
        load_adapters(model, run_dir / FINAL_DIR)
    if merged.model_modifier in ROUTED_MODIFIERS:
        learned = adapter_config(model).selector == "poly"  # a switch_to_avg_modules run saved the average
        if kind.average_routing:
            if learned:
                ops.switch_to_average(model)
        elif learned:
            ops.resize_routing(model, 1)
        elif adapter_config(model).selector == "average":
            raise ConfigError(f"'{run_dir}' was saved with average routing (switch_to_avg_modules), so it has no "
                              f"routing to train: use finetune_type=MuZ")
    set_trainable(model, merged.trainable_param_names, merged.non_trainable_param_names)
    if merged.freeze_embeds:
        from mttl.adapters.inject import freeze_embeddings

        freeze_embeddings(model)
    device.place_model(model, target)
    return FinetuneModel(cfg=merged, model=model, tokenizer=tokenizer, run_dir=run_dir)


def set_trainable(model: torch.nn.Module, trainable: str, frozen: str | None) -> None:
    """Train exactly what `trainable` (not `frozen`) matches, after the routing operations (whose
    new parameters would otherwise keep their constructor default); ConfigError when nothing trains."""
    from mttl.adapters.inject import base_model, freeze

    freeze(base_model(model), trainable, frozen)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"trainable_param_names={trainable!r} matches no parameter of the fine-tuned model; "
                          "fix the regex")

"""Injection of adapters into any Hugging Face model, freezing, and optimizer parameter groups.

`modify_model` wraps the matching linear layers in place with the layer kind the registry names
for the modifier (one router per granularity group for routed modifiers), records the
`AdapterConfig` on the model and freezes by the trainable regexes.
`adapted_layers`, `selectors` and `adapter_tensors` enumerate what was injected.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from mttl.adapters.base import LINEAR_TYPES, AdaptedLinear
from mttl.adapters.config import AdapterConfig
from mttl.adapters.registry import layer_class
from mttl.adapters.routing import Selector, build_selector, group_key
from mttl.errors import ConfigError

CONFIG_ATTRIBUTE = "mttl_adapter_config"


def _compile(regex: str, key: str) -> re.Pattern:
    try:
        return re.compile(regex)
    except re.error as err:
        raise ConfigError(f"config key '{key}' is not a valid regex ({regex!r}: {err})") from None


def base_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a `RoutedModel` (or the model itself)."""
    return getattr(model, "hf_model", model)


def adapter_config(model: nn.Module) -> AdapterConfig | None:
    """The `AdapterConfig` `modify_model` recorded on the model, if any."""
    return getattr(base_model(model), CONFIG_ATTRIBUTE, None)


def set_adapter_config(model: nn.Module, acfg: AdapterConfig | None) -> None:
    setattr(base_model(model), CONFIG_ATTRIBUTE, acfg)


def _wrap(layer: nn.Module, name: str, acfg: AdapterConfig, selector: Selector | None) -> AdaptedLinear:
    return layer_class(acfg.modifier).from_adapter_config(layer, name, acfg, selector)


def modify_model(model: nn.Module, acfg: AdapterConfig) -> nn.Module:
    """Wrap every nn.Linear / Conv1D child whose parent's dotted name fully matches
    `modify_modules` and whose own name fully matches `modify_layers`; then freeze."""
    hf_model = base_model(model)
    if acfg.modifier is not None:
        if adapter_config(hf_model) is not None:
            raise ConfigError("the model already has adapters; build a fresh backbone before modify_model")
        modules_re = _compile(acfg.modify_modules, "modify_modules")
        layers_re = _compile(acfg.modify_layers, "modify_layers")
        targets = [(parent, f"{parent_name}.{child_name}" if parent_name else child_name, child_name, child)
                   for parent_name, parent in hf_model.named_modules()
                   if modules_re.fullmatch(parent_name)
                   for child_name, child in parent.named_children()
                   if layers_re.fullmatch(child_name) and isinstance(child, LINEAR_TYPES)]
        if not targets:
            raise ConfigError(f"no linear layer matches modify_modules={acfg.modify_modules!r} (parent module "
                              f"names) with modify_layers={acfg.modify_layers!r} (child names); print the "
                              f"model's named_modules() and adjust the regexes")
        groups: dict[str, Selector] = {}
        for parent, name, child_name, child in targets:
            selector = None
            if acfg.routed:
                key = group_key(name, acfg.granularity)
                selector = groups.setdefault(key, build_selector(acfg))
            setattr(parent, child_name, _wrap(child, name, acfg, selector))
        set_adapter_config(hf_model, acfg)
    freeze(hf_model, acfg.trainable_param_names, acfg.non_trainable_param_names)
    return model


def freeze(model: nn.Module, trainable_param_names: str, non_trainable_param_names: str | None = None) -> None:
    """Train exactly the parameters whose full name matches the first regex and not the second."""
    trainable_re = _compile(trainable_param_names, "trainable_param_names")
    frozen_re = _compile(non_trainable_param_names, "non_trainable_param_names") if non_trainable_param_names else None
    for name, param in model.named_parameters():
        param.requires_grad_(bool(trainable_re.fullmatch(name)) and not (frozen_re and frozen_re.fullmatch(name)))


def freeze_embeddings(model: nn.Module) -> None:
    """`freeze_embeds`: the token embeddings (and learned position embeddings, where a model has
    them) stay frozen whatever `trainable_param_names` says, as the reference's freeze_embeds. An
    output projection tied to the token embeddings is the same parameter, so it stays frozen too."""
    hf_model = base_model(model)
    modules = [hf_model.get_input_embeddings()]
    modules += [m for name, m in hf_model.named_modules() if name.rsplit(".", 1)[-1] == "embed_positions"]
    for module in modules:
        for param in module.parameters():
            param.requires_grad_(False)


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLinear]:
    return {name: m for name, m in base_model(model).named_modules() if isinstance(m, AdaptedLinear)}


def selectors(model: nn.Module) -> dict[str, Selector]:
    """Each selector once, under the name of the first layer that holds it."""
    return {name: m for name, m in base_model(model).named_modules() if isinstance(m, Selector)}


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter and routing tensors (parameters and buffers) by full name; never base weights."""
    out = {}
    for name, module in base_model(model).named_modules():
        if isinstance(module, AdaptedLinear):
            local = module.adapter_tensor_names + (("warmup_calls",) if getattr(module, "warmup", False) else ())
        elif isinstance(module, Selector):
            local = tuple(n for n, _ in module.named_parameters(recurse=False)) + \
                tuple(n for n, _ in module.named_buffers(recurse=False))
        else:
            continue
        for local_name in local:
            out[f"{name}.{local_name}"] = getattr(module, local_name)
    return out


def param_groups(model: nn.Module, cfg=None, *, learning_rate: float | None = None, weight_decay: float | None = None,
                 adapters_learning_rate: float | None = None, adapters_weight_decay: float | None = None,
                 module_logits_learning_rate: float | None = None) -> list[dict]:
    """Optimizer groups 'module_logits' (routing; no weight decay), 'adapters' and 'others', each
    with its own lr and weight decay; only trainable parameters; empty groups left out. Values
    come from the keywords, else from `cfg` (a run Config), else the defaults."""
    def pick(value, key, default):
        if value is not None:
            return value
        return getattr(cfg, key) if cfg is not None and getattr(cfg, key) is not None else default

    learning_rate = pick(learning_rate, "learning_rate", None)
    if learning_rate is None:
        raise ValueError("param_groups needs learning_rate (or a cfg)")
    weight_decay = pick(weight_decay, "weight_decay", 0.0)
    routing_ids = {id(p) for s in selectors(model).values() for p in s.parameters()}
    adapter_ids = {id(getattr(m, n)) for m in adapted_layers(model).values() for n in m.adapter_tensor_names}
    groups = {
        "module_logits": {"params": [], "lr": pick(module_logits_learning_rate, "module_logits_learning_rate", 0.1),
                          "weight_decay": 0.0},
        "adapters": {"params": [], "lr": pick(adapters_learning_rate, "adapters_learning_rate", learning_rate),
                     "weight_decay": pick(adapters_weight_decay, "adapters_weight_decay", weight_decay)},
        "others": {"params": [], "lr": learning_rate, "weight_decay": weight_decay},
    }
    for param in model.parameters():
        if not param.requires_grad:
            continue
        group = "module_logits" if id(param) in routing_ids else "adapters" if id(param) in adapter_ids else "others"
        groups[group]["params"].append(param)
    return [{"name": name, **group} for name, group in groups.items() if group["params"]]

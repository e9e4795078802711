"""Operations on a modified model's routing and adapters: routing rows for new tasks, switching to
average routing or to any registered router (`use_router`), interpolation towards uniform,
reading routing weights, collapsing one task's routed adapter into a plain LoRA, merging it into
the base weights, and removing adapters."""

from __future__ import annotations

import torch
from torch import nn

from mttl.adapters.ia3 import IA3Linear
from mttl.adapters.inject import adapted_layers, adapter_config, base_model, selectors, set_adapter_config
from mttl.adapters.lora import LoRALinear
from mttl.adapters.routing import AverageSelector, PolySelector, Selector, build_selector, fresh_logits
from mttl.adapters.skilled import SkilledIA3Linear, SkilledLoRALinear
from mttl.errors import ConfigError


def _poly_selectors(model: nn.Module, operation: str) -> list[PolySelector]:
    found = [s for s in selectors(model).values() if isinstance(s, PolySelector)]
    if not found:
        raise ConfigError(f"{operation} needs learned routing (model_modifier poly/poly_ia3 with "
                          "router_selector=poly); this model has none")
    return found


def _set_logits(selector: PolySelector, logits: torch.Tensor) -> None:
    old = selector.module_logits
    selector.module_logits = nn.Parameter(logits.to(old), requires_grad=old.requires_grad)


def _record_n_tasks(model: nn.Module, n_tasks: int) -> None:
    acfg = adapter_config(model)
    if acfg is not None:
        set_adapter_config(model, acfg.replace(n_tasks=n_tasks))


def add_task_rows(model: nn.Module, n_new: int) -> int:
    """Append `n_new` fresh U(±1e-3) routing rows to every PolySelector; returns the first new row.
    Build the optimizer afterwards: the logits are new Parameters."""
    if n_new < 1:
        raise ValueError(f"n_new must be >= 1, got {n_new}")
    found = _poly_selectors(model, "add_task_rows")
    first = found[0].n_tasks
    for selector in found:
        fresh = fresh_logits(n_new, selector.module_logits.shape[1])
        _set_logits(selector, torch.cat([selector.module_logits.detach(), fresh.to(selector.module_logits)]))
    _record_n_tasks(model, first + n_new)
    return first


def resize_routing(model: nn.Module, n_tasks: int) -> None:
    """Replace every PolySelector's logits by fresh U(±1e-3) ones of shape [n_tasks, S*K]."""
    for selector in _poly_selectors(model, "resize_routing"):
        _set_logits(selector, fresh_logits(n_tasks, selector.module_logits.shape[1]))
    _record_n_tasks(model, n_tasks)


def switch_to_average(model: nn.Module) -> None:
    """Replace every PolySelector by uniform 1/K routing (MHR-µ); layers sharing one keep sharing."""
    replacement: dict[int, AverageSelector] = {}
    for layer in adapted_layers(model).values():
        old = getattr(layer, "selector", None)
        if isinstance(old, PolySelector):
            if id(old) not in replacement:
                new = AverageSelector(old.n_splits, old.n_skills).to(old.module_logits.device)
                new.uniform_alpha = old.uniform_alpha
                replacement[id(old)] = new
            layer.selector = replacement[id(old)]
    acfg = adapter_config(model)
    if replacement and acfg is not None:
        set_adapter_config(model, acfg.replace(selector="average"))


def use_router(model: nn.Module, selector: str, **settings) -> None:
    """Route a trained model's skills with the router `selector` names from now on (e.g. "arrow"
    over a Poly/MHR or per-task LoRA library), built from the model's AdapterConfig with the
    `settings` (AdapterConfig fields, e.g. arrow_top_k) changed; layers sharing a router keep sharing."""
    acfg = adapter_config(model)
    if acfg is None or not acfg.routed:
        raise ConfigError(f"router_selector={selector} needs a routed checkpoint (model_modifier poly, poly_ia3 or "
                          f"skilled); this model has model_modifier={acfg.modifier if acfg else None!r}")
    wanted = acfg.replace(selector=selector, **settings)
    replacement: dict[int, Selector] = {}
    for layer in adapted_layers(model).values():
        old = layer.selector
        if id(old) not in replacement:
            replacement[id(old)] = build_selector(wanted).to(layer.weight.device)
        layer.selector = replacement[id(old)]
    set_adapter_config(model, wanted)


def set_uniform_interpolation(model: nn.Module, alpha: float) -> None:
    """Every selector returns alpha·w + (1 − alpha)/K from now on; alpha = 1 switches it off."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    for selector in selectors(model).values():
        selector.uniform_alpha = float(alpha)


@torch.no_grad()
def _eval_weights(selector: Selector, task_ids: torch.Tensor | None) -> torch.Tensor:
    """Evaluation-mode weights [len(task_ids), S, K] (no sampling, no dropout)."""
    was_training = selector.training
    selector.eval()
    try:
        return selector(task_ids).clone()
    finally:
        selector.train(was_training)


def routing_weights(model: nn.Module, task_ids=None) -> dict[str, torch.Tensor]:
    """Evaluation-mode routing weights [T, S, K] of each selector (all its tasks by default)."""
    out = {}
    for name, selector in selectors(model).items():
        if selector.routes_from_input:
            continue  # its weights depend on each token, not on the task
        if task_ids is not None:
            ids = torch.as_tensor(task_ids, dtype=torch.long).reshape(-1)
        elif isinstance(selector, PolySelector):
            ids = torch.arange(selector.n_tasks)
        elif isinstance(selector, AverageSelector):
            ids = None
        else:
            ids = torch.arange(selector.n_skills)
        out[name] = _eval_weights(selector, ids)
    return out


def task_lora(model: nn.Module, task_id: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """The plain LoRA each layer applies for `task_id` at evaluation: {layer: (A [r, d_in],
    B [d_out, r], scale)} with update scale·B A x (PEFT's lora_A / lora_B orientation)."""
    ids = torch.tensor([task_id])
    out = {}
    for name, layer in adapted_layers(model).items():
        if isinstance(layer, SkilledLoRALinear):
            with torch.no_grad():
                a, b = layer.mixed_lora(_eval_weights(layer.selector, ids).to(layer.lora_a))
            out[name] = (a[0].clone(), b[0].t().contiguous(), layer.scale * layer.warmup_factor())
        elif isinstance(layer, LoRALinear):
            out[name] = (layer.lora_a.detach().clone(), layer.lora_b.detach().clone(),
                         layer.scale * layer.warmup_factor())
    if not out:
        raise ConfigError("task_lora needs LoRA adapters (model_modifier lora, poly or skilled); this model has none")
    return out


def task_scales(model: nn.Module, task_id: int) -> dict[str, torch.Tensor]:
    """The per-feature (IA)³ scale [d_out] each (IA)³ layer applies for `task_id` at evaluation."""
    ids = torch.tensor([task_id])
    out = {}
    for name, layer in adapted_layers(model).items():
        if isinstance(layer, SkilledIA3Linear):
            with torch.no_grad():
                out[name] = layer.mixed_scale(_eval_weights(layer.selector, ids).to(layer.lora_a))[0]
        elif isinstance(layer, IA3Linear):
            out[name] = layer.multi_lora_b.detach().clone()
    return out


def remove_adapters(model: nn.Module) -> nn.Module:
    """Put the plain layers back (with their current weights), dropping adapters and routing."""
    hf_model = base_model(model)
    for name, layer in adapted_layers(hf_model).items():
        parent_name, _, child_name = name.rpartition(".")
        setattr(hf_model.get_submodule(parent_name), child_name, layer.to_plain())
    set_adapter_config(hf_model, None)
    return model


def merge_task_into_base(model: nn.Module, task_id: int) -> nn.Module:
    """Fold `task_id`'s adapters into the base weights (W += scale·B A; (IA)³: W, b *= l) and put
    the plain layers back; the model then computes that task's outputs without adapters."""
    layers = adapted_layers(model)
    if not layers:
        raise ConfigError("merge_task_into_base: the model has no adapters")
    has_lora = any(isinstance(layer, (LoRALinear, SkilledLoRALinear)) for layer in layers.values())
    loras = task_lora(model, task_id) if has_lora else {}
    scales = task_scales(model, task_id)
    for name, layer in layers.items():
        if name in loras:
            a, b, scale = loras[name]
            layer.add_to_weight(scale * (b @ a))
        else:
            layer.scale_output(scales[name])
    return remove_adapters(model)

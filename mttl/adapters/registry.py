"""The one registry of layer kinds (`model_modifier` values) and routers (`router_selector`
values): their names, which layer kinds are routed, and where each implementation lives.

Torch-free on purpose: `mttl.config.Config` derives its allowed values from here and is imported
by commands that never build a model, so implementations are named by "module:Class" and only
imported when a model is built (`layer_class`, `router_class`).

How to add a router: write a `Selector` subclass (task ids → weights per example) or an
`InputRouter` subclass (layer input → weights per token) with a `from_adapter_config(acfg)`
classmethod in its own module, and add one `RouterSpec` line to `ROUTERS`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class LayerKind:
    implementation: str  # "module:Class" of the AdaptedLinear subclass
    routed: bool  # mixes a skill inventory with a router
    learned_routing: bool  # its default router has trainable per-task logits
    help: str


@dataclass(frozen=True)
class RouterSpec:
    implementation: str  # "module:Class" of the Selector subclass
    help: str


LAYER_KINDS: dict[str, LayerKind] = {
    "lora": LayerKind("mttl.adapters.lora:LoRALinear", False, False, "one low-rank update per layer"),
    "ia3": LayerKind("mttl.adapters.ia3:IA3Linear", False, False, "(IA)³ per-feature scales"),
    "poly": LayerKind("mttl.adapters.skilled:SkilledLoRALinear", True, True,
                      "Poly/MHR routed LoRA (`poly_lora` accepted)"),
    "poly_ia3": LayerKind("mttl.adapters.skilled:SkilledIA3Linear", True, True, "routed (IA)³"),
    "skilled": LayerKind("mttl.adapters.skilled:SkilledLoRALinear", True, False,
                         "one private LoRA per task (a per-task LoRA library)"),
}

ROUTERS: dict[str, RouterSpec] = {
    "poly": RouterSpec("mttl.adapters.routing:PolySelector", "learned per-task logits"),
    "average": RouterSpec("mttl.adapters.routing:AverageSelector", "uniform 1/K"),
    "private": RouterSpec("mttl.adapters.routing:PrivateSelector", "one skill per task"),
    "arrow": RouterSpec("mttl.adapters.arrow:ArrowRouter",
                        "zero-shot per-token routing from the trained LoRA experts, for `mttl evaluate`"),
}

GRANULARITIES = ("finegrained", "coarsegrained", "coderwise", "blockwise", "layerwise")

MODIFIERS = (None, *LAYER_KINDS)
SELECTORS = tuple(ROUTERS)
ROUTED_MODIFIERS = tuple(name for name, kind in LAYER_KINDS.items() if kind.routed)
LEARNED_ROUTING_MODIFIERS = tuple(name for name, kind in LAYER_KINDS.items() if kind.learned_routing)


def is_routed(modifier: str | None) -> bool:
    return modifier in ROUTED_MODIFIERS


def _load(implementation: str):
    module, _, name = implementation.partition(":")
    return getattr(importlib.import_module(module), name)


def layer_class(modifier: str):
    return _load(LAYER_KINDS[modifier].implementation)


def router_class(selector: str):
    return _load(ROUTERS[selector].implementation)

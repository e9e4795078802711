"""Adapters and routing, torch only (no Ray): LoRA, (IA)³, routed Poly / MHR layers, routers,
injection into Hugging Face models, save/load, and routing operations.

The names below load on first use, so the torch-free `mttl.adapters.registry` (the allowed layer
kinds and routers, read by `mttl.config`) can be imported without torch."""

import importlib

_EXPORTS = {
    "AdapterConfig": "mttl.adapters.config", "adapted_layers": "mttl.adapters.inject",
    "modify_model": "mttl.adapters.inject", "param_groups": "mttl.adapters.inject",
    "selectors": "mttl.adapters.inject", "routing_context": "mttl.adapters.routing",
    "load_adapters": "mttl.adapters.state", "read_adapter_config": "mttl.adapters.state",
    "save_adapters": "mttl.adapters.state",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mttl.adapters' has no attribute {name!r}")

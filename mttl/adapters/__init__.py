"""Adapters and routing, torch only (no Ray): LoRA, (IA)³, routed Poly / MHR layers, selectors,
injection into Hugging Face models, save/load, and routing operations."""

from mttl.adapters.config import AdapterConfig
from mttl.adapters.inject import adapted_layers, modify_model, param_groups, selectors
from mttl.adapters.routing import routing_context
from mttl.adapters.state import load_adapters, read_adapter_config, save_adapters

__all__ = ["AdapterConfig", "adapted_layers", "load_adapters", "modify_model", "param_groups",
           "read_adapter_config", "routing_context", "save_adapters", "selectors"]

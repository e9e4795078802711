"""`AdapterConfig`: the adapter and routing settings of one model, independent of the run config.

It owns the one definition of each adapter key: every field names its run-config key (`key`
metadata; the run `Config`'s adapters section is built from these fields, with their defaults,
allowed values and help), and the JSON form stored next to saved adapters (field names).
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass, field
from typing import Any

from mttl.adapters.registry import GRANULARITIES, LAYER_KINDS, MODIFIERS, ROUTERS, SELECTORS, is_routed
from mttl.errors import ConfigError


def _key(config_key: str, default: Any, help: str, *, choices: list | None = None, run_type: str | None = None,
         run_default: Any = MISSING):
    """An adapter setting read from the run-config key `config_key` (help text and allowed values
    shared with it). `run_type`/`run_default`: the run key's own type and default where they differ."""
    meta = {"key": config_key, "help": help, "choices": choices}
    if run_type is not None:
        meta["run_type"] = run_type
    if run_default is not MISSING:
        meta["run_default"] = run_default
    return field(default=default, metadata=meta)


@dataclass
class AdapterConfig:
    modifier: str | None = _key("model_modifier", None, "Adapter type: " + ", ".join(
        f"{k} ({v.help})" for k, v in LAYER_KINDS.items()) + ", or none. Example: -k model_modifier=poly",
                                choices=list(MODIFIERS))
    rank: int = _key("lora_rank", 16, "Rank r of each LoRA skill. Example: -k lora_rank=1")
    alpha: float = _key("lora_alpha", 1.0, "LoRA scaling numerator: the update is (alpha / r)·B A x. "
                        "Example: -k lora_alpha=16")
    dropout: float = _key("lora_dropout", 0.0, "Dropout on the adapter input. Example: -k lora_dropout=0.1")
    n_skills: int = _key("n_skills", 8, "K: skills in each layer's inventory. Example: -k n_skills=4")
    n_splits: int = _key("n_splits", 1, "S: routing heads per layer (1 = Poly, >1 = MHR). Must divide the adapted "
                         "layers' in and out dims. Example: -k n_splits=16")
    n_tasks: int = _key("n_tasks", 1, "Routing rows; set from the data. Example: -k n_tasks=313",
                        run_type="int | None", run_default=None)
    selector: str = _key("router_selector", "poly", "Router: " + ", ".join(
        f"{k} ({v.help})" for k, v in ROUTERS.items()) + " (`poly_selector` accepted). "
        "Example: -k router_selector=average", choices=list(SELECTORS))
    granularity: str = _key("router_granularity", "finegrained", "Routers shared by: finegrained (each layer), "
                            "coarsegrained (whole model), coderwise, blockwise, layerwise (`poly_granularity`, "
                            "`finegrained=True|False` accepted). Example: -k router_granularity=blockwise",
                            choices=list(GRANULARITIES))
    relaxed_bernoulli: bool = _key("module_logits_relaxed_bernoulli", True, "Training samples routing from a relaxed "
                                   "Bernoulli (τ=1). Example: -k module_logits_relaxed_bernoulli=False")
    straight_through: bool = _key("module_logits_straight_through", False, "Routing forward = round(σ(z)) with "
                                  "σ(z)'s gradient. Example: -k module_logits_straight_through=True")
    shared_skill: bool = _key("poly_use_shared_skill", False, "Last skill always active for every task. "
                              "Example: -k poly_use_shared_skill=True")
    average_correction: bool = _key("poly_average_correction", False, "Weights = p·√S/√K instead of normalising "
                                    "over skills. Example: -k poly_average_correction=True")
    logits_dropout: float = _key("module_logits_dropout", 0.0, "Dropout on routing probabilities during training (off "
                                 "at eval). Example: -k module_logits_dropout=0.1")
    l2_norm: bool = _key("module_logits_l2_norm", False, "Routing weights = z/‖z‖₂ over skills instead of "
                         "normalised sigmoids. Example: -k module_logits_l2_norm=True")
    randb_init: bool = _key("lora_randb_init", False, "Initialise B like A instead of zeros (adapter is not a no-op at "
                            "start). Example: -k lora_randb_init=True")
    kaiming_init: bool = _key("lora_kaiming_init", False, "Kaiming-uniform init per head and skill block of A. "
                              "Example: -k lora_kaiming_init=True")
    warmup: bool = _key("lora_warmup", False, "Scale the adapter output by min(step/10000, 1) during training. "
                        "Example: -k lora_warmup=True")
    modify_modules: str = _key("modify_modules", ".*SelfAttention|.*EncDecAttention|.*DenseReluDense", "Regex the full "
                               "dotted name of a parent module must fully match for its children to be adapted "
                               "(`lora_modules` accepted). Example: -k modify_modules='.*SelfAttention'")
    modify_layers: str = _key("modify_layers", "q|k|v|o|wi|wi_0|wi_1|wo", "Regex a child's local name must fully match "
                              "to be adapted (`lora_layers` accepted). Example: -k modify_layers='q|v'")
    trainable_param_names: str = _key("trainable_param_names", ".*", "Regex: parameters whose full name matches are "
                                      "trained, the rest frozen. "
                                      "Example: -k trainable_param_names='.*lora_[ab].*|.*module_logits.*'")
    non_trainable_param_names: str | None = _key(
        "non_trainable_param_names", None, "Regex: parameters matching it stay frozen even if trainable_param_names "
        "matches. Example: -k non_trainable_param_names='.*layer_norm.*'")
    arrow_top_k: int = _key("arrow_top_k", 3, "router_selector=arrow: experts mixed per token (the k highest "
                            "|x·prototype|). Example: -k arrow_top_k=2")
    arrow_temperature: float = _key("arrow_temperature", 1.0, "router_selector=arrow: softmax temperature over the "
                                    "top-k |x·prototype| scores. Example: -k arrow_temperature=0.5")

    def __post_init__(self):
        if self.modifier == "poly_lora":
            self.modifier = "poly"
        if self.modifier == "skilled":
            # One private adapter per task: the reference's `skilled` modifier, whose router is
            # private unless another one than the default is named (average or arrow routing
            # over the same library, without task ids).
            if self.selector == "poly":
                self.selector = "private"
            self.n_skills = self.n_tasks
        self.validate()

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            allowed, value = f.metadata["choices"], getattr(self, f.name)
            if allowed is not None and value not in allowed:
                also = " or None" if None in allowed else ""
                raise ConfigError(f"{f.metadata['key']} must be one of {[c for c in allowed if c is not None]}{also}, "
                                  f"got {value!r}")
        checks = [
            (int(self.rank) >= 1, f"lora_rank must be >= 1, got {self.rank}"),
            (int(self.n_skills) >= 1, f"n_skills must be >= 1, got {self.n_skills}"),
            (int(self.n_splits) >= 1, f"n_splits must be >= 1, got {self.n_splits}"),
            (int(self.n_tasks) >= 1, f"n_tasks must be >= 1, got {self.n_tasks}"),
            (0.0 <= self.dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.dropout}"),
            (0.0 <= self.logits_dropout < 1.0, f"module_logits_dropout must be in [0, 1), got {self.logits_dropout}"),
            (int(self.arrow_top_k) >= 1, f"arrow_top_k must be >= 1, got {self.arrow_top_k}"),
            (float(self.arrow_temperature) > 0, f"arrow_temperature must be > 0, got {self.arrow_temperature}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.selector == "arrow" and self.modifier not in ("poly", "skilled"):
            raise ConfigError(f"router_selector=arrow routes over trained LoRA experts; it needs a model_modifier=poly "
                              f"or skilled library, got model_modifier={self.modifier!r}")
        if self.routed and self.selector == "private" and self.n_skills != self.n_tasks:
            raise ConfigError(f"router_selector=private needs n_skills == n_tasks (one skill per task), got "
                              f"n_skills={self.n_skills}, n_tasks={self.n_tasks}; set -k n_skills={self.n_tasks}")

    @property
    def routed(self) -> bool:
        """True for the modifiers whose layers mix a skill inventory with a selector."""
        return is_routed(self.modifier)

    @classmethod
    def from_config(cls, cfg) -> "AdapterConfig":
        """Read the adapter keys of a run `mttl.config.Config` (each field's `key`)."""
        values = {f.name: getattr(cfg, f.metadata["key"]) for f in dataclasses.fields(cls)}
        values["n_tasks"] = values["n_tasks"] or 1  # unset until the data sets it: one routing row
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"adapter config has unknown keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    def replace(self, **changes) -> "AdapterConfig":
        return dataclasses.replace(self, **changes)

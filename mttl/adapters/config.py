"""`AdapterConfig`: the adapter and routing settings of one model, independent of the run config.

It owns the mapping from the run `Config` keys (and the reference's modifier names) onto the
settings the adapter layers read, and its JSON form stored next to saved adapters.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mttl.adapters.registry import GRANULARITIES, MODIFIERS, SELECTORS, is_routed
from mttl.errors import ConfigError


@dataclass
class AdapterConfig:
    modifier: str | None = None
    rank: int = 16
    alpha: float = 1.0
    dropout: float = 0.0
    n_skills: int = 8
    n_splits: int = 1
    n_tasks: int = 1
    selector: str = "poly"
    granularity: str = "finegrained"
    relaxed_bernoulli: bool = True
    straight_through: bool = False
    shared_skill: bool = False
    average_correction: bool = False
    logits_dropout: float = 0.0
    l2_norm: bool = False
    randb_init: bool = False
    kaiming_init: bool = False
    warmup: bool = False
    modify_modules: str = ".*SelfAttention|.*EncDecAttention|.*DenseReluDense"
    modify_layers: str = "q|k|v|o|wi|wi_0|wi_1|wo"
    trainable_param_names: str = ".*"
    non_trainable_param_names: str | None = None
    arrow_top_k: int = 3
    arrow_temperature: float = 1.0

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
        checks = [
            (self.modifier in MODIFIERS, f"model_modifier must be one of {[m for m in MODIFIERS if m]} or None, got {self.modifier!r}"),
            (self.selector in SELECTORS, f"router_selector must be one of {list(SELECTORS)}, got {self.selector!r}"),
            (self.granularity in GRANULARITIES, f"router_granularity must be one of {list(GRANULARITIES)}, got {self.granularity!r}"),
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
        """Read the adapter keys of a run `mttl.config.Config`."""
        return cls(
            modifier=cfg.model_modifier,
            rank=cfg.lora_rank,
            alpha=cfg.lora_alpha,
            dropout=cfg.lora_dropout,
            n_skills=cfg.n_skills,
            n_splits=cfg.n_splits,
            n_tasks=cfg.n_tasks or 1,
            selector=cfg.router_selector,
            granularity=cfg.router_granularity,
            relaxed_bernoulli=cfg.module_logits_relaxed_bernoulli,
            straight_through=cfg.module_logits_straight_through,
            shared_skill=cfg.poly_use_shared_skill,
            average_correction=cfg.poly_average_correction,
            logits_dropout=cfg.module_logits_dropout,
            l2_norm=cfg.module_logits_l2_norm,
            randb_init=cfg.lora_randb_init,
            kaiming_init=cfg.lora_kaiming_init,
            warmup=cfg.lora_warmup,
            modify_modules=cfg.modify_modules,
            modify_layers=cfg.modify_layers,
            trainable_param_names=cfg.trainable_param_names,
            non_trainable_param_names=cfg.non_trainable_param_names,
            arrow_top_k=cfg.arrow_top_k,
            arrow_temperature=cfg.arrow_temperature,
        )

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

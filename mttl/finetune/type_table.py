"""The one table of finetune types (`finetune_type` values): what each trains, where it starts, its
default search space and its help text.

Torch-free on purpose: `mttl.config` reads the allowed values and help from here, `mttl finetune
--help` its description, `mttl.sweep.default_space_name` the default space, and
`mttl.finetune.types` the trainable regex and starting point of a run.

How to add a finetune type: add one `FinetuneType` line to `FINETUNE_TYPES` (its trainable regex,
which pre-trained weights it keeps, its space), give it a space in `tune_spaces/` when none of the
existing ones fits, and handle any new starting point in `mttl.finetune.types.load_for_finetuning`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from mttl.adapters.registry import is_routed

ADAPTER_PARAMS = ".*lora_[ab].*"  # LoRA A/B, routed skills, (IA)³ scales (`multi_lora_b`)
ROUTING_PARAMS = ".*module_logits.*"
DEFAULT_TYPE = "Poly"  # what finetune_type=None (left unset) runs


def _routing_family(n_splits: int) -> str:
    return "mhr" if n_splits > 1 else "poly"


def _adapter_space(model_modifier: str | None, n_splits: int) -> str:
    """The space of a run that trains the model's adapters: its routed family, else ia3 or lora."""
    if is_routed(model_modifier):
        return _routing_family(n_splits)
    return "ia3" if model_modifier == "ia3" else "lora"


def _fresh_space(model_modifier: str | None, n_splits: int) -> str:
    """The space of fresh adapters: the adapter family's, with the rank searched (nothing pre-trained fixes it)."""
    if is_routed(model_modifier):
        return "fresh_routed"
    return "ia3" if model_modifier == "ia3" else "lora_fresh"


@dataclass(frozen=True)
class FinetuneType:
    name: str
    help: str  # the short text of `finetune_type`'s help and of `mttl finetune --help`
    trains: str  # the weights trained, in words
    starting_point: str  # what the run starts from, in words
    # regex the type sets as trainable_param_names when the user did not; None keeps the config's
    trainable_param_names: str | None
    default_space: Callable[[str | None, int], str]  # (model_modifier, n_splits) → tune_spaces/ name
    needs_routed_checkpoint: bool = False
    average_routing: bool = False  # replaces a learned routing by the uniform average (MHR-µ)
    fresh_adapters: bool = False  # ignores the checkpoint's adapters, initialising new ones


FINETUNE_TYPES: dict[str, FinetuneType] = {t.name: t for t in (
    FinetuneType("F", "all", "every weight", "the checkpoint (routed: a fresh routing row)", ".*",
                 lambda modifier, n_splits: "full"),
    FinetuneType("A", "adapters", "the adapters",
                 "the checkpoint (fresh LoRA/(IA)³ from this config when it has none)", ADAPTER_PARAMS,
                 _adapter_space),
    FinetuneType("Z", "routing only", "the new task's routing logits",
                 "the checkpoint + a fresh routing row (Poly-z/MHR-z)", ROUTING_PARAMS,
                 lambda modifier, n_splits: f"{_routing_family(n_splits)}_z", needs_routed_checkpoint=True),
    FinetuneType("MuZ", "average routing, adapters trained", "the adapters",
                 "the checkpoint, routing replaced by the average (MHR-µ)", ADAPTER_PARAMS,
                 lambda modifier, n_splits: "mhr_mu", needs_routed_checkpoint=True, average_routing=True),
    FinetuneType("PolyRand", "no pre-trained adapters", "what trainable_param_names matches",
                 "the backbone with freshly initialised adapters", None, _fresh_space, fresh_adapters=True),
    FinetuneType(DEFAULT_TYPE, "adapters + a fresh routing row; also None", "what trainable_param_names matches",
                 "the checkpoint + a fresh routing row (Poly/MHR)", None, _adapter_space),
)}

FINETUNE_TYPE_CHOICES = [None, *FINETUNE_TYPES]  # None: the default type, DEFAULT_TYPE


def finetune_type(name: str | None) -> FinetuneType:
    """The table row of a `finetune_type` value (None: the default type)."""
    return FINETUNE_TYPES[name or DEFAULT_TYPE]


def finetune_type_help() -> str:
    """`F (all), A (adapters), …`: each type with its short help."""
    return ", ".join(f"{t.name} ({t.help})" for t in FINETUNE_TYPES.values())

"""A run's routing as `mttl report` shows it: eval-mode weights of every saved routing-logits tensor,
averaged within each layer group (encoder/decoder x self-attention/cross-attention/FFN)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from mttl.errors import DataError
from mttl.report.runs import Run

SUBLAYER_ORDER = ["self-attention", "cross-attention", "FFN"]
CODER_ORDER = ["encoder", "decoder", "shared"]


def layer_group(selector_name: str, granularity: str = "finegrained") -> str:
    """'encoder self-attention', 'decoder FFN', … for a selector saved under its first layer's name.

    A selector shared beyond one sub-layer (router_granularity coarsegrained, coderwise, blockwise)
    is named after the first layer holding it, so only its encoder/decoder part is meaningful."""
    if granularity == "coarsegrained":
        return "all layers"
    parts = selector_name.split(".")
    coder = next((c for c in ("encoder", "decoder") if c in parts), "shared")
    lowered = selector_name.lower()
    if granularity in ("coderwise", "blockwise"):
        return coder
    if "encdecattention" in lowered or "crossattention" in lowered:
        sublayer = "cross-attention"
    elif "attention" in lowered or "attn" in lowered:
        sublayer = "self-attention"
    elif "densereludense" in lowered or "mlp" in lowered or "ffn" in lowered:
        sublayer = "FFN"
    else:
        return coder
    return f"{coder} {sublayer}"


def _group_sort_key(group: str) -> tuple:
    coder, _, sublayer = group.partition(" ")
    return (CODER_ORDER.index(coder) if coder in CODER_ORDER else len(CODER_ORDER),
            SUBLAYER_ORDER.index(sublayer) if sublayer in SUBLAYER_ORDER else -1, group)


@dataclass
class Routing:
    """Eval-mode routing weights of one run, averaged within each layer group."""

    task_names: list[str]
    groups: dict[str, np.ndarray]  # group -> [T, S, K]

    def per_task(self) -> np.ndarray:
        """[T, K]: the average over heads and over the groups (each group weighted equally)."""
        return np.mean([w.mean(axis=1) for w in self.groups.values()], axis=0)


def read_routing(run: Run) -> Routing | None:
    """Eval-mode weights of every saved routing-logits tensor [T, S*K], computed by the run's own
    selector type (no model needed); None when the run has no learned routing."""
    if run.adapters_file is None:
        return None
    import torch
    from safetensors.torch import load_file

    from mttl.adapters.routing import build_selector
    from mttl.adapters.state import read_adapter_config

    acfg = read_adapter_config(run.adapters_file.parent)
    if not acfg.routed or acfg.selector != "poly":
        return None
    width = acfg.n_splits * acfg.n_skills
    per_group: dict[str, list[np.ndarray]] = defaultdict(list)
    for name, logits in load_file(str(run.adapters_file)).items():
        if not name.endswith("module_logits"):
            continue
        if logits.ndim != 2 or logits.shape[1] != width:
            raise DataError(f"{run.adapters_file}: tensor '{name}' has shape {list(logits.shape)} but adapters.json "
                            f"says n_splits={acfg.n_splits}, n_skills={acfg.n_skills} (expected [tasks, {width}]); "
                            f"the two files come from different saves")
        selector = build_selector(acfg.replace(n_tasks=logits.shape[0]))
        selector.load_state_dict({"module_logits": logits})
        selector.eval()
        with torch.no_grad():
            weights = selector(torch.arange(logits.shape[0]))
        per_group[layer_group(name, acfg.granularity)].append(weights.float().numpy())
    if not per_group:
        return None
    groups = {g: np.mean(per_group[g], axis=0) for g in sorted(per_group, key=_group_sort_key)}
    n_tasks = next(iter(groups.values())).shape[0]
    names = [f"task {i}" for i in range(n_tasks)]
    from mttl.models.run import read_tasks_file

    for task, row in read_tasks_file(run.path).items():
        if row < n_tasks:
            names[row] = task
    return Routing(task_names=names, groups=groups)

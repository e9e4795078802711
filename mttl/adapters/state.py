"""Saving and loading adapter and routing tensors: `adapters.safetensors` (full tensors, never the
base weights) plus `adapters.json` (the AdapterConfig, each tensor's shape and dtype, caller meta)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mttl.adapters.config import AdapterConfig
from mttl.adapters.inject import adapter_config, adapter_tensors
from mttl.adapters.ops import switch_to_average
from mttl.errors import CheckpointError
from mttl.run_folder import ADAPTERS_DESCRIPTION as DESCRIPTION_FILE
from mttl.run_folder import ADAPTERS_FILE as TENSORS_FILE

FORMAT = "mttl-adapters"
FORMAT_VERSION = 1


def save_adapters(model: torch.nn.Module, folder: str | os.PathLike, meta: dict | None = None) -> Path:
    """Write the model's adapter and routing tensors; each file is written then renamed into place."""
    acfg = adapter_config(model)
    if acfg is None:
        raise CheckpointError("the model has no adapters to save (modify_model was not applied)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in adapter_tensors(model).items()}
    description = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "adapter_config": acfg.to_dict(),
        "tensors": {name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                    for name, t in tensors.items()},
        "meta": meta or {},
    }
    suffix = f".tmp-{os.getpid()}"
    tmp_tensors = folder / (TENSORS_FILE + suffix)
    tmp_description = folder / (DESCRIPTION_FILE + suffix)
    save_file(tensors, str(tmp_tensors), metadata={"format": FORMAT})
    tmp_description.write_text(json.dumps(description, indent=2) + "\n")
    os.replace(tmp_tensors, folder / TENSORS_FILE)
    os.replace(tmp_description, folder / DESCRIPTION_FILE)
    return folder


def _read_description(folder: Path) -> dict:
    path = folder / DESCRIPTION_FILE
    if not path.is_file():
        raise CheckpointError(f"'{folder}' holds no {DESCRIPTION_FILE}; point to a folder written by save_adapters "
                              f"(a run's final/ folder)")
    try:
        description = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"'{path}' is not valid JSON ({err.msg}, line {err.lineno}); "
                              "the save was damaged") from None
    if description.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not an mttl adapter description (format {description.get('format')!r})")
    return description


def read_adapter_config(folder: str | os.PathLike) -> AdapterConfig:
    return AdapterConfig.from_dict(_read_description(Path(folder))["adapter_config"])


def load_adapters(model: torch.nn.Module, folder: str | os.PathLike) -> dict:
    """Copy saved adapter and routing tensors into a model modified with the same AdapterConfig;
    returns the saved meta. Missing, unexpected or differently shaped tensors raise naming the tensor."""
    folder = Path(folder)
    description = _read_description(folder)
    saved_cfg = AdapterConfig.from_dict(description["adapter_config"])
    current_cfg = adapter_config(model)
    if current_cfg is None:
        raise CheckpointError(f"cannot load '{folder}' into a model without adapters; apply modify_model with "
                              f"read_adapter_config('{folder}') first")
    if saved_cfg.selector == "average" and current_cfg.selector == "poly":
        # Saved after switch_to_average (MHR-µ): the model must route the same way.
        switch_to_average(model)
    try:
        saved = load_file(str(folder / TENSORS_FILE))
    except (FileNotFoundError, SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read '{folder / TENSORS_FILE}': {err}") from None
    targets = adapter_tensors(model)
    for name, target in targets.items():
        if name not in saved:
            raise CheckpointError(f"tensor '{name}' is missing from '{folder / TENSORS_FILE}'; the model was "
                                  f"modified differently (modifier {current_cfg.modifier}, saved {saved_cfg.modifier})")
        if tuple(saved[name].shape) != tuple(target.shape):
            raise CheckpointError(f"tensor '{name}' has shape {list(saved[name].shape)} in '{folder / TENSORS_FILE}' "
                                  f"but {list(target.shape)} in the model (different n_tasks, rank, n_skills or "
                                  f"n_splits?)")
    described = description.get("tensors", {})
    saved_in_model_order = [n for n in described if n in saved] + [n for n in saved if n not in described]
    for name in saved_in_model_order:
        if name not in targets:
            raise CheckpointError(f"tensor '{name}' in '{folder / TENSORS_FILE}' has no place in the model; "
                                  f"modify the model with read_adapter_config('{folder}')")
    with torch.no_grad():
        for name, tensor in saved.items():
            targets[name].copy_(tensor)
    return description.get("meta", {})

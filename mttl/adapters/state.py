"""Saving and loading adapter and routing tensors: `adapters.safetensors` (full tensors, never the
base weights) plus `adapters.json` (the AdapterConfig, each tensor's shape and dtype, caller meta)."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mttl.adapters.config import AdapterConfig
from mttl.adapters.inject import adapter_config, adapter_tensors
from mttl.adapters.ops import switch_to_average
from mttl.errors import CheckpointError
from mttl.run_folder import ADAPTERS_DESCRIPTION as DESCRIPTION_FILE
from mttl.run_folder import ADAPTERS_FILE as TENSORS_FILE

FORMAT = "mttl-adapters"
FORMAT_VERSION = 1


# safetensors' names of the dtypes adapter and routing tensors come in
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


def whole_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """A tensor's shape, the whole one for a ZeRO-3 partitioned parameter (`ds_shape`)."""
    return tuple(getattr(tensor, "ds_shape", tensor.shape))


class AdapterWriter:
    """`adapters.safetensors` + `adapters.json` of a model, its tensors written as they are handed over.

    `safetensors.torch.save_file` needs every tensor whole at once; a ZeRO-3 partitioned model has its
    tensors whole only inside a gather, and the adapters of MHR on a billion-parameter backbone are
    GBs gathered on every rank. The file's header follows from the shapes alone, so it is written
    first and each tensor's bytes follow in the header's order (`names`), the caller gathering one
    group at a time. The layout is safetensors' own: little-endian header length, the JSON header
    padded to 8 bytes, then the tensors back to back. Both files appear by rename, only on `commit`.
    """

    def __init__(self, model: torch.nn.Module, folder: str | os.PathLike, meta: dict | None = None):
        acfg = adapter_config(model)
        if acfg is None:
            raise CheckpointError("the model has no adapters to save (modify_model was not applied)")
        self.folder = Path(folder)
        specs = {name: (whole_shape(t), t.dtype) for name, t in adapter_tensors(model).items()}
        self.names = list(specs)
        self._specs = specs
        self._description = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "adapter_config": acfg.to_dict(),
            "tensors": {name: {"shape": list(shape), "dtype": str(dtype).removeprefix("torch.")}
                        for name, (shape, dtype) in specs.items()},
            "meta": meta or {},
        }
        header, offset = {}, 0
        for name, (shape, dtype) in specs.items():
            size = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        header["__metadata__"] = {"format": FORMAT}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.folder.mkdir(parents=True, exist_ok=True)
        self._tmp = self.folder / f"{TENSORS_FILE}.tmp-{os.getpid()}"
        self._file = open(self._tmp, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._written = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """The next tensor, whole (gathered), in the order of `names`."""
        expected = self.names[self._written] if self._written < len(self.names) else None
        shape, dtype = self._specs.get(name, (None, None))
        if name != expected or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise CheckpointError(f"adapter tensor {name} {tuple(tensor.shape)} {tensor.dtype} handed to the writer "
                                  f"where {expected} {shape} {dtype} was due (was it gathered?)")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))
        self._written += 1

    def commit(self) -> Path:
        if self._written != len(self.names):
            self.abort()
            raise CheckpointError(f"{self.folder}: {len(self.names) - self._written} adapter tensors were never written")
        self._file.close()
        tmp_description = self.folder / f"{DESCRIPTION_FILE}.tmp-{os.getpid()}"
        tmp_description.write_text(json.dumps(self._description, indent=2) + "\n")
        os.replace(self._tmp, self.folder / TENSORS_FILE)
        os.replace(tmp_description, self.folder / DESCRIPTION_FILE)
        return self.folder

    def abort(self) -> None:
        """Leave the folder as it was: the partial file goes."""
        self._file.close()
        self._tmp.unlink(missing_ok=True)


def save_adapters(model: torch.nn.Module, folder: str | os.PathLike, meta: dict | None = None) -> Path:
    """Write the model's adapter and routing tensors (whole, not partitioned); each file is written
    then renamed into place."""
    writer = AdapterWriter(model, folder, meta)
    try:
        for name, tensor in adapter_tensors(model).items():
            writer.write(name, tensor)
    except BaseException:
        writer.abort()
        raise
    return writer.commit()


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

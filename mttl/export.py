"""A finished run's adapters in formats other tools load (the command line is `mttl.cli.export`).

- `peft`: the whole Poly/MHR inventory and routing as a PEFT `poly` adapter folder
  (`PeftModel.from_pretrained(base, DIR)`; call it with `task_ids=`).
- `peft-lora`: one task's mixed adapter as a plain PEFT LoRA folder.
- `merged`: the backbone with one task's adapter merged into its weights (`save_pretrained`
  layout, plus the tokenizer), loadable with `AutoModelForSeq2SeqLM.from_pretrained(DIR)`.

Each export is written into a temporary folder beside `--out` and renamed onto it at the end.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import tempfile
from pathlib import Path

import torch

from mttl.adapters.inject import adapted_layers, adapter_config, base_model
from mttl.adapters.ops import merge_task_into_base, remove_adapters, task_lora
from mttl.adapters.routing import AverageSelector
from mttl import storage
from mttl.errors import ConfigError
from mttl.paths import check_out_dir
from mttl.run_folder import TASKS_FILE, staged_folder


def check_export_out(out: str | os.PathLike) -> None:
    """`--out` may receive an export: a new local folder, or a URI prefix holding nothing yet."""
    if storage.is_uri(str(out)):
        storage.check_reachable(str(out))
        if storage.list_files(str(out)):
            raise ConfigError(f"--out '{out}' already holds objects; choose a new prefix (exports never overwrite)")
    elif check_out_dir(out, example="--out exports/mhr_peft").exists():
        raise ConfigError(f"--out '{out}' already exists; choose a new folder (exports never overwrite)")


def local_run(run_dir: str) -> str:
    """A RUN_DIR URI (or its final/) as this machine's copy under cache_dir (CACHE_DIR); a path as given."""
    if not storage.is_uri(run_dir):
        return run_dir
    from mttl.config import Config

    uri = run_dir.rstrip("/")
    uri = uri[:-len("/final")] if uri.endswith("/final") else uri
    return str(storage.local_run_copy(uri, Config().cache_dir, folders=("final",)))


@contextlib.contextmanager
def _staged_folder(out: str | os.PathLike):
    """A temporary folder beside `out`, renamed onto `out` when the block succeeds; for a URI `out`, a local
    temporary folder uploaded to it file by file, its `_COMPLETE` marker last."""
    if storage.is_uri(str(out)):
        check_export_out(out)
        with tempfile.TemporaryDirectory(prefix="mttl-export-") as staging:
            yield Path(staging)
            storage.upload_folder(staging, str(out))
        return
    out = check_out_dir(out, example="--out exports/mhr_peft")
    if out.exists():
        raise ConfigError(f"--out '{out}' already exists; choose a new folder (exports never overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with staged_folder(out) as staging:
        yield staging


def _plain_copy(model: torch.nn.Module, base_model_name: str | None = None) -> torch.nn.Module:
    """A deep copy of the Hugging Face model inside `model` (the caller's model stays as it is),
    named after its backbone so PEFT records that name as the base model."""
    plain = copy.deepcopy(base_model(model))
    if base_model_name is not None:
        plain.name_or_path = base_model_name
    return plain


def _target_modules(model: torch.nn.Module) -> list[str]:
    return sorted(adapted_layers(model))


def export_peft_poly(model: torch.nn.Module, out: str | os.PathLike, *, base_model_name: str | None = None,
                     tasks: dict[str, int] | None = None) -> Path:
    """Write the routed LoRA inventory and routing as a PEFT `poly` adapter folder."""
    import peft

    acfg = adapter_config(model)
    if acfg is None or acfg.modifier != "poly":
        raise ConfigError("--format peft needs a Poly/MHR run (model_modifier=poly); use --format peft-lora or merged")
    unsupported = {"poly_use_shared_skill": acfg.shared_skill, "poly_average_correction": acfg.average_correction,
                   "module_logits_l2_norm": acfg.l2_norm, "module_logits_straight_through": acfg.straight_through,
                   "router_selector=private": acfg.selector == "private"}
    unsupported = [name for name, on in unsupported.items() if on]
    layers = adapted_layers(model)
    if any(layer.selector.uniform_alpha != 1.0 for layer in layers.values()):
        unsupported.append("uniform interpolation (alpha < 1)")
    if unsupported:
        raise ConfigError(f"PEFT's poly router has no equivalent of {', '.join(unsupported)}; export one task with "
                          f"--format peft-lora or --format merged instead")
    peft_model = peft.get_peft_model(
        remove_adapters(_plain_copy(model, base_model_name)),
        peft.PolyConfig(task_type="SEQ_2_SEQ_LM", r=acfg.rank, target_modules=_target_modules(model),
                        n_tasks=acfg.n_tasks, n_skills=acfg.n_skills, n_splits=acfg.n_splits))
    with torch.no_grad():
        for name, layer in layers.items():
            target = peft_model.base_model.model.get_submodule(name)
            target.poly_lora_A["default"].copy_(layer.lora_a)
            # PEFT scales the update by 1/r; ours is alpha/r (times the warm-up factor): fold the rest into B.
            target.poly_lora_B["default"].copy_(layer.lora_b * (layer.scale * layer.rank * layer.warmup_factor()))
            logits = target.poly_router["default"].module_logits
            if isinstance(layer.selector, AverageSelector):
                logits.zero_()  # equal logits: σ(0)/(K·σ(0) + 1e-12) = 1/K up to 1e-12
            else:
                logits.copy_(layer.selector.module_logits)
    with _staged_folder(out) as staging:
        peft_model.save_pretrained(str(staging), save_embedding_layers=False)
        if tasks:
            (staging / TASKS_FILE).write_text(json.dumps(tasks, indent=2) + "\n")
    return Path(out)


def export_peft_lora(model: torch.nn.Module, task_id: int, out: str | os.PathLike, *,
                     base_model_name: str | None = None) -> Path:
    """Write task `task_id`'s adapter, collapsed to one LoRA per layer, as a PEFT LoRA folder."""
    import peft

    loras = task_lora(model, task_id)
    rank = next(iter(loras.values()))[0].shape[0]
    # lora_alpha = r makes PEFT's scaling 1; the run's own scale is folded into B.
    peft_model = peft.get_peft_model(
        remove_adapters(_plain_copy(model, base_model_name)),
        peft.LoraConfig(task_type="SEQ_2_SEQ_LM", r=rank, lora_alpha=rank, lora_dropout=0.0,
                        target_modules=sorted(loras)))
    with torch.no_grad():
        for name, (a, b, scale) in loras.items():
            target = peft_model.base_model.model.get_submodule(name)
            target.lora_A["default"].weight.copy_(a)
            target.lora_B["default"].weight.copy_(scale * b)
    with _staged_folder(out) as staging:
        peft_model.save_pretrained(str(staging), save_embedding_layers=False)
    return Path(out)


def export_merged(model: torch.nn.Module, task_id: int, out: str | os.PathLike, *, tokenizer=None) -> Path:
    """Write the backbone with task `task_id`'s adapter merged in (`save_pretrained` layout)."""
    merged = _plain_copy(model)
    if adapted_layers(merged):
        merge_task_into_base(merged, task_id)
    with _staged_folder(out) as staging:
        merged.save_pretrained(str(staging))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
    return Path(out)


def resolve_task(task: str | None, tasks: dict[str, int], *, routed: bool, n_tasks: int) -> int:
    """A task name from tasks.json or a row number; routed runs must name one."""
    if task is None:
        if routed:
            names = ", ".join(list(tasks)[:5]) or "none recorded"
            raise ConfigError(f"this run routes per task: give --task NAME or row (tasks: {names})")
        return 0
    if task in tasks:
        return int(tasks[task])
    if task.isdigit() and int(task) < n_tasks:
        return int(task)
    names = ", ".join(list(tasks)[:5]) or "none recorded"
    raise ConfigError(f"--task {task!r} is neither a task of this run ({names}) nor a row below {n_tasks}")

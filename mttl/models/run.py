"""Building the routed model a config describes, and loading a finished run folder back.

`build_routed_model(cfg, tokenizer)` is the one recipe for "backbone + adapters + routing" used by
the pre-training workers and by `load_run`, so a run always reloads into the same architecture.
`load_run(path)` reads `$output_dir/$run_name/` (or its `final/`): config, task table, tokenizer,
the trained backbone when the run has one (`final/backbone/`), and the adapters.
`read_run_json` / `read_tasks_file` read a run folder's JSON files, a damaged one as a one-line
CheckpointError naming it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from mttl.config import Config
from mttl.errors import CheckpointError
from mttl.run_folder import ADAPTERS_DESCRIPTION, BACKBONE_DIR, CONFIG_FILE, FINAL_DIR, TASKS_FILE


@dataclass
class LoadedRun:
    cfg: Config
    model: torch.nn.Module  # RoutedModel with the run's adapters loaded
    tokenizer: object
    tasks: dict[str, int]  # task name -> routing row
    run_dir: Path


def build_routed_model(cfg: Config, tokenizer, backbone: str | None = None,
                       dtype: torch.dtype = torch.float32, zero3_config: dict | None = None) -> torch.nn.Module:
    """`cfg.model` (or `backbone`) with `cfg.model_modifier` adapters, wrapped in a RoutedModel.

    Without a modifier the backbone's parameters are trained as `trainable_param_names` and
    `non_trainable_param_names` select (a modifier applies the same rule itself). The frozen
    backbone weights are then held in `dtype` (`mttl.device.backbone_dtype`); everything trained
    and every adapter stays fp32.

    `zero3_config` (a ZeRO-3 DeepSpeed config, inside an initialised process group): the backbone is
    built partitioned (`mttl.models.backbone`), so no process holds it whole; its dtype is then the
    one DeepSpeed's precision mode holds the module in. Adapters are created whole (they are small)
    and partitioned by `deepspeed.initialize`.
    `gradient_checkpointing`: transformers' non-reentrant checkpointing of every block, with the
    routing of each block restored while it is recomputed (`checkpoint_contexts`).
    """
    from mttl.device import cast_frozen_backbone

    from mttl.models.backbone import load_backbone, local_backbone
    from mttl.models.routed import RoutedModel

    from mttl.adapters import AdapterConfig, modify_model
    from mttl.adapters.inject import freeze_embeddings

    source = local_backbone(backbone or cfg.model, cfg.cache_dir)  # a URI: this machine's copy of that folder
    hf_model = load_backbone(source, trust_remote_code=cfg.trust_remote_code,
                             vocab_size=len(tokenizer), tiny_d_model=cfg.tiny_d_model,
                             tiny_num_layers=cfg.tiny_num_layers, seed=cfg.seed, zero3_config=zero3_config)
    # without a modifier this only freezes by the regexes (all parameters train by default)
    hf_model = modify_model(hf_model, AdapterConfig.from_config(cfg))
    if cfg.freeze_embeds:
        freeze_embeddings(hf_model)
    if zero3_config is None:
        cast_frozen_backbone(hf_model, dtype)
    if cfg.gradient_checkpointing:
        from mttl.adapters.routing import checkpoint_contexts

        kwargs = {"use_reentrant": False, "context_fn": checkpoint_contexts}
        if hasattr(hf_model, "activation_checkpointing_enable"):
            hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # transformers before the rename (the GPU images' 4.x / early 5.x) has only the old name
            hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return RoutedModel(hf_model, label_smoothing=cfg.resolved_label_smoothing())


def check_model_config(cfg: Config, tokenizer) -> None:
    """Build the configured backbone and adapters on the meta device: no weights, milliseconds.

    Adapter settings that do not fit the backbone (an `n_splits` that does not divide a layer, a
    `modify_layers` that matches nothing) then fail on the driver with their one-line message,
    before Ray starts workers that would each fail with a traceback. A backbone whose config
    cannot be read here (a hub name not cached on this machine) is left to the workers.
    """
    import transformers

    from mttl.adapters import AdapterConfig, modify_model
    from mttl.models.backbone import TINY_T5

    if cfg.model == TINY_T5:
        with torch.device("meta"):
            build_routed_model(cfg, tokenizer)
        return
    from mttl import storage
    from mttl.models.backbone import remote_backbone_config

    try:
        config = (remote_backbone_config(cfg.model, cfg.trust_remote_code) if storage.is_uri(cfg.model) else
                  transformers.AutoConfig.from_pretrained(os.path.expanduser(cfg.model),
                                                          trust_remote_code=cfg.trust_remote_code))
    except (OSError, ValueError):
        return
    with torch.device("meta"):
        hf_model = transformers.AutoModelForSeq2SeqLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
        modify_model(hf_model, AdapterConfig.from_config(cfg))


def backbone_source(cfg: Config, run_dir: Path) -> str:
    """The trained backbone saved with the run, else the backbone the config names."""
    saved = run_dir / FINAL_DIR / BACKBONE_DIR
    return str(saved) if (saved / CONFIG_FILE).is_file() else cfg.model


def resolve_run_dir(path: str | os.PathLike) -> Path:
    """A run folder from a run folder or its `final/` folder; CheckpointError when it is neither."""
    path = Path(os.path.expanduser(str(path))).resolve()
    if path.name == FINAL_DIR and (path.parent / CONFIG_FILE).is_file():
        path = path.parent
    if not path.exists():
        raise CheckpointError(f"run folder '{path}' does not exist; give $output_dir/$run_name of a finished "
                              "`mttl pretrain` run")
    if not (path / CONFIG_FILE).is_file():
        raise CheckpointError(f"'{path}' is not a run folder (no config.json); give $output_dir/$run_name "
                              "of a finished `mttl pretrain` run")
    if not (path / FINAL_DIR).is_dir():
        raise CheckpointError(f"run folder '{path}' has no {FINAL_DIR}/ yet; finish it first by running the "
                              "same `mttl pretrain` command again")
    return path


def read_run_json(path: str | os.PathLike) -> dict:
    """A JSON object file of a run folder (tasks.json, …); CheckpointError naming it when unreadable."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; the run did not finish writing it, run the same command "
                              "again or give another run folder") from None
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path} is not readable JSON ({' '.join(str(err).split())[:200]}); restore it from "
                              "the run's copy or run the same command again") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}; restore it or run the "
                              "same command again")
    return data


def read_tasks_file(run_dir: str | os.PathLike) -> dict[str, int]:
    """The run's task name -> routing row table ({} when the run has none); CheckpointError when malformed."""
    path = Path(run_dir) / TASKS_FILE
    if not path.is_file():
        return {}
    tasks = read_run_json(path)
    if not all(isinstance(row, int) and not isinstance(row, bool) and row >= 0 for row in tasks.values()):
        raise CheckpointError(f"{path} must map task names to routing rows (integers >= 0); restore it or run the "
                              "same command again")
    return tasks


def load_run(path: str | os.PathLike, *, trust_remote_code: bool = False,
             backbone_dtype: torch.dtype = torch.float32) -> LoadedRun:
    """The run folder's model; `trust_remote_code` is the caller's (the user's) choice, never the run's,
    and so is `backbone_dtype`, the dtype its frozen backbone weights are held in."""
    from mttl.models.tokenizer import load_tokenizer

    run_dir = resolve_run_dir(path)
    cfg = Config.load(run_dir / CONFIG_FILE)
    cfg.trust_remote_code = trust_remote_code
    tasks = read_tasks_file(run_dir)
    backbone = backbone_source(cfg, run_dir)
    tokenizer = load_tokenizer(cfg.tokenizer, model=backbone, cache_dir=cfg.cache_dir)
    model = build_routed_model(cfg, tokenizer, backbone=backbone, dtype=backbone_dtype)
    final = run_dir / FINAL_DIR
    if cfg.model_modifier:
        if not (final / ADAPTERS_DESCRIPTION).is_file():
            raise CheckpointError(f"run folder '{run_dir}' has no {FINAL_DIR}/{ADAPTERS_DESCRIPTION}; "
                                  "the run did not finish writing its adapters, run the same command again")
        from mttl.adapters import load_adapters

        load_adapters(model, final)
    model.eval()
    return LoadedRun(cfg=cfg, model=model, tokenizer=tokenizer, tasks=tasks, run_dir=run_dir)

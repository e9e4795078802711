"""Hyper-parameter search of few-shot fine-tuning with Ray Tune, Optuna (TPE) and ASHA.

Owns `mttl sweep`: the search space comes from a `tune_spaces/` module (or a .py file); each
trial fine-tunes one held-out task with every configured seed, reporting after each validation
so ASHA can stop poor trials early, and ends with the seed mean of the best validation scores.
One Tune experiment (= study) per task under `$output_dir/$run_name/<task>/` (or one for all
tasks with `study_per_task=False`); running the same `run_name` again restores it (finished
trials kept, searcher state kept, unfinished trials run again). Results: `results.csv` (one row
per trial), `best.json` (per task), `summary.md` and a printed table.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from pathlib import Path
from types import ModuleType

from mttl.config import Config
from mttl.errors import ConfigError

SPACES_PACKAGE = "tune_spaces"


# ------------------------------------------------------------------------------ search spaces
def available_spaces() -> list[str]:
    package = importlib.import_module(SPACES_PACKAGE)
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_"))


def load_space(name_or_path: str) -> ModuleType:
    """A `tune_spaces` module by name, or any .py file by path; it must define `space` and `GRID`."""
    if name_or_path.endswith(".py"):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise ConfigError(f"tune_space file '{path}' does not exist; give a .py file or one of {available_spaces()}")
        spec = importlib.util.spec_from_file_location(f"tune_space_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    elif name_or_path in available_spaces():
        module = importlib.import_module(f"{SPACES_PACKAGE}.{name_or_path}")
    else:
        raise ConfigError(f"tune_space '{name_or_path}' is neither a .py file nor one of {available_spaces()}; "
                          f"example: -k tune_space=mhr_z")
    if not callable(getattr(module, "space", None)) or not isinstance(getattr(module, "GRID", None), list):
        raise ConfigError(f"tune_space '{name_or_path}' must define space(trial) -> dict and GRID: list[dict]; "
                          f"see tune_spaces/__init__.py")
    return module


def default_space_name(cfg: Config) -> str:
    """The space matching `finetune_type` and the model: Z → *_z, MuZ → mhr_mu, F → full, …"""
    routed = cfg.model_modifier in ("poly", "poly_ia3")
    family = "mhr" if cfg.n_splits > 1 else "poly"
    if cfg.finetune_type == "F":
        return "full"
    if cfg.finetune_type == "Z":
        return f"{family}_z"
    if cfg.finetune_type == "MuZ":
        return "mhr_mu"
    if routed:
        return family
    return "ia3" if cfg.model_modifier == "ia3" else "lora"

"""Where a run's prepared data is (`resolve_data_dir`), for pre-training, fine-tuning, evaluation and sweeps.

`data_dir` (or the dataset's *_DATA_DIR, or what a checkpoint's config.json names) when set; for
dataset=synthetic without one, the synthetic suite, prepared once into cache_dir.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from mttl.errors import ConfigError

if TYPE_CHECKING:
    from mttl.config import Config

SYNTHETIC_DIR = "synthetic"  # in cache_dir: the synthetic suite prepared for a run without data_dir


def resolve_data_dir(cfg: Config) -> str:
    """The prepared data of a run, as an absolute path: `data_dir` (or the dataset's *_DATA_DIR, or
    what a checkpoint's config names); for dataset=synthetic without one, the suite prepared in
    cache_dir. ConfigError saying how to prepare data otherwise."""
    data_dir = cfg.resolved_data_dir()
    if data_dir:
        return os.path.abspath(data_dir)
    if cfg.dataset != "synthetic":
        raise ConfigError(f"dataset={cfg.dataset} needs prepared shards: run `mttl prepare {cfg.dataset} --out DIR` "
                          "and pass -k data_dir=DIR (or a checkpoint whose config.json names its data_dir)")
    from mttl.data.synthetic import prepare_synthetic

    out = Path(cfg.cache_dir).resolve() / f"{SYNTHETIC_DIR}-seed{cfg.seed}"
    prepare_synthetic(out, seed=cfg.seed)
    return str(out)

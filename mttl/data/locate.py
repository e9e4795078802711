"""Where a run's prepared data is (`resolve_data_dir`), for pre-training, fine-tuning, evaluation and sweeps.

`data_dir` (or the dataset's *_DATA_DIR, or what a checkpoint's config.json names) when set; for
dataset=synthetic without one, the synthetic suite, prepared once into cache_dir. A `data_dir` URI
(`s3://bucket/prefix`) is copied into cache_dir once per manifest (`local_data_copy`) and read there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from mttl.errors import ConfigError, DataError
from mttl.storage import is_uri

if TYPE_CHECKING:
    from mttl.config import Config

SYNTHETIC_DIR = "synthetic"  # in cache_dir: the synthetic suite prepared for a run without data_dir


def resolve_data_dir(cfg: Config) -> str:
    """The prepared data of a run, as an absolute path: `data_dir` (or the dataset's *_DATA_DIR, or
    what a checkpoint's config names); for dataset=synthetic without one, the suite prepared in
    cache_dir. ConfigError saying how to prepare data otherwise."""
    data_dir = cfg.resolved_data_dir()
    if data_dir and is_uri(data_dir):
        return str(local_data_copy(data_dir, cfg.cache_dir))
    if data_dir:
        return os.path.abspath(data_dir)
    if cfg.dataset != "synthetic":
        raise ConfigError(f"dataset={cfg.dataset} needs prepared shards: run `mttl prepare {cfg.dataset} --out DIR` "
                          "and pass -k data_dir=DIR (or a checkpoint whose config.json names its data_dir)")
    from mttl.data.synthetic import prepare_synthetic

    out = Path(cfg.cache_dir).resolve() / f"{SYNTHETIC_DIR}-seed{cfg.seed}"
    prepare_synthetic(out, seed=cfg.seed)
    return str(out)


def local_data_copy(uri: str, cache_dir: str) -> Path:
    """The prepared folder at `uri` copied under `cache_dir` (`mttl.storage.local_mirror`): its shards, then
    its manifest; a copy whose manifest equals the bucket's is reused. DataError when `uri` holds no manifest."""
    import shutil

    from mttl import storage
    from mttl.data.shards import MANIFEST, read_manifest

    uri = uri.rstrip("/")
    storage.check_reachable(uri)
    manifest = storage.read_bytes(storage.join(uri, MANIFEST))
    if manifest is None:
        raise DataError(f"{uri}/{MANIFEST} not found: prepare the data first, e.g. "
                        f"`mttl prepare synthetic --out {uri}`")
    local = storage.local_mirror(uri, cache_dir)
    if (local / MANIFEST).is_file() and (local / MANIFEST).read_bytes() == manifest:
        return local
    staging = local.with_name(f".{local.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    (staging / MANIFEST).write_bytes(manifest)
    files = [entry["path"] for entry in read_manifest(staging)["files"]]  # layout checked: paths stay inside
    storage.download_folder(uri, staging, files=files)
    shutil.rmtree(local, ignore_errors=True)
    os.replace(staging, local)
    return local

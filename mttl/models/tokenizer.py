"""Tokenizer loading: byte-level ByT5 (needs no files), a local folder, or a Hugging Face hub name.

`load_tokenizer(spec, model=...)` is the one place that turns the config's `tokenizer` (and, when
it is unset, the config's `model`) into a transformers tokenizer. Every user error (a missing
folder, a hub name that cannot be fetched offline) is a `ConfigError` saying what to pass instead.
"""

from __future__ import annotations

import os
from pathlib import Path

from mttl.errors import ConfigError

BYTE = "byte"
# Backbones built from a config carry no vocabulary of their own; they use the byte tokenizer.
CONFIG_BUILT_MODELS = ("tiny-t5",)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.json")


def _looks_like_path(spec: str) -> bool:
    # Hub names are `name` or `org/name`; anything else that could be a path is treated as one.
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or Path(spec).exists()


def _from_folder(folder: Path, *, key: str):
    from transformers import AutoTokenizer

    if not folder.is_dir():
        raise ConfigError(f"{key} folder '{folder}' does not exist; give an existing folder with tokenizer files, "
                          f"a hub name, or -k tokenizer={BYTE}")
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise ConfigError(f"{key} folder '{folder}' holds no tokenizer files ({', '.join(_TOKENIZER_FILES)}); "
                          f"set -k tokenizer=PATH to a folder that has them, or -k tokenizer={BYTE}")
    try:
        # never the folder's own Python (`auto_map`); unset, transformers would ask on a terminal
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except ValueError as err:
        raise ConfigError(f"{key} folder '{folder}': cannot load a tokenizer from it: "
                          f"{_first_line(err)}; give -k tokenizer=PATH to a plain tokenizer or "
                          f"-k tokenizer={BYTE}") from None


def _from_hub(name: str, *, key: str, cache_dir):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, cache_dir=None if cache_dir is None else str(cache_dir),
                                             trust_remote_code=False)
    except ValueError as err:
        raise ConfigError(f"{key} '{name}': cannot load a tokenizer from it: "
                          f"{_first_line(err)}; give -k tokenizer=PATH to a plain tokenizer or "
                          f"-k tokenizer={BYTE}") from None
    except OSError as err:
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise ConfigError(f"{key} '{name}' is no local folder and could not be loaded from the Hugging Face "
                          f"Hub{offline}: {str(err).splitlines()[0]}; give a local folder (-k tokenizer=PATH) "
                          f"or -k tokenizer={BYTE}") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_tokenizer(spec: str | None, *, model: str | None = None, cache_dir: str | os.PathLike | None = None):
    """The tokenizer named by `spec`, else the one belonging to `model`, else byte-level ByT5.

    `spec`: `byte`, a local folder (AutoTokenizer files) or a hub name. With `spec=None` the
    backbone `model` decides: a config-built model (`tiny-t5`) or no model → ByT5, a local folder
    or hub name → its own tokenizer.
    """
    if spec is None:
        if model is None or model in CONFIG_BUILT_MODELS:
            spec, key = BYTE, "tokenizer"
        else:
            spec, key = str(model), "model"
    else:
        spec, key = str(spec), "tokenizer"
    if spec == BYTE:
        from transformers import ByT5Tokenizer

        return ByT5Tokenizer()
    from mttl import storage

    if storage.is_uri(spec):  # a saved backbone's folder in a bucket: its tokenizer files, copied down
        from mttl.config import Config
        from mttl.models.backbone import local_backbone

        spec = local_backbone(spec, cache_dir if cache_dir is not None else Config().cache_dir)
    if _looks_like_path(spec):
        return _from_folder(Path(os.path.expanduser(spec)), key=key)
    return _from_hub(spec, key=key, cache_dir=cache_dir)

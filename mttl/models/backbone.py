"""Backbone loading: `tiny-t5` (a small T5 built from a config, for tests and smoke runs), a local
folder, or a Hugging Face hub name, always as a seq2seq `PreTrainedModel`; under ZeRO-3 built
partitioned across the process group, so that no process ever holds the whole backbone."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
import transformers

from mttl.errors import ConfigError

TINY_T5 = "tiny-t5"


def tiny_t5_config(vocab_size: int, d_model: int = 128, num_layers: int = 2) -> transformers.T5Config:
    """T5 v1.1 / LM-adapt FFN layout (gated-GELU: wi_0/wi_1/wo) at toy size. The output head is
    tied to the embedding, which makes T5 scale the decoder output by d_model^-0.5: freshly
    initialised logits then start near ln(vocab) loss instead of ~sqrt(d_model) times larger.

    Dropout is off: trained from scratch on deterministic string skills, the tiny T5 with T5's
    default 0.1 dropout was at 0.40 exact match after 3,000 steps, without it at 0.90 (batch 32,
    lr 1e-3, same seed; measured on the synthetic warm-up tasks)."""
    if d_model % 4:
        raise ConfigError(f"tiny_d_model={d_model} must be divisible by 4 (4 attention heads)")
    return transformers.T5Config(
        vocab_size=vocab_size, d_model=d_model, d_ff=4 * d_model, num_heads=4, d_kv=d_model // 4,
        num_layers=num_layers, num_decoder_layers=num_layers, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        tie_word_embeddings=True, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )


@contextlib.contextmanager
def _partitioned_init(zero3_config: dict):
    """Modules created inside are partitioned as each is built (DeepSpeed's `zero.Init`).

    Transformers initialises a model's weights in `post_init`, after its sub-modules were already
    partitioned into empty tensors; its ZeRO-3 variant gathers one module at a time and initialises
    it on rank 0 in the same order and with the same draws, so a seeded build gives the very weights
    of the whole build. `initialize_weights` is pointed at that variant for the build only."""
    import deepspeed
    from transformers.integrations.deepspeed import initialize_weights_zero3

    original = transformers.PreTrainedModel.initialize_weights
    transformers.PreTrainedModel.initialize_weights = initialize_weights_zero3
    try:
        with deepspeed.zero.Init(config_dict_or_path=zero3_config):
            yield
    finally:
        transformers.PreTrainedModel.initialize_weights = original


def local_backbone(name_or_path: str, cache_dir: str | os.PathLike) -> str:
    """A backbone (or tokenizer) folder given as a URI (`s3://…/final/backbone`), as this machine's copy
    under `cache_dir`; a name or local path as it is."""
    from mttl import storage

    if name_or_path and storage.is_uri(name_or_path):
        return str(storage.local_folder_copy(name_or_path.rstrip("/"), cache_dir))
    return name_or_path


def remote_backbone_config(uri: str, trust_remote_code: bool = False) -> transformers.PretrainedConfig:
    """The transformers config of a backbone folder in a bucket, from its config.json alone (no weights)."""
    import tempfile

    from mttl import storage

    raw = storage.read_bytes(storage.join(uri.rstrip("/"), "config.json"))
    if raw is None:
        raise ConfigError(f"model={uri} holds no config.json; give the URI of a folder written by save_pretrained "
                          "(e.g. <output_dir>/<run_name>/final/backbone)")
    with tempfile.TemporaryDirectory(prefix="mttl-config-") as folder:
        (Path(folder) / "config.json").write_bytes(raw)
        return transformers.AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)


def load_backbone(name_or_path: str, *, trust_remote_code: bool = False, cache_dir: str | None = None,
                  vocab_size: int | None = None, tiny_d_model: int = 128, tiny_num_layers: int = 2,
                  seed: int = 0, zero3_config: dict | None = None) -> transformers.PreTrainedModel:
    """The backbone named by `name_or_path`, in eval mode.

    `tiny-t5` needs `vocab_size` and is initialised from `seed` alone (same weights every time).
    A loaded model whose embedding has fewer rows than `vocab_size` is resized to it.
    `zero3_config`: build it partitioned under that ZeRO-3 DeepSpeed config (a process group must be
    initialised), in the dtype of the config's precision mode."""
    if not name_or_path:
        raise ConfigError("no backbone given: set -k model=tiny-t5, a local folder, or a hub name")
    if name_or_path == TINY_T5:
        if vocab_size is None:
            raise ConfigError("model=tiny-t5 needs the tokenizer's vocab size (vocab_size)")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with _partitioned_init(zero3_config) if zero3_config else contextlib.nullcontext():
                model = transformers.T5ForConditionalGeneration(tiny_t5_config(vocab_size, tiny_d_model,
                                                                               tiny_num_layers))
        return model.eval()
    path = Path(name_or_path).expanduser()
    looks_local = name_or_path.startswith(("/", "./", "../", "~")) or path.exists()
    if looks_local and not path.is_dir():
        raise ConfigError(f"model folder '{name_or_path}' does not exist; give a folder written by save_pretrained, "
                          f"a hub name, or tiny-t5")
    source = str(path) if looks_local else name_or_path
    hf_deepspeed = None
    if zero3_config:
        from transformers.integrations import HfDeepSpeedConfig

        # transformers builds and loads partitioned while this object lives (it keeps a weak reference)
        hf_deepspeed = HfDeepSpeedConfig(zero3_config)
    try:
        # float32 whatever dtype the files hold (transformers' default loads their own): adapters are
        # created in their layer's dtype and must be fp32; `mttl.device` then casts the frozen weights
        model = transformers.AutoModelForSeq2SeqLM.from_pretrained(source, trust_remote_code=trust_remote_code,
                                                                   cache_dir=cache_dir, dtype=torch.float32)
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"cannot load seq2seq model '{name_or_path}': {first_line}") from None
    if vocab_size is not None and model.get_input_embeddings().num_embeddings < vocab_size:
        model.resize_token_embeddings(vocab_size)
    del hf_deepspeed
    return model.eval()

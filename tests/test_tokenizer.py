"""load_tokenizer: byte default, local folders, the model's own tokenizer, and one-line errors."""

from __future__ import annotations

import pytest
from transformers import ByT5Tokenizer

from mttl.errors import ConfigError
from mttl.models.tokenizer import load_tokenizer


def test_real_t5_vocabulary_from_local_folder(t5_tokenizer_path):
    tokenizer = load_tokenizer(str(t5_tokenizer_path))
    assert tokenizer("translate English to German: hello").input_ids == [13959, 1566, 12, 2968, 10, 21820, 1]


def test_model_folder_supplies_tokenizer_when_spec_is_unset(t5_tokenizer_path):
    tokenizer = load_tokenizer(None, model=str(t5_tokenizer_path))
    assert tokenizer.eos_token_id == 1 and tokenizer.pad_token_id == 0
    assert tokenizer("hello").input_ids == [21820, 1]


@pytest.mark.parametrize("spec, model", [("byte", None), (None, None), (None, "tiny-t5"), ("byte", "tiny-t5")])
def test_byte_tokenizer_needs_no_files(spec, model):
    tokenizer = load_tokenizer(spec, model=model)
    assert isinstance(tokenizer, ByT5Tokenizer)
    # ByT5: ids are UTF-8 bytes shifted by 3 (pad, eos, unk), then EOS
    assert tokenizer("héllo").input_ids == [b + 3 for b in "héllo".encode()] + [1]


def test_missing_local_folder_names_it(tmp_path):
    missing = tmp_path / "no-such-tokenizer"
    with pytest.raises(ConfigError, match="no-such-tokenizer.*does not exist"):
        load_tokenizer(str(missing))


def test_folder_without_tokenizer_files_names_it(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=f"{tmp_path.name}.*holds no tokenizer files"):
        load_tokenizer(None, model=str(tmp_path))


def test_hub_name_offline_asks_for_local_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="t5-small.*Hugging Face Hub.*local folder") as info:
        load_tokenizer("t5-small")
    assert "\n" not in str(info.value)


def test_saved_byte_tokenizer_loads_back_from_a_backbone_folder(tmp_path):
    """A run that trained a config-built backbone saves the byte tokenizer beside it."""
    load_tokenizer("byte").save_pretrained(tmp_path / "backbone")
    tokenizer = load_tokenizer(None, model=str(tmp_path / "backbone"))
    assert isinstance(tokenizer, ByT5Tokenizer) and tokenizer("ok").input_ids == [ord("o") + 3, ord("k") + 3, 1]

"""Backbone loading: tiny-t5 from a config, local folders, and errors that name the path."""

from __future__ import annotations

import pytest
import torch
import transformers

from mttl.errors import ConfigError
from mttl.models.backbone import load_backbone


def test_tiny_t5_is_built_from_the_seed_alone():
    a = load_backbone("tiny-t5", vocab_size=50, tiny_d_model=32, tiny_num_layers=1, seed=3)
    b = load_backbone("tiny-t5", vocab_size=50, tiny_d_model=32, tiny_num_layers=1, seed=3)
    c = load_backbone("tiny-t5", vocab_size=50, tiny_d_model=32, tiny_num_layers=1, seed=4)
    assert isinstance(a, transformers.T5ForConditionalGeneration) and not a.training
    config = a.config
    assert (config.d_model, config.d_ff, config.num_heads, config.d_kv, config.num_layers,
            config.num_decoder_layers, config.vocab_size) == (32, 128, 4, 8, 1, 1, 50)
    assert (config.decoder_start_token_id, config.pad_token_id, config.eos_token_id) == (0, 0, 1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.shared.weight, c.shared.weight)
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    load_backbone("tiny-t5", vocab_size=50, tiny_d_model=32, tiny_num_layers=1)
    assert torch.equal(state, torch.random.get_rng_state()), "building a backbone leaves the global RNG alone"


def test_local_folder_round_trip(tmp_path):
    model = load_backbone("tiny-t5", vocab_size=40, tiny_d_model=32, tiny_num_layers=1)
    model.save_pretrained(tmp_path / "backbone")
    loaded = load_backbone(str(tmp_path / "backbone"))
    x = torch.randint(2, 40, (2, 5))
    dec = torch.zeros(2, 1, dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(model(input_ids=x, decoder_input_ids=dec).logits,
                           loaded(input_ids=x, decoder_input_ids=dec).logits)
    grown = load_backbone(str(tmp_path / "backbone"), vocab_size=48)
    assert grown.get_input_embeddings().num_embeddings == 48


def test_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(ConfigError, match="vocab_size"):
        load_backbone("tiny-t5")
    with pytest.raises(ConfigError, match=f"'{tmp_path / 'missing'}' does not exist"):
        load_backbone(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="cannot load seq2seq model 'no-such-org/no-such-model'"):
        load_backbone("no-such-org/no-such-model")

"""Saving and loading adapters: exact round trips, nothing but adapter tensors on disk, and
mismatches reported with the tensor's name."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mttl.adapters import (AdapterConfig, adapted_layers, load_adapters, modify_model, read_adapter_config,
                           save_adapters, selectors)
from mttl.adapters.ops import switch_to_average
from mttl.adapters.routing import AverageSelector, PolySelector
from mttl.errors import CheckpointError
from mttl.models.backbone import load_backbone
from mttl.models.routed import RoutedModel

VOCAB = 64
ADAPTED = dict(modify_modules=".*SelfAttention|.*EncDecAttention|.*DenseReluDense",
               modify_layers="q|k|v|o|wi_0|wi_1|wo")


def routed(acfg: AdapterConfig, seed: int) -> RoutedModel:
    torch.manual_seed(seed)
    model = RoutedModel(modify_model(load_backbone("tiny-t5", vocab_size=VOCAB, tiny_d_model=64), acfg)).eval()
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            for name in layer.adapter_tensor_names:
                getattr(layer, name).normal_(0, 0.3)
        for selector in selectors(model).values():
            if isinstance(selector, PolySelector):
                selector.module_logits.normal_(0, 2.0)
    return model


def logits(model, task_ids=(0, 2, 1)):
    torch.manual_seed(7)
    x = torch.randint(2, VOCAB, (3, 6))
    dec = torch.randint(2, VOCAB, (3, 4))
    with torch.no_grad():
        return model(task_ids=torch.tensor(task_ids), input_ids=x, decoder_input_ids=dec).logits


@pytest.mark.parametrize("modifier", ["poly", "poly_ia3", "lora", "ia3", "skilled"])
def test_round_trip_reproduces_logits_exactly(tmp_path, modifier):
    acfg = AdapterConfig(modifier=modifier, rank=2, n_skills=3, n_splits=2, n_tasks=3, granularity="blockwise",
                         **ADAPTED)
    source = routed(acfg, seed=0)
    save_adapters(source, tmp_path, meta={"step": 12})
    target = routed(read_adapter_config(tmp_path), seed=1)
    assert not torch.equal(logits(source), logits(target))
    assert load_adapters(target, tmp_path) == {"step": 12}
    assert torch.equal(logits(source), logits(target))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters.json", "adapters.safetensors"]


def test_saved_files_hold_only_adapter_and_routing_tensors(tmp_path):
    acfg = AdapterConfig(modifier="poly", rank=2, n_skills=3, n_splits=4, n_tasks=5, **ADAPTED)
    model = routed(acfg, seed=0)
    save_adapters(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapters.safetensors"))
    description = json.loads((tmp_path / "adapters.json").read_text())
    layers = adapted_layers(model)
    assert len(tensors) == 3 * len(layers)  # lora_a, lora_b and one finegrained selector per layer
    for name, tensor in tensors.items():
        assert name.rsplit(".", 1)[-1] in ("lora_a", "lora_b", "module_logits"), name
        assert description["tensors"][name]["shape"] == list(tensor.shape)
    assert tensors["encoder.block.0.layer.0.SelfAttention.q.selector.module_logits"].shape == (5, 12)
    assert description["adapter_config"] == acfg.to_dict()
    # Saved values are the full tensors.
    q = layers["encoder.block.0.layer.0.SelfAttention.q"]
    assert torch.equal(tensors["encoder.block.0.layer.0.SelfAttention.q.lora_a"], q.lora_a.detach())


def test_mismatches_name_the_tensor(tmp_path):
    acfg = AdapterConfig(modifier="poly", rank=2, n_skills=3, n_splits=2, n_tasks=3, **ADAPTED)
    save_adapters(routed(acfg, seed=0), tmp_path)
    with pytest.raises(CheckpointError, match=r"'encoder\.block\.0\.layer\.0\.SelfAttention\.q\.selector"
                                              r"\.module_logits' has shape \[3, 6\].*\[4, 6\]"):
        load_adapters(routed(acfg.replace(n_tasks=4), seed=0), tmp_path)
    with pytest.raises(CheckpointError, match=r"'encoder\.block\.0\.layer\.0\.SelfAttention\.k\.lora_a'.*has no place"):
        load_adapters(routed(acfg.replace(modify_layers="q|v"), seed=0), tmp_path)
    with pytest.raises(CheckpointError, match=r"'encoder\.block\.0\.layer\.0\.SelfAttention\.q\.lora_a' has shape"):
        load_adapters(routed(acfg.replace(rank=3), seed=0), tmp_path)
    save_adapters(routed(acfg.replace(modify_layers="q|v"), seed=0), tmp_path / "qv")
    with pytest.raises(CheckpointError, match=r"'encoder\.block\.0\.layer\.0\.SelfAttention\.k\.lora_a' is missing"):
        load_adapters(routed(acfg, seed=0), tmp_path / "qv")
    with pytest.raises(CheckpointError, match="no adapters.json"):
        load_adapters(routed(acfg, seed=0), tmp_path / "nowhere")


def test_average_routing_saved_is_restored_as_average(tmp_path):
    acfg = AdapterConfig(modifier="poly", rank=2, n_skills=3, n_splits=2, n_tasks=3, **ADAPTED)
    source = routed(acfg, seed=0)
    switch_to_average(source)
    save_adapters(source, tmp_path)
    assert read_adapter_config(tmp_path).selector == "average"
    target = routed(acfg, seed=1)
    load_adapters(target, tmp_path)
    assert all(isinstance(s, AverageSelector) for s in selectors(target).values())
    assert torch.equal(logits(source), logits(target))


def test_saving_again_replaces_the_previous_save(tmp_path):
    acfg = AdapterConfig(modifier="lora", rank=2, **ADAPTED)
    first, second = routed(acfg, seed=0), routed(acfg, seed=1)
    save_adapters(first, tmp_path)
    save_adapters(second, tmp_path)
    reloaded = routed(acfg, seed=2)
    load_adapters(reloaded, tmp_path)
    assert torch.equal(logits(reloaded), logits(second))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters.json", "adapters.safetensors"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_streamed_file_is_what_safetensors_itself_reads_and_writes(tmp_path, dtype):
    """The adapters file is written tensor by tensor (so a partitioned model can hand over one gathered
    group at a time); safetensors' own reader must read back every tensor bit for bit, and its own
    writer, given the same tensors, must give a file that loads to the same dict."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from mttl.adapters.inject import adapter_tensors

    acfg = AdapterConfig(modifier="poly", rank=2, n_skills=3, n_splits=2, n_tasks=3, **ADAPTED)
    model = routed(acfg, seed=0).to(dtype)
    save_adapters(model, tmp_path / "ours")
    ours = load_file(str(tmp_path / "ours" / "adapters.safetensors"))
    expected = {name: t.detach().contiguous() for name, t in adapter_tensors(model).items()}
    save_file(expected, str(tmp_path / "theirs.safetensors"))
    theirs = load_file(str(tmp_path / "theirs.safetensors"))
    assert list(ours) and set(ours) == set(expected) == set(theirs)
    for name, tensor in expected.items():
        assert ours[name].dtype == dtype and torch.equal(ours[name], tensor) and torch.equal(ours[name], theirs[name])
    with safe_open(str(tmp_path / "ours" / "adapters.safetensors"), "pt") as handle:
        assert handle.metadata() == {"format": "mttl-adapters"}


def test_a_writer_handed_the_wrong_tensor_leaves_the_saved_adapters_as_they_were(tmp_path):
    from mttl.adapters.state import AdapterWriter

    acfg = AdapterConfig(modifier="poly", rank=2, n_skills=3, n_splits=2, n_tasks=3, **ADAPTED)
    model = routed(acfg, seed=0)
    save_adapters(model, tmp_path)
    before = (tmp_path / "adapters.safetensors").read_bytes()
    writer = AdapterWriter(routed(acfg, seed=1), tmp_path)
    first, second = writer.names[:2]
    with pytest.raises(CheckpointError, match=f"{second}.*where {first}"):
        writer.write(second, torch.zeros(1))
    writer.abort()
    unfinished = AdapterWriter(model, tmp_path)
    with pytest.raises(CheckpointError, match="never written"):
        unfinished.commit()
    assert (tmp_path / "adapters.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters.json", "adapters.safetensors"]

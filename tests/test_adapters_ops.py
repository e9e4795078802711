"""Routing and adapter operations checked against their formulas, PEFT LoRA and merged weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mttl.adapters import AdapterConfig, adapted_layers, modify_model, routing_context, selectors
from mttl.adapters.inject import adapter_config
from mttl.adapters.ops import (add_task_rows, merge_task_into_base, resize_routing, routing_weights,
                               set_uniform_interpolation, switch_to_average, task_lora)
from mttl.adapters.routing import AverageSelector, PolySelector
from mttl.errors import ConfigError
from mttl.models.backbone import load_backbone
from mttl.models.routed import RoutedModel

VOCAB = 64
MODULES = ".*SelfAttention|.*EncDecAttention|.*DenseReluDense"
LAYERS = "q|k|v|o|wi_0|wi_1|wo"


def routed(modifier="poly", seed=0, **options) -> RoutedModel:
    torch.manual_seed(seed)
    settings = dict(modifier=modifier, rank=2, n_skills=3, n_splits=4, n_tasks=3, modify_modules=MODULES,
                    modify_layers=LAYERS, alpha=4.0)
    settings.update(options)
    model = RoutedModel(modify_model(load_backbone("tiny-t5", vocab_size=VOCAB, tiny_d_model=64),
                                     AdapterConfig(**settings))).eval()
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            for name in layer.adapter_tensor_names:
                getattr(layer, name).normal_(0, 0.3)
        for selector in selectors(model).values():
            if isinstance(selector, PolySelector):
                selector.module_logits.normal_(0, 2.0)
    return model


def inputs(batch=3):
    torch.manual_seed(5)
    return dict(input_ids=torch.randint(2, VOCAB, (batch, 6)), decoder_input_ids=torch.randint(2, VOCAB, (batch, 4)))


def test_add_task_rows_keeps_old_rows_and_appends_fresh_ones():
    model = routed()
    before = {name: s.module_logits.detach().clone() for name, s in selectors(model).items()}
    old_logits = model(task_ids=torch.tensor([0, 1, 2]), **inputs()).logits
    assert add_task_rows(model, 2) == 3
    for name, selector in selectors(model).items():
        assert selector.module_logits.shape == (5, 12) and selector.module_logits.requires_grad
        assert torch.equal(selector.module_logits[:3], before[name])
        assert selector.module_logits[3:].abs().max() <= 1e-3
    assert adapter_config(model).n_tasks == 5
    torch.testing.assert_close(model(task_ids=torch.tensor([0, 1, 2]), **inputs()).logits, old_logits, rtol=0, atol=0)
    model(task_ids=torch.tensor([4, 3, 0]), **inputs())


def test_resize_routing_gives_fresh_near_uniform_rows():
    model = routed()
    resize_routing(model, 1)
    for weights in routing_weights(model).values():
        assert weights.shape == (1, 4, 3)
        # σ(z) with |z| ≤ 1e-3, normalised over 3 skills: within ~1e-3 of 1/3.
        assert (weights - 1 / 3).abs().max() < 1e-3
    assert adapter_config(model).n_tasks == 1


def test_switch_to_average_routes_uniformly_and_keeps_sharing():
    model = routed(granularity="coderwise")
    switch_to_average(model)
    assert len(selectors(model)) == 2 and all(isinstance(s, AverageSelector) for s in selectors(model).values())
    assert adapter_config(model).selector == "average"
    for weights in routing_weights(model).values():
        torch.testing.assert_close(weights, torch.full((1, 4, 3), 1 / 3))
    # Uniform routing = every task's A and B are the plain mean of the skills: same logits for all tasks.
    logits = model(task_ids=torch.tensor([0, 1, 2]), **inputs()).logits
    torch.testing.assert_close(logits, model(task_ids=torch.tensor([2, 2, 2]), **inputs()).logits)


def test_uniform_interpolation_formula():
    model = routed()
    before = routing_weights(model)
    set_uniform_interpolation(model, 0.3)
    after = routing_weights(model)
    for name in before:
        torch.testing.assert_close(after[name], 0.3 * before[name] + 0.7 / 3)
    set_uniform_interpolation(model, 1.0)
    for name, weights in routing_weights(model).items():
        torch.testing.assert_close(weights, before[name])
    with pytest.raises(ValueError):
        set_uniform_interpolation(model, 1.5)


def test_routing_weights_are_eval_mode_even_while_training():
    model = routed(relaxed_bernoulli=True).train()
    a, b = routing_weights(model), routing_weights(model)
    for name in a:
        assert torch.equal(a[name], b[name])
    assert model.training


@pytest.mark.parametrize("modifier", ["poly", "lora"])
def test_task_lora_reproduces_each_layer_update(modifier):
    model = routed(modifier)
    loras = task_lora(model, 2)
    layers = adapted_layers(model)
    assert set(loras) == set(layers)
    for name, (a, b, scale) in loras.items():
        layer = layers[name]
        x_in = torch.randn(2, 3, layer.in_features)
        with torch.no_grad(), routing_context(torch.tensor([2, 2])):
            update = layer(x_in) - layer.base_forward(x_in)
        assert a.shape == (2, layer.in_features) and b.shape == (layer.out_features, 2) and scale == 2.0
        torch.testing.assert_close(update, scale * x_in @ a.T @ b.T, rtol=1e-5, atol=1e-5)


def test_task_lora_loaded_into_peft_lora_gives_the_routed_logits():
    peft = pytest.importorskip("peft")
    model = routed()
    task = 1
    loras = task_lora(model, task)
    torch.manual_seed(0)
    target = peft.get_peft_model(load_backbone("tiny-t5", vocab_size=VOCAB, tiny_d_model=64),
                                 peft.LoraConfig(task_type="SEQ_2_SEQ_LM", r=2, lora_alpha=4, lora_dropout=0.0,
                                                 target_modules=rf"({MODULES})\.({LAYERS})"))
    with torch.no_grad():
        for name, (a, b, _) in loras.items():
            module = target.get_submodule(f"base_model.model.{name}")
            module.lora_A["default"].weight.copy_(a)
            module.lora_B["default"].weight.copy_(b)
        expected = model(task_ids=torch.tensor([task] * 3), **inputs()).logits
        got = target.eval()(**inputs()).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("modifier", ["poly", "poly_ia3", "lora", "ia3"])
def test_merged_model_gives_the_routed_logits_of_the_task(modifier):
    model = routed(modifier)
    with torch.no_grad():
        expected = model(task_ids=torch.tensor([1, 1, 1]), **inputs()).logits
        merge_task_into_base(model, 1)
        assert adapted_layers(model) == {} and adapter_config(model) is None
        assert isinstance(model.hf_model.encoder.block[0].layer[0].SelfAttention.q, nn.Linear)
        got = model.hf_model(**inputs()).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_operations_on_models_without_learned_routing_raise():
    model = routed("lora")
    with pytest.raises(ConfigError, match="learned routing"):
        add_task_rows(model, 1)
    with pytest.raises(ConfigError, match="LoRA adapters"):
        task_lora(routed("ia3"), 0)

"""Selectors against their formulas (including the relaxed-Bernoulli sampler's distribution and
gradients), the forward-scoped routing context, task-id expansion and generation."""

from __future__ import annotations

import math

import pytest
import torch

from mttl.adapters import AdapterConfig, adapted_layers, modify_model, routing_context, selectors
from mttl.adapters.routing import _ACTIVE, AverageSelector, PolySelector, PrivateSelector
from mttl.errors import ConfigError
from mttl.models.backbone import load_backbone
from mttl.models.routed import RoutedModel

VOCAB = 64
ADAPTED = dict(modify_modules=".*SelfAttention|.*EncDecAttention|.*DenseReluDense",
               modify_layers="q|k|v|o|wi_0|wi_1|wo")


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def set_logits(selector, values):
    with torch.no_grad():
        selector.module_logits.copy_(torch.tensor(values, dtype=torch.float32))


# --------------------------------------------------------------------------------- selectors
def test_poly_eval_weights_are_normalised_sigmoids():
    selector = PolySelector(2, 2, 3).eval()
    logits = [[0.5, -1.0, 2.0, 0.0, 0.3, -0.7], [1.0, 1.0, 1.0, -2.0, 0.0, 4.0]]
    set_logits(selector, logits)
    w = selector(torch.tensor([1, 0]))
    for n, t in enumerate([1, 0]):
        for q in range(2):
            p = [sigmoid(logits[t][q * 3 + k]) for k in range(3)]
            for k in range(3):
                assert w[n, q, k].item() == pytest.approx(p[k] / (sum(p) + 1e-12), rel=1e-6)


def test_relaxed_bernoulli_sampler_has_the_binary_concrete_distribution():
    # S = K = 2 with average correction makes w = p (√S/√K = 1, no normalisation): the raw sample.
    selector = PolySelector(1, 2, 2, relaxed_bernoulli=True, average_correction=True).train()
    z = [-1.5, 0.0, 0.7, 2.5]
    set_logits(selector, [z])
    n = 40_000
    torch.manual_seed(0)
    samples = selector(torch.zeros(n, dtype=torch.long)).reshape(n, 4)
    generator = torch.Generator().manual_seed(123)
    u = torch.rand(n, 4, generator=generator, dtype=torch.float64)
    reference = torch.sigmoid(torch.tensor(z, dtype=torch.float64) + torch.log(u) - torch.log1p(-u))
    qs = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
    for j in range(4):
        ours = torch.quantile(samples[:, j].double().detach(), qs)
        theirs = torch.quantile(reference[:, j], qs)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0.015)
        assert samples[:, j].mean().item() == pytest.approx(reference[:, j].mean().item(), abs=0.01)
    # Evaluation is deterministic: σ(z).
    w = selector.eval()(torch.zeros(1, dtype=torch.long)).reshape(4)
    torch.testing.assert_close(w, torch.sigmoid(torch.tensor(z)))


def test_gradients_flow_through_the_relaxed_bernoulli_sample():
    selector = PolySelector(1, 2, 2, relaxed_bernoulli=True, average_correction=True).train()
    set_logits(selector, [[-1.0, 0.0, 0.5, 1.0]])
    samples = selector(torch.zeros(500, dtype=torch.long)).reshape(500, 4)
    samples.sum().backward()
    # Reparameterised: p = σ(z + logit(u)), so ∂p/∂z = p(1 − p) for every sample.
    expected = (samples * (1 - samples)).sum(0).detach()
    torch.testing.assert_close(selector.module_logits.grad[0], expected, rtol=1e-5, atol=1e-5)


def test_straight_through_rounds_forward_and_passes_sigmoid_gradient():
    selector = PolySelector(1, 2, 2, relaxed_bernoulli=False, straight_through=True, average_correction=True)
    z = torch.tensor([-1.0, 0.2, 3.0, -0.1])
    set_logits(selector, [z.tolist()])
    for mode in ("train", "eval"):
        getattr(selector, mode)()
        selector.module_logits.grad = None
        w = selector(torch.zeros(1, dtype=torch.long)).reshape(4)
        torch.testing.assert_close(w.detach(), torch.tensor([0.0, 1.0, 1.0, 0.0]))
        w.sum().backward()
        torch.testing.assert_close(selector.module_logits.grad[0], torch.sigmoid(z) * (1 - torch.sigmoid(z)))


def test_shared_skill_average_correction_l2_and_interpolation():
    z = [[0.3, -0.4, 1.2, 0.8, -2.0, 0.1]]
    shared = PolySelector(1, 2, 3, relaxed_bernoulli=False, shared_skill=True).eval()
    set_logits(shared, z)
    w = shared(torch.zeros(1, dtype=torch.long))[0]
    for q in range(2):
        p = [sigmoid(z[0][q * 3]), sigmoid(z[0][q * 3 + 1]), 1.0]
        for k in range(3):
            assert w[q, k].item() == pytest.approx(p[k] / (sum(p) + 1e-12), rel=1e-6)

    corrected = PolySelector(1, 2, 3, relaxed_bernoulli=False, average_correction=True).eval()
    set_logits(corrected, z)
    w = corrected(torch.zeros(1, dtype=torch.long))[0].flatten()
    for j in range(6):
        assert w[j].item() == pytest.approx(sigmoid(z[0][j]) * math.sqrt(2) / math.sqrt(3), rel=1e-6)

    l2 = PolySelector(1, 2, 3, l2_norm=True).train()
    set_logits(l2, z)
    w = l2(torch.zeros(1, dtype=torch.long))[0]
    for q in range(2):
        row = z[0][q * 3:(q + 1) * 3]
        norm = math.sqrt(sum(v * v for v in row))
        for k in range(3):
            assert w[q, k].item() == pytest.approx(row[k] / norm, rel=1e-6)

    plain = PolySelector(1, 2, 3).eval()
    set_logits(plain, z)
    before = plain(torch.zeros(1, dtype=torch.long))
    plain.uniform_alpha = 0.25
    torch.testing.assert_close(plain(torch.zeros(1, dtype=torch.long)), 0.25 * before + 0.75 / 3)


def test_routing_dropout_is_active_in_training_only():
    selector = PolySelector(1, 4, 8, relaxed_bernoulli=False, logits_dropout=0.5)
    plain = PolySelector(1, 4, 8, relaxed_bernoulli=False)
    with torch.no_grad():
        plain.module_logits.copy_(selector.module_logits)
    ids = torch.zeros(1, dtype=torch.long)
    torch.testing.assert_close(selector.eval()(ids), plain.eval()(ids))
    torch.manual_seed(0)
    trained = selector.train()(ids)
    assert (trained == 0).sum() > 0


def test_average_and_private_selectors():
    average = AverageSelector(3, 4)
    assert list(average.parameters()) == []
    torch.testing.assert_close(average(torch.tensor([5, 0])), torch.full((2, 3, 4), 0.25))
    private = PrivateSelector(1, 3)
    torch.testing.assert_close(private(torch.tensor([2, 0])), torch.tensor([[[0.0, 0.0, 1.0]], [[1.0, 0.0, 0.0]]]))
    with pytest.raises(ConfigError, match="n_skills == n_tasks"):
        AdapterConfig(modifier="poly", selector="private", n_skills=4, n_tasks=3)
    skilled = AdapterConfig(modifier="skilled", n_tasks=5)
    assert skilled.selector == "private" and skilled.n_skills == 5


def test_adapter_config_reads_run_config_keys():
    from mttl.config import Config

    cfg = Config()
    cfg.update({"model_modifier": "poly_lora", "lora_rank": 2, "n_splits": 4, "n_tasks": 7, "finegrained": False,
                "lora_modules": ".*SelfAttention", "lora_layers": "q|v", "poly_selector": "average"})
    acfg = AdapterConfig.from_config(cfg)
    assert (acfg.modifier, acfg.rank, acfg.n_splits, acfg.n_tasks, acfg.granularity, acfg.selector) == \
        ("poly", 2, 4, 7, "coarsegrained", "average")
    assert (acfg.modify_modules, acfg.modify_layers) == (".*SelfAttention", "q|v")
    assert AdapterConfig.from_dict(acfg.to_dict()) == acfg


# ----------------------------------------------------------------------------- routing context
def _tiny(granularity="finegrained", n_tasks=3, **options):
    torch.manual_seed(0)
    model = load_backbone("tiny-t5", vocab_size=VOCAB, tiny_d_model=64)
    acfg = AdapterConfig(modifier="poly", rank=2, n_skills=3, n_splits=4, n_tasks=n_tasks, randb_init=True,
                         relaxed_bernoulli=False, granularity=granularity, **ADAPTED, **options)
    model = RoutedModel(modify_model(model, acfg)).eval()
    with torch.no_grad():
        for selector in selectors(model).values():
            selector.module_logits.normal_(0, 3.0)
        for layer in adapted_layers(model).values():
            layer.lora_b.normal_(0, 0.5)
    return model


def test_context_is_reset_after_each_call_even_on_error():
    assert _ACTIVE.get() is None
    with routing_context([1, 2]):
        assert _ACTIVE.get().task_ids.tolist() == [1, 2]
        with routing_context([0]):
            assert _ACTIVE.get().task_ids.tolist() == [0]
        assert _ACTIVE.get().task_ids.tolist() == [1, 2]
    assert _ACTIVE.get() is None
    model = _tiny()
    with pytest.raises(ValueError, match="multiple of the number of task ids"):
        model(task_ids=torch.tensor([0, 1]), input_ids=torch.randint(2, VOCAB, (3, 4)),
              decoder_input_ids=torch.zeros(3, 1, dtype=torch.long))
    assert _ACTIVE.get() is None


def test_task_ids_are_expanded_once_per_selector_per_forward():
    model = _tiny(granularity="coarsegrained")
    (selector,) = selectors(model).values()
    calls = []
    selector.register_forward_hook(lambda module, args, out: calls.append(args[0].clone()))
    x = torch.randint(2, VOCAB, (6, 5))
    dec = torch.randint(2, VOCAB, (6, 3))
    expanded = model(task_ids=torch.tensor([0, 2]), input_ids=x, decoder_input_ids=dec).logits
    assert len(calls) == 1, "one selector call for all layers of one forward"
    explicit = model(task_ids=torch.tensor([0, 0, 0, 2, 2, 2]), input_ids=x, decoder_input_ids=dec).logits
    torch.testing.assert_close(expanded, explicit, rtol=0, atol=0)
    assert calls[0].tolist() == [0, 0, 0, 2, 2, 2]


def test_beam_search_with_per_example_task_ids_equals_one_task_at_a_time():
    model = _tiny()
    torch.manual_seed(1)
    x = torch.randint(2, VOCAB, (3, 6))
    task_ids = torch.tensor([2, 0, 1])
    kwargs = dict(num_beams=3, max_new_tokens=6, do_sample=False)
    together = model.generate(task_ids=task_ids, input_ids=x, **kwargs)
    for n in range(3):
        # A single-example batch takes the single-task (mix once) path; the mixed batch does not.
        alone = model.generate(task_ids=task_ids[n:n + 1], input_ids=x[n:n + 1], **kwargs)
        assert together[n, :alone.shape[1]].tolist() == alone[0].tolist()
    scores = [model(task_ids=torch.tensor([t]), input_ids=x[:1], decoder_input_ids=together[:1, :3]).logits
              for t in range(3)]
    assert not torch.allclose(scores[0], scores[1]), "tasks must route differently in this test"


def test_fast_path_logits_equal_general_path_on_a_model():
    model = _tiny()
    x = torch.randint(2, VOCAB, (4, 5))
    dec = torch.randint(2, VOCAB, (4, 3))
    fast = model(task_ids=torch.tensor([1, 1, 1, 1]), input_ids=x, decoder_input_ids=dec).logits
    mixed = model(task_ids=torch.tensor([1, 1, 1, 1, 0]), input_ids=torch.cat([x, x[:1]]),
                  decoder_input_ids=torch.cat([dec, dec[:1]])).logits[:4]
    torch.testing.assert_close(fast, mixed, rtol=1e-5, atol=1e-5)


def test_task_ids_outside_the_routing_table_are_reported_with_the_layer():
    model = _tiny(n_tasks=3)
    with pytest.raises(IndexError, match=r"task id 3 has no routing row in layer 'encoder\.block\.0.*add_task_rows"):
        model(task_ids=torch.tensor([0, 3]), input_ids=torch.randint(2, VOCAB, (2, 4)),
              decoder_input_ids=torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(IndexError, match=">= 0"):
        with routing_context([-1]):
            pass

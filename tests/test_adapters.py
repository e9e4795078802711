"""Adapter layers against explicit-loop implementations written here, special cases, injection,
freezing, gradients and per-group learning rates."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from mttl.adapters import AdapterConfig, adapted_layers, modify_model, param_groups, routing_context, selectors
from mttl.adapters.ia3 import IA3Linear
from mttl.adapters.lora import LoRALinear
from mttl.adapters.routing import AverageSelector, PolySelector
from mttl.adapters.skilled import SkilledIA3Linear, SkilledLoRALinear
from mttl.errors import ConfigError
from mttl.models.backbone import load_backbone
from mttl.models.routed import RoutedModel

VOCAB = 64
ADAPTED = dict(modify_modules=".*SelfAttention|.*EncDecAttention|.*DenseReluDense",
               modify_layers="q|k|v|o|wi_0|wi_1|wo")
TRAINABLE = ".*lora_[ab].*|.*module_logits.*"


# ------------------------------------------------------------------ reference implementations
def loop_skilled_lora(x, weight, bias, lora_a, lora_b, w, scale):
    """y = x Wᵀ + b + scale · x A(n) B(n), A(n)/B(n) built head by head, skill by skill."""
    n_splits, n_skills, d_in_split, rank = lora_a.shape
    d_out_split = lora_b.shape[-1]
    out = x @ weight.T + bias
    rows = []
    for n in range(x.shape[0]):
        a_full = torch.zeros(n_splits * d_in_split, rank, dtype=torch.float64)
        b_full = torch.zeros(rank, n_splits * d_out_split, dtype=torch.float64)
        for q in range(n_splits):
            a_q = torch.zeros(d_in_split, rank, dtype=torch.float64)
            b_q = torch.zeros(rank, d_out_split, dtype=torch.float64)
            for k in range(n_skills):
                a_q += w[n, q, k] * lora_a[q, k].double()
                b_q += w[n, q, k] * lora_b[q, k].double()
            a_full[q * d_in_split:(q + 1) * d_in_split] = a_q
            b_full[:, q * d_out_split:(q + 1) * d_out_split] = b_q
        rows.append(out[n].double() + scale * (x[n].double() @ a_full @ b_full))
    return torch.stack(rows)


def loop_skilled_ia3(x, weight, bias, lora_l, w):
    n_skills, n_splits, d_out_split = lora_l.shape
    out = x @ weight.T + bias
    rows = []
    for n in range(x.shape[0]):
        scale = torch.zeros(n_splits * d_out_split, dtype=torch.float64)
        for q in range(n_splits):
            for k in range(n_skills):
                scale[q * d_out_split:(q + 1) * d_out_split] += w[n, q, k] * lora_l[k, q].double()
        rows.append(out[n].double() * scale)
    return torch.stack(rows)


def loop_poly_eval_weights(logits, task_ids, n_splits, n_skills):
    """Evaluation routing: sigmoid of the task's logits, normalised over skills with +1e-12."""
    w = torch.zeros(len(task_ids), n_splits, n_skills, dtype=torch.float64)
    for n, t in enumerate(task_ids.tolist()):
        for q in range(n_splits):
            p = [1 / (1 + math.exp(-float(logits[t, q * n_skills + k]))) for k in range(n_skills)]
            for k in range(n_skills):
                w[n, q, k] = p[k] / (sum(p) + 1e-12)
    return w


def randomize(layer):
    with torch.no_grad():
        for name in layer.adapter_tensor_names:
            getattr(layer, name).normal_(0, 0.5)
        selector = getattr(layer, "selector", None)
        if isinstance(selector, PolySelector):
            selector.module_logits.normal_(0, 2.0)


def make_skilled(n_splits=4, n_skills=3, n_tasks=5, rank=2, d_in=16, d_out=12, **selector_options):
    torch.manual_seed(0)
    selector = PolySelector(n_tasks, n_splits, n_skills, **selector_options)
    layer = SkilledLoRALinear(nn.Linear(d_in, d_out), selector, layer_name="layer", rank=rank, n_skills=n_skills,
                              n_splits=n_splits, alpha=3.0)
    randomize(layer)
    return layer


# ----------------------------------------------------------------------------- forward paths
@pytest.mark.parametrize("task_ids", [[3, 0, 4, 3], [2, 2, 2, 2]], ids=["mixed", "single"])
@pytest.mark.parametrize("n_splits,n_skills", [(4, 3), (1, 3), (2, 1)])
def test_skilled_lora_eval_matches_loops(task_ids, n_splits, n_skills):
    layer = make_skilled(n_splits=n_splits, n_skills=n_skills).eval()
    x = torch.randn(4, 5, 16)
    ids = torch.tensor(task_ids)
    with routing_context(ids):
        y = layer(x)
    w = loop_poly_eval_weights(layer.selector.module_logits.detach(), ids, n_splits, n_skills)
    expected = loop_skilled_lora(x, layer.weight.detach(), layer.bias.detach(), layer.lora_a.detach(),
                                 layer.lora_b.detach(), w, 3.0 / 2)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("task_ids", [[3, 0, 4, 3], [1, 1, 1, 1]], ids=["mixed", "single"])
def test_skilled_lora_train_mode_with_sampled_routing_matches_loops(task_ids):
    layer = make_skilled(relaxed_bernoulli=True).train()
    seen = []
    layer.selector.register_forward_hook(lambda module, args, out: seen.append(out.detach()))
    x = torch.randn(4, 5, 16)
    with routing_context(torch.tensor(task_ids)):
        y = layer(x)
    (w,) = seen
    assert w.shape == (4, 4, 3), "sampling is per example, even when all examples share a task"
    expected = loop_skilled_lora(x, layer.weight.detach(), layer.bias.detach(), layer.lora_a.detach(),
                                 layer.lora_b.detach(), w.double(), 3.0 / 2)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def test_single_task_fast_path_equals_per_example_path():
    layer = make_skilled(relaxed_bernoulli=False).eval()
    x = torch.randn(6, 5, 16)
    with routing_context(torch.tensor([2] * 6)):
        fast = layer(x)
    # The same ids with one distinct id appended force the per-example path for the first 6 rows.
    with routing_context(torch.tensor([2] * 6 + [0])):
        general = layer(torch.cat([x, torch.randn(1, 5, 16)]))[:6]
    torch.testing.assert_close(fast, general, rtol=1e-6, atol=1e-6)


def test_skilled_ia3_matches_loops_eval_and_train():
    torch.manual_seed(0)
    selector = PolySelector(4, 2, 3, relaxed_bernoulli=False)
    layer = SkilledIA3Linear(nn.Linear(10, 8), selector, layer_name="layer", n_skills=3, n_splits=2)
    randomize(layer)
    x = torch.randn(3, 4, 10)
    for mode in ("eval", "train"):
        getattr(layer, mode)()
        for ids in ([0, 3, 1], [2, 2, 2]):
            with routing_context(torch.tensor(ids)):
                y = layer(x)
            w = loop_poly_eval_weights(selector.module_logits.detach(), torch.tensor(ids), 2, 3)
            expected = loop_skilled_ia3(x, layer.weight.detach(), layer.bias.detach(), layer.lora_a.detach(), w)
            torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def test_lora_and_ia3_layers_match_formulas():
    torch.manual_seed(0)
    base = nn.Linear(10, 6)
    lora = LoRALinear(base, rank=3, alpha=6.0)
    bound = 1 / math.sqrt(3 * 10)
    assert lora.lora_a.abs().max() <= bound and torch.count_nonzero(lora.lora_b) == 0
    with torch.no_grad():
        lora.lora_b.normal_()
    x = torch.randn(2, 5, 10)
    expected = x @ base.weight.T + base.bias + (6.0 / 3) * (x @ lora.lora_a.T @ lora.lora_b.T)
    torch.testing.assert_close(lora.train()(x), expected)
    torch.testing.assert_close(lora.eval()(x), expected)
    ia3 = IA3Linear(nn.Linear(10, 6))
    with torch.no_grad():
        ia3.multi_lora_b.uniform_(0.5, 1.5)
    torch.testing.assert_close(ia3(x), (x @ ia3.weight.T + ia3.bias) * ia3.multi_lora_b)


def test_lora_dropout_applies_to_the_adapter_branch_in_training_only():
    torch.manual_seed(0)
    lora = LoRALinear(nn.Linear(10, 6), rank=2, dropout=0.5)
    with torch.no_grad():
        lora.lora_b.normal_()
    x = torch.randn(3, 10)
    base = x @ lora.weight.T + lora.bias
    torch.testing.assert_close(lora.eval()(x), base + 0.5 * x @ lora.lora_a.T @ lora.lora_b.T)
    torch.manual_seed(1)
    mask_source = torch.nn.functional.dropout(x, 0.5, training=True)
    torch.manual_seed(1)
    torch.testing.assert_close(lora.train()(x), base + 0.5 * mask_source @ lora.lora_a.T @ lora.lora_b.T)


def test_conv1d_layers_are_adapted_like_linear():
    torch.manual_seed(0)
    conv = Conv1D(6, 10)
    x = torch.randn(2, 3, 10)
    lora = LoRALinear(conv, rank=2)
    with torch.no_grad():
        lora.lora_b.normal_()
    torch.testing.assert_close(lora(x), conv(x) + 0.5 * x @ lora.lora_a.T @ lora.lora_b.T)


# ---------------------------------------------------------------------------- special cases
def test_one_head_is_poly_and_one_skill_is_lora():
    poly = make_skilled(n_splits=1, n_skills=3).eval()
    x = torch.randn(2, 4, 16)
    ids = torch.tensor([1, 4])
    with routing_context(ids):
        y = poly(x)
    w = loop_poly_eval_weights(poly.selector.module_logits.detach(), ids, 1, 3)
    for n in range(2):  # Poly: one mixed LoRA per task, A(t) = Σ_k w_k A_k, B(t) = Σ_k w_k B_k
        a = sum(w[n, 0, k] * poly.lora_a[0, k].double() for k in range(3))
        b = sum(w[n, 0, k] * poly.lora_b[0, k].double() for k in range(3))
        expected = x[n].double() @ poly.weight.double().T + poly.bias.double() + 1.5 * x[n].double() @ a @ b
        torch.testing.assert_close(y[n].double(), expected.detach(), rtol=1e-5, atol=1e-5)

    single_skill = make_skilled(n_splits=1, n_skills=1).eval()
    lora = LoRALinear(nn.Linear(16, 12), rank=2, alpha=3.0)
    with torch.no_grad():
        lora.weight.copy_(single_skill.weight)
        lora.bias.copy_(single_skill.bias)
        lora.lora_a.copy_(single_skill.lora_a[0, 0].T)
        lora.lora_b.copy_(single_skill.lora_b[0, 0].T)
    with routing_context(torch.tensor([0, 3])):
        torch.testing.assert_close(single_skill(x), lora(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("modifier", ["lora", "poly", "skilled"])
def test_zero_b_leaves_base_logits_unchanged(modifier):
    base = load_backbone("tiny-t5", vocab_size=VOCAB, tiny_d_model=64)
    adapted = modify_model(load_backbone("tiny-t5", vocab_size=VOCAB, tiny_d_model=64),
                           AdapterConfig(modifier=modifier, rank=2, n_skills=3, n_splits=2, n_tasks=3, **ADAPTED))
    x = torch.randint(2, VOCAB, (3, 7))
    dec = torch.randint(2, VOCAB, (3, 4))
    expected = base(input_ids=x, decoder_input_ids=dec).logits
    got = RoutedModel(adapted)(task_ids=torch.tensor([0, 2, 1]), input_ids=x, decoder_input_ids=dec).logits
    assert torch.equal(got, expected)


# --------------------------------------------------------------------------------- injection
def test_injection_matches_full_names_and_freezes():
    model = load_backbone("tiny-t5", vocab_size=VOCAB, tiny_d_model=64)
    acfg = AdapterConfig(modifier="poly", rank=2, n_skills=3, n_splits=4, n_tasks=2,
                         modify_modules=".*SelfAttention", modify_layers="q|v", trainable_param_names=TRAINABLE)
    modify_model(model, acfg)
    layers = adapted_layers(model)
    # 2 encoder + 2 decoder blocks, q and v of each self-attention (not EncDecAttention, not k/o).
    assert sorted(layers) == sorted(f"{coder}.block.{i}.layer.0.SelfAttention.{p}"
                                    for coder in ("encoder", "decoder") for i in range(2) for p in "qv")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or "module_logits" in n for n in trainable)
    assert not model.shared.weight.requires_grad


def test_injection_errors_name_layer_and_regexes():
    with pytest.raises(ConfigError, match=r"encoder\.block\.0\.layer\.0\.SelfAttention\.q.*n_splits=3"):
        modify_model(load_backbone("tiny-t5", vocab_size=VOCAB, tiny_d_model=64),
                     AdapterConfig(modifier="poly", n_splits=3, **ADAPTED))
    with pytest.raises(ConfigError, match=r"modify_modules='\.\*Nothing'.*modify_layers='q'"):
        modify_model(load_backbone("tiny-t5", vocab_size=VOCAB, tiny_d_model=64),
                     AdapterConfig(modifier="lora", modify_modules=".*Nothing", modify_layers="q"))


@pytest.mark.parametrize("granularity,expected_groups", [
    ("finegrained", 2 * 2 * 4 + 2 * 4 + 2 * 2 * 3),  # 4 self-attn + 4 cross-attn + 3 FFN linears per block
    ("coarsegrained", 1),
    ("coderwise", 2),
    ("blockwise", 4),
    ("layerwise", 2 * 2 + 2 * 3),  # encoder: 2 sub-layers per block; decoder: 3
])
def test_granularity_shares_one_selector_per_group(granularity, expected_groups):
    model = modify_model(load_backbone("tiny-t5", vocab_size=VOCAB, tiny_d_model=64),
                         AdapterConfig(modifier="poly", rank=2, n_skills=2, granularity=granularity, **ADAPTED))
    assert len(selectors(model)) == expected_groups
    distinct = {id(layer.selector) for layer in adapted_layers(model).values()}
    assert len(distinct) == expected_groups


# ---------------------------------------------------------------------- gradients, LR groups
def _routed_tiny(**options):
    torch.manual_seed(0)
    model = load_backbone("tiny-t5", vocab_size=VOCAB, tiny_d_model=64)
    acfg = AdapterConfig(modifier="poly", rank=2, n_skills=3, n_splits=4, n_tasks=3, randb_init=True,
                         relaxed_bernoulli=True, **ADAPTED, **options)
    return RoutedModel(modify_model(model, acfg))


def test_gradients_reach_adapters_and_routing_only():
    model = _routed_tiny(trainable_param_names=TRAINABLE).train()
    x = torch.randint(2, VOCAB, (4, 6))
    labels = torch.randint(2, VOCAB, (4, 3))
    model(task_ids=torch.tensor([0, 1, 2, 0]), input_ids=x, labels=labels).loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name
    trained = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"lora_a", "lora_b", "module_logits"}


def test_each_param_group_steps_with_its_own_lr():
    model = _routed_tiny(trainable_param_names=TRAINABLE + "|.*final_layer_norm.*").train()
    groups = param_groups(model, learning_rate=1e-4, weight_decay=0.5, adapters_learning_rate=1e-3,
                          adapters_weight_decay=0.0, module_logits_learning_rate=0.1)
    assert [g["name"] for g in groups] == ["module_logits", "adapters", "others"]
    by_name = {g["name"]: g for g in groups}
    assert by_name["module_logits"]["weight_decay"] == 0.0 and by_name["others"]["weight_decay"] == 0.5
    optimizer = torch.optim.SGD(groups, lr=123.0)
    before = {id(p): p.detach().clone() for g in groups for p in g["params"]}
    x = torch.randint(2, VOCAB, (4, 6))
    model(task_ids=torch.tensor([0, 1, 2, 0]), input_ids=x, labels=torch.randint(2, VOCAB, (4, 3))).loss.backward()
    grads = {id(p): p.grad.detach().clone() for g in groups for p in g["params"]}
    optimizer.step()
    for group, lr, wd in (("module_logits", 0.1, 0.0), ("adapters", 1e-3, 0.0), ("others", 1e-4, 0.5)):
        for p in by_name[group]["params"]:
            # SGD with weight decay: p <- p - lr * (grad + wd * p)
            expected = before[id(p)] - lr * (grads[id(p)] + wd * before[id(p)])
            torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7)


def test_param_groups_reads_a_run_config_and_skips_frozen():
    from mttl.config import Config

    model = _routed_tiny(trainable_param_names=".*module_logits.*")
    cfg = Config(learning_rate=3e-4, module_logits_learning_rate=0.5)
    (group,) = param_groups(model, cfg)
    assert group["name"] == "module_logits" and group["lr"] == 0.5 and group["weight_decay"] == 0.0


def test_routed_layers_need_task_ids():
    model = _routed_tiny().eval()
    with pytest.raises(RuntimeError, match="without task ids"):
        model.hf_model(input_ids=torch.randint(2, VOCAB, (2, 5)), decoder_input_ids=torch.zeros(2, 1, dtype=torch.long))


def test_average_routing_needs_no_task_ids():
    model = modify_model(load_backbone("tiny-t5", vocab_size=VOCAB, tiny_d_model=64),
                         AdapterConfig(modifier="poly", selector="average", rank=2, n_skills=3, **ADAPTED))
    assert all(isinstance(s, AverageSelector) for s in selectors(model).values())
    assert not any("module_probs" in n for n, _ in model.named_parameters())
    model(input_ids=torch.randint(2, VOCAB, (2, 5)), decoder_input_ids=torch.zeros(2, 1, dtype=torch.long))


# ------------------------------------------------------------------------------ init, warm-up
def test_routed_lora_init_bounds():
    torch.manual_seed(0)
    d_in, d_out, n_splits = 64, 32, 4
    bound = 1 / math.sqrt(3 * d_in)  # over the full d_in, not d_in / S
    default = SkilledLoRALinear(nn.Linear(d_in, d_out), PolySelector(1, n_splits, 8), layer_name="l", rank=4,
                                n_skills=8, n_splits=n_splits)
    assert default.lora_a.abs().max() <= bound and default.lora_a.abs().max() > 0.95 * bound
    assert torch.count_nonzero(default.lora_b) == 0
    rand_b = SkilledLoRALinear(nn.Linear(d_in, d_out), PolySelector(1, n_splits, 8), layer_name="l", rank=4,
                               n_skills=8, n_splits=n_splits, randb_init=True)
    assert 0 < rand_b.lora_b.abs().max() <= bound
    kaiming = SkilledLoRALinear(nn.Linear(d_in, d_out), PolySelector(1, n_splits, 8), layer_name="l", rank=4,
                                n_skills=8, n_splits=n_splits, kaiming_init=True)
    block_bound = 1 / math.sqrt(d_in // n_splits)  # kaiming-uniform(a=√5) over each r × (d_in/S) block
    assert block_bound * 0.9 < kaiming.lora_a.abs().max() <= block_bound


def test_warmup_scales_the_update_by_training_calls():
    torch.manual_seed(0)
    lora = LoRALinear(nn.Linear(8, 4), rank=2, warmup=True)
    assert torch.count_nonzero(lora.lora_b) > 0, "warm-up starts B random like randb_init"
    x = torch.randn(3, 8)
    base = x @ lora.weight.T + lora.bias
    full = x @ lora.lora_a.T @ lora.lora_b.T * 0.5
    for _ in range(3):
        lora.train()(x)
    torch.testing.assert_close(lora.eval()(x), base + full * (3 / 10_000))
    torch.testing.assert_close(lora.eval()(x), base + full * (3 / 10_000))  # eval calls do not count


def test_bfloat16_model_runs_both_paths():
    model = _routed_tiny(trainable_param_names=TRAINABLE).to(torch.bfloat16).eval()
    x = torch.randint(2, VOCAB, (3, 6))
    dec = torch.randint(2, VOCAB, (3, 2))
    mixed = model(task_ids=torch.tensor([0, 1, 2]), input_ids=x, decoder_input_ids=dec).logits
    single = model(task_ids=torch.tensor([1, 1, 1]), input_ids=x, decoder_input_ids=dec).logits
    assert mixed.dtype == single.dtype == torch.bfloat16
    torch.testing.assert_close(mixed[1], single[1], rtol=0.05, atol=0.05)


def test_mixing_skills_keeps_the_parameter_not_a_view_and_matches_autograd():
    """The routed layer's mixing product gives autograd's own values and gradients, and saves the skills
    parameter itself for the backward: a saved view would keep a ZeRO-3 gathered parameter whole until
    the backward."""
    from mttl.adapters.skilled import MixSkills

    torch.manual_seed(0)
    weights = torch.rand(4, 3, 8, requires_grad=True)
    skills = torch.nn.Parameter(torch.randn(4, 8, 5, 2))
    grad = torch.randn(4, 3, 10)
    expected = torch.bmm(weights, skills.reshape(4, 8, -1))
    expected_grads = torch.autograd.grad(expected, (weights, skills), grad)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        mixed = MixSkills.apply(weights, skills)
    assert torch.equal(mixed, expected)
    for got, want in zip(torch.autograd.grad(mixed, (weights, skills), grad), expected_grads):
        assert torch.allclose(got, want, atol=1e-6)
    saved_skills = [t for t in saved if t.shape == skills.shape]
    assert saved_skills and all(t is skills for t in saved_skills)  # the parameter, no reshaped view
    assert not any(t.untyped_storage().data_ptr() == skills.untyped_storage().data_ptr() and t is not skills
                   for t in saved)


def test_mixing_skills_under_bf16_autocast_matches_autograd():
    """Under autocast (bf16 fine-tuning) the product runs in bf16 and the gradients come back in the
    inputs' fp32, as autograd's own graph of casts gives them."""
    from mttl.adapters.skilled import MixSkills

    torch.manual_seed(0)
    weights = torch.rand(4, 3, 8, requires_grad=True)
    skills = torch.nn.Parameter(torch.randn(4, 8, 5, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = torch.bmm(weights, skills.reshape(4, 8, -1))
        mixed = MixSkills.apply(weights, skills)
    assert mixed.dtype == expected.dtype == torch.bfloat16 and torch.equal(mixed, expected)
    grad = torch.randn(4, 3, 10, dtype=torch.bfloat16)
    for got, want in zip(torch.autograd.grad(mixed, (weights, skills), grad),
                         torch.autograd.grad(expected, (weights, skills), grad)):
        assert got.dtype == want.dtype == torch.float32 and torch.equal(got, want)

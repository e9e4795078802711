"""Arrow routing (`router_selector=arrow`) on the router extension point: against a per-token loop
written from the definition, against PEFT's Arrow on the same experts, through `mttl evaluate`,
and the registry that defines the allowed and routed names once."""

from __future__ import annotations

import json

import pytest
import torch

from mttl.adapters import AdapterConfig, adapted_layers, modify_model
from mttl.adapters import ops, registry
from mttl.config import Config
from mttl.errors import ConfigError
from mttl.models.backbone import load_backbone
from mttl.models.routed import RoutedModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 96
LAYERS = "q|k|v|o|wi_0|wi_1|wo"
MODULES = ".*SelfAttention|.*EncDecAttention|.*DenseReluDense"


def library(modifier: str, n_skills: int, n_splits: int = 1, rank: int = 4, alpha: float = 8.0, d_model: int = 64):
    torch.manual_seed(0)
    acfg = AdapterConfig(modifier=modifier, rank=rank, alpha=alpha, n_skills=n_skills, n_splits=n_splits,
                         n_tasks=n_skills, modify_modules=MODULES, modify_layers=LAYERS)
    model = modify_model(load_backbone("tiny-t5", vocab_size=VOCAB, tiny_d_model=d_model), acfg)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            layer.lora_a.normal_(0, 0.3)
            layer.lora_b.normal_(0, 0.3)
    return model.eval()


def expected_delta(x, experts, top_k, temperature):
    """Σ over the top-k experts of softmax(|x·v_k| / T)·scale·ΔW_k x, token by token, with v_k the
    top right-singular vector of the dense ΔW_k [d_out, d_in] from a full SVD."""
    protos = [torch.linalg.svd(delta.double())[2][0] for delta, _ in experts]
    out = []
    for token in x.reshape(-1, x.shape[-1]).double():
        scores = [abs(float(token @ v)) for v in protos]
        chosen = sorted(range(len(scores)), key=lambda k: -scores[k])[:top_k]
        z = torch.tensor([scores[k] / temperature for k in chosen]).double()
        w = torch.softmax(z, 0)
        out.append(sum(w[i] * scale * (experts[k][0].double() @ token) for i, (k, scale) in
                       enumerate((k, experts[k][1]) for k in chosen)))
    return torch.stack(out).reshape(*x.shape[:-1], -1)


def test_arrow_matches_a_token_loop_on_per_task_lora_and_mhr_libraries():
    torch.manual_seed(3)
    # per-task LoRA library (skilled): expert k = task k's LoRA, read through ops.task_lora
    model = library("skilled", n_skills=4, d_model=32)
    experts = {name: [] for name in adapted_layers(model)}
    for k in range(4):
        for name, (a, b, scale) in ops.task_lora(model, k).items():
            experts[name].append((b @ a, scale))
    ops.use_router(model, "arrow", arrow_top_k=2, arrow_temperature=0.7)
    for name in ["encoder.block.0.layer.0.SelfAttention.q", "decoder.block.1.layer.2.DenseReluDense.wo"]:
        layer = adapted_layers(model)[name]
        x = torch.randn(2, 5, layer.in_features)
        with torch.no_grad():
            got = layer(x) - layer.base_forward(x)
        assert got.abs().max() > 1e-3
        torch.testing.assert_close(got.double(), expected_delta(x, experts[name], 2, 0.7), atol=1e-5, rtol=1e-4)

    # MHR library (4 heads): expert k = skill k in every head, its dense update built from the heads
    model = library("poly", n_skills=3, n_splits=4, d_model=32)
    ops.use_router(model, "arrow", arrow_top_k=1, arrow_temperature=1.0)
    layer = adapted_layers(model)["decoder.block.0.layer.1.EncDecAttention.v"]
    mhr_experts = []
    for k in range(3):
        a_full = torch.cat([layer.lora_a[q, k] for q in range(4)], dim=0)  # [d_in, r]
        b_full = torch.cat([layer.lora_b[q, k] for q in range(4)], dim=1)  # [r, d_out]
        mhr_experts.append(((a_full @ b_full).t().detach(), layer.scale))
    x = torch.randn(3, 4, layer.in_features)
    with torch.no_grad():
        got = layer(x) - layer.base_forward(x)
    torch.testing.assert_close(got.double(), expected_delta(x, mhr_experts, 1, 1.0), atol=1e-5, rtol=1e-4)


def _spectral_gap_experts(model, n_experts, rank):
    """Experts whose B·A have singular values 3, 1, 0.5, 0.3 (random singular vectors): PEFT finds
    the prototype by 15 power iterations, exact to (1/3)^30 only with such a gap."""
    gen = torch.Generator().manual_seed(5)
    sing = torch.tensor([3.0, 1.0, 0.5, 0.3])[:rank]
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            for k in range(n_experts):
                u, _ = torch.linalg.qr(torch.randn(layer.out_features, rank, generator=gen))
                v, _ = torch.linalg.qr(torch.randn(layer.in_features, rank, generator=gen))
                layer.lora_a[0, k] = v * sing  # [d_in, r]; A (PEFT) = (v·diag(s))ᵀ
                layer.lora_b[0, k] = u.t()  # [r, d_out]; B (PEFT) = u


def test_logits_match_peft_arrow(tmp_path):
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.arrow import create_arrow_model

    n_experts, rank, alpha, top_k, temperature = 3, 4, 8.0, 2, 0.5
    ours = library("skilled", n_skills=n_experts, rank=rank, alpha=alpha)
    _spectral_gap_experts(ours, n_experts, rank)
    paths = []
    for k, name_to_lora in enumerate(ops.task_lora(ours, k) for k in range(n_experts)):
        lora_config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=rf"({MODULES})\.({LAYERS})")
        expert = peft.get_peft_model(load_backbone("tiny-t5", vocab_size=VOCAB, tiny_d_model=64), lora_config)
        with torch.no_grad():
            for name, module in expert.named_modules():
                if isinstance(module, peft.tuners.lora.layer.Linear):
                    a, b, _ = name_to_lora[name.removeprefix("base_model.model.")]
                    module.lora_A["default"].weight.copy_(a)
                    module.lora_B["default"].weight.copy_(b)
        expert.save_pretrained(tmp_path / f"expert_{k}")
        paths.append(str(tmp_path / f"expert_{k}"))
    theirs = create_arrow_model(load_backbone("tiny-t5", vocab_size=VOCAB, tiny_d_model=64), paths,
                                peft.ArrowConfig(top_k=top_k, router_temperature=temperature, rng_seed=0)).eval()
    ops.use_router(ours, "arrow", arrow_top_k=top_k, arrow_temperature=temperature)
    ours = RoutedModel(ours).eval()

    torch.manual_seed(1)
    input_ids = torch.randint(2, VOCAB, (3, 9))
    decoder_input_ids = torch.randint(2, VOCAB, (3, 5))
    with torch.no_grad():
        expected = theirs(input_ids=input_ids, decoder_input_ids=decoder_input_ids).logits
        got = ours(task_ids=None, input_ids=input_ids, decoder_input_ids=decoder_input_ids).logits
        base = load_backbone("tiny-t5", vocab_size=VOCAB, tiny_d_model=64)(
            input_ids=input_ids, decoder_input_ids=decoder_input_ids).logits
    assert (expected - base).abs().max() > 1e-2, "the experts must change the logits for a meaningful check"
    print("max |ours - peft| =", (got - expected).abs().max().item())
    # 1e-5 relative to the logits' scale (|logit| up to ~4 here): fp32 rounding, not a difference in
    # the method. Measured: given identical inputs the first adapted layer's outputs (|y| ~ 8) differ
    # by ~1e-6 (the two sum the experts in another order) and the gap grows layer by layer to ~1.6e-5
    # at the logits; with top_k=1 (no mixing weights) the logits agree to 0 in fp32.
    assert (got - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())


def test_arrow_settings_are_checked():
    with pytest.raises(ConfigError, match="arrow_top_k=5"):
        ops.use_router(library("skilled", n_skills=3, d_model=32), "arrow", arrow_top_k=5)
    with pytest.raises(ConfigError, match="model_modifier=poly or skilled"):
        AdapterConfig(modifier="poly_ia3", selector="arrow")
    with pytest.raises(ConfigError, match="arrow_temperature"):
        AdapterConfig(modifier="poly", selector="arrow", arrow_temperature=0)
    plain = modify_model(load_backbone("tiny-t5", vocab_size=VOCAB, tiny_d_model=32),
                         AdapterConfig(modifier="lora", rank=2, modify_modules=MODULES, modify_layers=LAYERS))
    with pytest.raises(ConfigError, match="needs a routed checkpoint"):
        ops.use_router(plain, "arrow")


def test_evaluate_with_arrow_routing(tmp_path):
    from mttl.cli import main
    from mttl.data.shards import read_manifest
    from mttl.data.synthetic import prepare_synthetic
    from test_finetune import make_checkpoint

    data = tmp_path / "data"
    prepare_synthetic(data, seed=1, n_heldout=1, rows_per_task=8, warmup_rows_per_task=4, validation_rows=6,
                      heldout_pool=8, heldout_validation=4, heldout_test=6)
    unseen = sorted(t for t, m in read_manifest(data)["tasks"].items() if m["role"] == "test")[0]
    checkpoint = make_checkpoint(tmp_path, data, "skilled", n_tasks=3)
    settings = ["num_beams=1", "predict_batch_size=16", "max_output_length=8", "tensorboard=False"]
    assert main(["evaluate", "-k", f"checkpoint={checkpoint}", f"tasks=['{unseen}']", f"output_dir={tmp_path}",
                 "run_name=arrow", "router_selector=arrow", "arrow_top_k=2", "arrow_temperature=0.5",
                 *settings]) == 0
    rows = [json.loads(line) for line in (tmp_path / "arrow" / "results.jsonl").read_text().splitlines()]
    assert [r["finetune_type"] for r in rows] == ["arrow_routing"]
    saved = json.loads((tmp_path / "arrow" / "config.json").read_text())
    assert (saved["router_selector"], saved["arrow_top_k"], saved["arrow_temperature"]) == ("arrow", 2, 0.5)
    # a library without routed LoRA experts: one line naming the key, exit 2
    lora = make_checkpoint(tmp_path, data, "lora", n_tasks=3)
    assert main(["evaluate", "-k", f"checkpoint={lora}", f"tasks=['{unseen}']", f"output_dir={tmp_path}",
                 "run_name=bad", "router_selector=arrow", *settings]) == 2


def test_registry_defines_allowed_and_routed_names_once():
    from dataclasses import fields

    from mttl.sweep import default_space_name

    choices = {f.name: f.metadata["choices"] for f in fields(Config) if f.metadata.get("choices")}
    assert choices["router_selector"] == list(registry.ROUTERS) and "arrow" in choices["router_selector"]
    assert choices["model_modifier"] == [None, *registry.LAYER_KINDS]
    assert set(registry.ROUTED_MODIFIERS) == {"poly", "poly_ia3", "skilled"}
    # skilled's default router is private; a router named explicitly is kept
    assert AdapterConfig(modifier="skilled", n_tasks=3).selector == "private"
    assert AdapterConfig(modifier="skilled", n_tasks=3, selector="average").selector == "average"
    assert Config().update({"model_modifier": "skilled", "router_selector": "arrow"}).router_selector == "arrow"
    with pytest.raises(ConfigError, match="arrow"):
        Config().update({"router_selector": "nope"})
    # a skilled (per-task LoRA) checkpoint is routed: it gets the routed search space, not `lora`
    assert default_space_name(Config().update({"model_modifier": "skilled"})) == "poly"
    assert default_space_name(Config().update({"model_modifier": "skilled", "n_splits": 2})) == "mhr"
    assert default_space_name(Config().update({"model_modifier": "lora"})) == "lora"
    for name in registry.ROUTERS:
        assert registry.router_class(name).__name__.endswith(("Selector", "Router"))

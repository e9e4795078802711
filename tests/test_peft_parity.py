"""Parity with PEFT's poly tuner (peft.PolyModel): the same base model, adapter and routing
weights copied into PEFT give the same logits in evaluation mode."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")

from mttl.adapters import AdapterConfig, adapted_layers, modify_model, selectors  # noqa: E402
from mttl.models.backbone import load_backbone  # noqa: E402
from mttl.models.routed import RoutedModel  # noqa: E402

VOCAB = 96
N_TASKS = 3
LAYERS = "q|k|v|o|wi_0|wi_1|wo"
MODULES = ".*SelfAttention|.*EncDecAttention|.*DenseReluDense"


def build_pair(n_skills: int, n_splits: int, rank: int = 4):
    torch.manual_seed(0)
    ours = modify_model(load_backbone("tiny-t5", vocab_size=VOCAB, tiny_d_model=64),
                        AdapterConfig(modifier="poly", rank=rank, n_skills=n_skills, n_splits=n_splits,
                                      n_tasks=N_TASKS, modify_modules=MODULES, modify_layers=LAYERS))
    with torch.no_grad():  # random adapters and routing so every part of the math matters
        for layer in adapted_layers(ours).values():
            layer.lora_a.normal_(0, 0.3)
            layer.lora_b.normal_(0, 0.3)
        for selector in selectors(ours).values():
            selector.module_logits.normal_(0, 2.0)
    theirs = peft.get_peft_model(
        load_backbone("tiny-t5", vocab_size=VOCAB, tiny_d_model=64),
        peft.PolyConfig(task_type="SEQ_2_SEQ_LM", r=rank, n_tasks=N_TASKS, n_skills=n_skills, n_splits=n_splits,
                        target_modules=rf"({MODULES})\.({LAYERS})"))
    peft_layers = {name: module for name, module in theirs.named_modules()
                   if isinstance(module, peft.tuners.poly.layer.Linear)}
    ours_layers = adapted_layers(ours)
    assert len(peft_layers) == len(ours_layers) > 0
    with torch.no_grad():
        for name, layer in ours_layers.items():
            target = peft_layers[f"base_model.model.{name}"]
            # Same layout: lora A [S, K, d_in/S, r], B [S, K, r, d_out/S], router logits [T, S*K].
            target.poly_lora_A["default"].copy_(layer.lora_a)
            target.poly_lora_B["default"].copy_(layer.lora_b)
            target.poly_router["default"].module_logits.copy_(layer.selector.module_logits)
    return RoutedModel(ours).eval(), theirs.eval()


@pytest.mark.parametrize("n_skills,n_splits", [(4, 4), (4, 1)], ids=["mhr_k4_s4", "poly_k4_s1"])
@pytest.mark.parametrize("task_ids", [[1, 1, 1, 1], [0, 2, 1, 2]], ids=["single_task", "mixed_tasks"])
def test_logits_match_peft_poly(n_skills, n_splits, task_ids):
    ours, theirs = build_pair(n_skills, n_splits)
    torch.manual_seed(1)
    input_ids = torch.randint(2, VOCAB, (4, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 6:] = 0
    decoder_input_ids = torch.randint(2, VOCAB, (4, 5))
    ids = torch.tensor(task_ids)
    with torch.no_grad():
        expected = theirs(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                          task_ids=ids).logits
        got = ours(task_ids=ids, input_ids=input_ids, attention_mask=attention_mask,
                   decoder_input_ids=decoder_input_ids).logits
        base = theirs.get_base_model()
        with theirs.disable_adapter():
            base_logits = base(input_ids=input_ids, attention_mask=attention_mask,
                               decoder_input_ids=decoder_input_ids).logits
    assert (expected - base_logits).abs().max() > 1e-2, "adapters must change the logits for a meaningful check"
    assert (got - expected).abs().max().item() <= 1e-5

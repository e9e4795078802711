"""T-Few losses against the formulas written out with explicit loops over rows, choices and tokens."""

from __future__ import annotations

import math

import pytest
import torch

from mttl.evaluation.predict import IGNORE_INDEX
from mttl.finetune.losses import tfew_losses


def _random_case(seed: int):
    gen = torch.Generator().manual_seed(seed)
    n_rows, n_choices, length = 3, 4, 5
    token_logprobs = -torch.rand(n_rows, n_choices, length, generator=gen) * 3
    labels = torch.randint(1, 50, (n_rows, n_choices, length), generator=gen)
    lengths = torch.randint(1, length + 1, (n_rows, n_choices), generator=gen)
    for i in range(n_rows):
        for c in range(n_choices):
            labels[i, c, lengths[i, c]:] = IGNORE_INDEX
            token_logprobs[i, c, lengths[i, c]:] = 0.0  # what choice_token_logprobs returns there
    gold = torch.randint(0, n_choices, (n_rows,), generator=gen)
    return token_logprobs, labels, gold


def _expected(token_logprobs, labels, gold, length_norm, mc_w, ul_w):
    n_rows, n_choices, length = labels.shape
    lm_sum, lm_count, ul_sum, ul_count, mc_sum, correct = 0.0, 0, 0.0, 0, 0.0, 0
    for i in range(n_rows):
        scores = []
        for c in range(n_choices):
            tokens = [t for t in range(length) if labels[i, c, t] != IGNORE_INDEX]
            nll = -sum(float(token_logprobs[i, c, t]) for t in tokens)
            scores.append(nll / len(tokens) ** length_norm)
            for t in tokens:
                lp = float(token_logprobs[i, c, t])
                if c == gold[i]:
                    lm_sum += -lp
                    lm_count += 1
                else:
                    ul_sum += -math.log(1 - math.exp(lp) + 0.01)
                    ul_count += 1
        logits = [-s for s in scores]
        log_z = math.log(sum(math.exp(x) for x in logits))
        mc_sum += -(logits[gold[i]] - log_z)
        correct += int(min(range(n_choices), key=lambda c: scores[c]) == gold[i])
    lm, mc, ul = lm_sum / lm_count, mc_sum / n_rows, ul_sum / ul_count
    return {"loss": lm + mc_w * mc + ul_w * ul, "lm_loss": lm, "mc_loss": mc, "unlikely_loss": ul,
            "accuracy": correct / n_rows}


@pytest.mark.parametrize("length_norm,mc_w,ul_w,seed", [(1.0, 1.0, 1.0, 0), (0.0, 0.5, 2.0, 1), (0.5, 0.0, 0.0, 2)])
def test_tfew_losses_match_formulas(length_norm, mc_w, ul_w, seed):
    token_logprobs, labels, gold = _random_case(seed)
    got = tfew_losses(token_logprobs, labels, gold, length_norm=length_norm, mc_loss=mc_w, unlikely_loss=ul_w)
    want = _expected(token_logprobs, labels, gold, length_norm, mc_w, ul_w)
    for key, value in want.items():
        assert float(got[key]) == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_tfew_loss_gradient_flows_only_through_total():
    token_logprobs, labels, gold = _random_case(3)
    token_logprobs.requires_grad_(True)
    out = tfew_losses(token_logprobs, labels, gold, length_norm=1.0, mc_loss=1.0, unlikely_loss=1.0)
    out["loss"].backward()
    pad = labels == IGNORE_INDEX
    assert token_logprobs.grad[~pad].abs().sum() > 0
    assert not out["mc_loss"].requires_grad


# ------------------------------------------------------------------------------ label smoothing
def _smoothed_nll(logits: torch.Tensor, labels: torch.Tensor, eps: float) -> float:
    """The reference's NI loss (fairseq's label_smoothed_nll_loss), token by token: per token
    (1−ε)·(−log p_gold) + ε/V·Σ_v(−log p_v), padding skipped; here averaged over tokens."""
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            gold = int(labels[b, t])
            if gold == IGNORE_INDEX:
                continue
            row = [float(x) for x in logits[b, t]]
            log_z = math.log(sum(math.exp(x) for x in row))
            logp = [x - log_z for x in row]
            total += (1 - eps) * -logp[gold] + eps / len(row) * sum(-x for x in logp)
            count += 1
    return total / count


def _tiny_routed(dataset: str, **keys):
    from mttl.config import Config
    from mttl.models.run import build_routed_model
    from mttl.models.tokenizer import load_tokenizer

    cfg = Config().copy(dataset=dataset, model="tiny-t5", tokenizer="byte", tiny_d_model=16, tiny_num_layers=1,
                        model_modifier="lora", lora_rank=2, **keys)
    tokenizer = load_tokenizer("byte")
    return build_routed_model(cfg, tokenizer), tokenizer


@pytest.mark.parametrize("dataset,keys,eps", [("ni", {}, 0.1), ("t0", {}, 0.0), ("synthetic", {}, 0.0),
                                              ("ni", {"label_smoothing": 0.0}, 0.0),
                                              ("t0", {"label_smoothing": 0.2}, 0.2)])
def test_training_loss_is_label_smoothed_as_the_reference_ni_loss(dataset, keys, eps):
    """NI trains with ε = 0.1 (pre-training and few-shot, as the reference's NI loss); T0 with none."""
    model, tokenizer = _tiny_routed(dataset, **keys)
    assert model.label_smoothing == pytest.approx(eps)
    enc = tokenizer(["a b c", "dd"], padding=True, return_tensors="pt")
    labels = tokenizer(["xyz", "q"], padding=True, return_tensors="pt")
    labels = labels["input_ids"].masked_fill(labels["attention_mask"] == 0, IGNORE_INDEX)
    task_ids = torch.zeros(2, dtype=torch.long)
    torch.manual_seed(0)
    model.train()
    out = model(task_ids=task_ids, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels)
    assert float(out.loss.detach()) == pytest.approx(_smoothed_nll(out.logits.detach(), labels, eps), rel=1e-5)
    model.eval()  # validation and scores stay the plain likelihood
    out = model(task_ids=task_ids, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels)
    assert float(out.loss) == pytest.approx(_smoothed_nll(out.logits, labels, 0.0), rel=1e-5)


def test_few_shot_ni_inherits_label_smoothing_from_the_checkpoint_dataset():
    from mttl.config import Config
    from mttl.finetune.types import finetune_config

    run_cfg = Config().copy(dataset="ni", model="tiny-t5")
    assert finetune_config(run_cfg, Config()).resolved_label_smoothing() == pytest.approx(0.1)
    assert finetune_config(run_cfg.copy(dataset="t0"), Config()).resolved_label_smoothing() == 0.0
    with pytest.raises(Exception, match="label_smoothing.*in \\[0, 1\\)"):
        Config().copy(label_smoothing=1.0)

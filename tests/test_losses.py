"""T-Few losses against the formulas written out with explicit loops over rows, choices and tokens."""

from __future__ import annotations

import math

import pytest
import torch

from mttl.evaluation.metrics import IGNORE_INDEX
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

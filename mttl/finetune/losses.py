"""Few-shot training losses: the T-Few recipe for multiple-choice tasks, LM loss otherwise.

Multiple choice (one decoder pass over every choice, see `evaluation.metrics.choice_token_logprobs`):
    L = L_LM + mc_loss · L_MC + unlikely_loss · L_UL
- L_LM: token cross-entropy on the gold choice (mean over its tokens in the batch);
- L_MC: cross-entropy of softmax(−score) against the label, score = summed NLL / length^length_norm;
- L_UL: −mean over the tokens of wrong choices of log(1 − p(token) + 0.01).
The reference adds log(1.01) for every padding and gold token to the unlikelihood sum; here only
wrong-choice tokens count, which is what the formula in the T-Few paper describes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mttl.evaluation.predict import IGNORE_INDEX, choice_scores, choice_token_logprobs

UNLIKELIHOOD_EPS = 0.01


def tfew_losses(token_logprobs: torch.Tensor, choice_labels: torch.Tensor, label: torch.Tensor, *,
                length_norm: float, mc_loss: float, unlikely_loss: float) -> dict:
    """Loss terms from per-token log-probabilities [B, C, T] of every choice.

    Returns {'loss', 'lm_loss', 'mc_loss', 'unlikely_loss', 'accuracy'} (tensors; the last three
    are reported unweighted).
    """
    tokens = choice_labels != IGNORE_INDEX
    rows = torch.arange(label.shape[0], device=label.device)
    gold_tokens = tokens[rows, label]
    lm = -(token_logprobs[rows, label] * gold_tokens).sum() / gold_tokens.sum().clamp(min=1)

    scores = choice_scores(token_logprobs, choice_labels, length_norm)
    mc = F.cross_entropy(-scores, label)

    wrong = tokens.clone()
    wrong[rows, label] = False
    # exp(log p) of masked-out slots is irrelevant: they are zeroed by `wrong` before summing.
    unlikely_terms = -torch.log(1 - token_logprobs.exp() + UNLIKELIHOOD_EPS)
    ul = (unlikely_terms * wrong).sum() / wrong.sum().clamp(min=1)

    total = lm + mc_loss * mc + unlikely_loss * ul
    accuracy = (scores.argmin(-1) == label).float().mean()
    return {"loss": total, "lm_loss": lm.detach(), "mc_loss": mc.detach(), "unlikely_loss": ul.detach(),
            "accuracy": accuracy.detach()}


def multiple_choice_loss(model, batch: dict, task_ids: torch.Tensor, *, length_norm: float,
                         mc_loss: float, unlikely_loss: float) -> dict:
    """T-Few losses for a batch from `encode_choice_batch` (encoder once, all choices in one pass)."""
    logprobs = choice_token_logprobs(model, task_ids, batch["input_ids"], batch["attention_mask"],
                                     batch["choice_labels"])
    return tfew_losses(logprobs, batch["choice_labels"], batch["label"], length_norm=length_norm,
                       mc_loss=mc_loss, unlikely_loss=unlikely_loss)


def lm_loss(model, batch: dict, task_ids: torch.Tensor) -> dict:
    """Token cross-entropy of the target (generation tasks), HF's mean over non-ignored tokens."""
    out = model(task_ids=task_ids, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                labels=batch["labels"])
    return {"loss": out.loss, "lm_loss": out.loss.detach()}

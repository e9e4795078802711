"""Running the model on task rows: tokenizing them, rank classification, generation, and
`evaluate_rows`, which scores a task's rows with its metric (the scores themselves: `mttl.evaluation.metrics`).

- multiple choice (T0 held-out tasks): the encoder runs once per input, every answer choice is
  scored in one decoder batch; score = summed token NLL / length^length_norm; prediction =
  lowest score; metric = accuracy.
- generation (Super-NaturalInstructions): beam search through `RoutedModel.generate`, then
  Rouge-L and exact match of the predictions.

Rows are the dicts of `mttl.data.fewshot` (`source`, `target`, `references`, `answer_choices`,
`label`, `task_name`, …); the model is a `RoutedModel`, already on its device; scoring runs there
under the config's `precision` (`mttl.device`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutput

from mttl.device import for_model
from mttl.evaluation.metrics import METRIC_KEYS, generation_metrics, row_references

IGNORE_INDEX = -100


# ------------------------------------------------------------------------------ tokenizing
def encode_sources(tokenizer, rows: Sequence[dict], max_input_length: int) -> dict:
    enc = tokenizer([r["source"] for r in rows], max_length=max_input_length, truncation=True,
                    padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def encode_targets(tokenizer, texts: Sequence[str], max_output_length: int) -> torch.Tensor:
    """Target ids with padding replaced by IGNORE_INDEX (the label convention of HF seq2seq)."""
    enc = tokenizer(list(texts), max_length=max_output_length, truncation=True, padding=True,
                    return_tensors="pt")
    return enc["input_ids"].masked_fill(enc["attention_mask"] == 0, IGNORE_INDEX)


def encode_choice_batch(tokenizer, rows: Sequence[dict], max_input_length: int,
                        max_output_length: int) -> dict:
    """Inputs [B, L] and every choice of every row as labels [B, C, T] (C = most choices in the batch).

    Rows with fewer choices get all-ignored choice slots, masked out of scores by `choice_scores`.
    """
    batch = encode_sources(tokenizer, rows, max_input_length)
    n_choices = max(len(r["answer_choices"]) for r in rows)
    flat = [c for r in rows for c in r["answer_choices"]]
    ids = encode_targets(tokenizer, flat, max_output_length)
    labels = torch.full((len(rows), n_choices, ids.shape[1]), IGNORE_INDEX, dtype=torch.long)
    offset = 0
    for i, row in enumerate(rows):
        n = len(row["answer_choices"])
        labels[i, :n] = ids[offset:offset + n]
        offset += n
    batch["choice_labels"] = labels
    batch["label"] = torch.tensor([int(r["label"]) for r in rows], dtype=torch.long)
    return batch


# ------------------------------------------------------------------------ rank classification
def choice_token_logprobs(model, task_ids: torch.Tensor, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor, choice_labels: torch.Tensor) -> torch.Tensor:
    """log p(token) of every choice token, [B, C, T]; 0 where the label is IGNORE_INDEX.

    The encoder runs once on the B inputs; its states are repeated over the C choices and the
    decoder scores all B·C choices in one batch (`task_ids` stay length B: the routed model
    expands them over the multiple).
    """
    n_rows, n_choices, length = choice_labels.shape
    with model.routing_context(task_ids):
        encoder_states = model.hf_model.get_encoder()(input_ids=input_ids,
                                                      attention_mask=attention_mask).last_hidden_state
    flat_labels = choice_labels.reshape(n_rows * n_choices, length)
    out = model(task_ids=task_ids,
                encoder_outputs=BaseModelOutput(last_hidden_state=encoder_states.repeat_interleave(n_choices, dim=0)),
                attention_mask=attention_mask.repeat_interleave(n_choices, dim=0),
                labels=flat_labels)
    logprobs = F.log_softmax(out.logits.float(), dim=-1)
    mask = flat_labels != IGNORE_INDEX
    token_logprobs = logprobs.gather(-1, flat_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    return token_logprobs.reshape(n_rows, n_choices, length)


def choice_scores(token_logprobs: torch.Tensor, choice_labels: torch.Tensor, length_norm: float) -> torch.Tensor:
    """score = summed token NLL / length^length_norm, [B, C]; empty choice slots score +inf."""
    lengths = (choice_labels != IGNORE_INDEX).sum(-1)
    nll = -token_logprobs.sum(-1)
    scores = nll / lengths.clamp(min=1).to(nll.dtype).pow(length_norm)
    return scores.masked_fill(lengths == 0, float("inf"))


@torch.no_grad()
def rank_classification(model, tokenizer, rows: Sequence[dict], task_id: int, *, length_norm: float,
                        max_input_length: int, max_output_length: int, batch_size: int,
                        precision: str = "32") -> dict:
    """Accuracy of argmin-score choices over `rows`, plus the per-row predictions; computed on the
    model's device under `precision`'s autocast (log-probabilities summed in fp32)."""
    policy = for_model(model, precision)
    was_training = model.training
    model.eval()
    predictions = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = policy.to_device(encode_choice_batch(tokenizer, chunk, max_input_length, max_output_length))
        task_ids = torch.full((len(chunk),), task_id, dtype=torch.long, device=policy.device)
        with policy.autocast():
            logprobs = choice_token_logprobs(model, task_ids, batch["input_ids"], batch["attention_mask"],
                                             batch["choice_labels"])
        predictions += choice_scores(logprobs, batch["choice_labels"], length_norm).argmin(-1).tolist()
    model.train(was_training)
    correct = [int(p == int(r["label"])) for p, r in zip(predictions, rows)]
    return {"accuracy": 100.0 * sum(correct) / max(len(rows), 1), "predictions": predictions}


# --------------------------------------------------------------------------------- generation
@torch.no_grad()
def generate(model, tokenizer, rows: Sequence[dict], task_id: int, *, num_beams: int,
             max_input_length: int, max_output_length: int, batch_size: int, precision: str = "32") -> list[str]:
    """Beam-search outputs for `rows`, decoded without special tokens and stripped; computed on the
    model's device under `precision`'s autocast."""
    policy = for_model(model, precision)
    was_training = model.training
    model.eval()
    outputs = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = policy.to_device(encode_sources(tokenizer, chunk, max_input_length))
        task_ids = torch.full((len(chunk),), task_id, dtype=torch.long, device=policy.device)
        with policy.autocast():
            generated = model.generate(task_ids=task_ids, **batch, num_beams=num_beams,
                                       max_new_tokens=max_output_length, early_stopping=False)
        outputs += [t.strip() for t in tokenizer.batch_decode(generated, skip_special_tokens=True)]
    model.train(was_training)
    return outputs


def evaluate_rows(model, tokenizer, rows: Sequence[dict], task_id: int, metric: str, cfg) -> dict:
    """Score `rows` with the task's metric: {'metric': key, 'value': float, …extra metrics}."""
    common = dict(max_input_length=cfg.max_input_length, max_output_length=cfg.max_output_length,
                  batch_size=cfg.predict_batch_size, precision=cfg.precision)
    if metric == "accuracy":
        out = rank_classification(model, tokenizer, rows, task_id, length_norm=cfg.length_norm, **common)
        return {"metric": "accuracy", "value": out["accuracy"], "accuracy": out["accuracy"]}
    predictions = generate(model, tokenizer, rows, task_id, num_beams=cfg.num_beams, **common)
    scores = generation_metrics(predictions, [row_references(r) for r in rows])
    key = METRIC_KEYS[metric]
    return {"metric": key, "value": scores[key], **scores, "predictions": predictions}

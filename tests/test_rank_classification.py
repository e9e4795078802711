"""Rank classification (encoder once, all choices in one batch) against one full forward per choice."""

from __future__ import annotations

import pytest
import torch

from mttl.adapters import AdapterConfig, modify_model, selectors
from mttl.evaluation.predict import choice_scores, choice_token_logprobs, encode_choice_batch, rank_classification
from mttl.models.backbone import load_backbone
from mttl.models.routed import RoutedModel
from mttl.models.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROWS = [
    {"source": "premise: the cat sat. hypothesis: a cat sat.", "answer_choices": ["yes", "no", "maybe"], "label": 0},
    {"source": "is the sky green?", "answer_choices": ["no", "yes, it is green today"], "label": 1},
    {"source": "pick one", "answer_choices": ["alpha", "beta", "a much longer gamma choice"], "label": 2},
    {"source": "x", "answer_choices": ["true", "false"], "label": 1},
]
TASK_IDS = [0, 1, 1, 0]


@pytest.fixture(scope="module")
def routed_model():
    tokenizer = load_tokenizer("byte")
    hf = load_backbone("tiny-t5", vocab_size=len(tokenizer), tiny_d_model=64, tiny_num_layers=2, seed=3)
    torch.manual_seed(0)
    # random B so the adapters (and thus the task ids) change the scores
    acfg = AdapterConfig(modifier="poly", rank=2, n_skills=4, n_splits=2, n_tasks=2, randb_init=True)
    model = RoutedModel(modify_model(hf, acfg)).eval()
    with torch.no_grad():  # distinct routing per task (fresh logits are all near zero)
        for selector in selectors(model).values():
            selector.module_logits.normal_(0, 3)
    return model, tokenizer


def _scores_one_forward_per_choice(model, tokenizer, rows, task_ids, length_norm):
    """Independent path: each (input, choice) pair through the whole model, summed token NLL."""
    all_scores = []
    for row, task_id in zip(rows, task_ids):
        enc = tokenizer([row["source"]], return_tensors="pt")
        scores = []
        for choice in row["answer_choices"]:
            labels = tokenizer([choice], return_tensors="pt")["input_ids"]
            with torch.no_grad():
                logits = model(task_ids=torch.tensor([task_id]), input_ids=enc["input_ids"],
                               attention_mask=enc["attention_mask"], labels=labels).logits
            logprobs = torch.log_softmax(logits[0], dim=-1)
            nll = -sum(float(logprobs[t, labels[0, t]]) for t in range(labels.shape[1]))
            scores.append(nll / labels.shape[1] ** length_norm)
        all_scores.append(scores)
    return all_scores


@pytest.mark.parametrize("length_norm", [0.0, 1.0])
def test_batched_choice_scores_equal_independent_loop(routed_model, length_norm):
    model, tokenizer = routed_model
    batch = encode_choice_batch(tokenizer, ROWS, max_input_length=64, max_output_length=32)
    with torch.no_grad():
        logprobs = choice_token_logprobs(model, torch.tensor(TASK_IDS), batch["input_ids"], batch["attention_mask"],
                                         batch["choice_labels"])
    got = choice_scores(logprobs, batch["choice_labels"], length_norm)
    want = _scores_one_forward_per_choice(model, tokenizer, ROWS, TASK_IDS, length_norm)
    for i, scores in enumerate(want):
        assert got[i, :len(scores)].tolist() == pytest.approx(scores, rel=1e-4, abs=1e-4)
        assert torch.isinf(got[i, len(scores):]).all()  # padded choice slots never win


def test_task_ids_change_the_scores(routed_model):
    model, tokenizer = routed_model
    batch = encode_choice_batch(tokenizer, ROWS, max_input_length=64, max_output_length=32)
    with torch.no_grad():
        a = choice_token_logprobs(model, torch.tensor([0, 0, 0, 0]), batch["input_ids"], batch["attention_mask"],
                                  batch["choice_labels"])
        b = choice_token_logprobs(model, torch.tensor([1, 1, 1, 1]), batch["input_ids"], batch["attention_mask"],
                                  batch["choice_labels"])
    assert not torch.allclose(a, b)


def test_accuracy_is_argmin_of_independent_scores(routed_model):
    model, tokenizer = routed_model
    want = _scores_one_forward_per_choice(model, tokenizer, ROWS, [1] * len(ROWS), 1.0)
    expected = [min(range(len(s)), key=s.__getitem__) for s in want]
    out = rank_classification(model, tokenizer, ROWS, 1, length_norm=1.0, max_input_length=64,
                              max_output_length=32, batch_size=3)
    assert out["predictions"] == expected
    assert out["accuracy"] == pytest.approx(100 * sum(p == r["label"] for p, r in zip(expected, ROWS)) / len(ROWS))

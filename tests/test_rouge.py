"""Rouge-L and exact match as the official NI scorer computes them, checked against rouge-score."""

from __future__ import annotations

import string

import pytest
from rouge_score import rouge_scorer

from mttl.evaluation.metrics import exact_match, generation_metrics, grouped_generation_metrics, normalize_answer
from mttl.run_folder import aggregate

PREDICTIONS = ["The cats are running quickly.", "positive", "An apple a day", "completely unrelated words"]
REFERENCES = [["the cat runs quick", "dogs were running"], ["Positive!"], ["an apple every day keeps"], ["nothing"]]


def test_rouge_l_is_rouge_score_with_stemming_max_over_references():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    want = []
    for pred, refs in zip(PREDICTIONS, REFERENCES):
        want.append(max(scorer.score(ref, pred)["rougeL"].fmeasure for ref in refs))
    got = generation_metrics(PREDICTIONS, REFERENCES)
    assert got["rougeL"] == pytest.approx(100 * sum(want) / len(want))
    # stemming matters: "running"/"runs" and "cats"/"cat" share stems
    unstemmed = rouge_scorer.RougeScorer(["rougeL"]).score("the cat runs quick", PREDICTIONS[0])["rougeL"].fmeasure
    assert want[0] > unstemmed


def official_ni_normalize(s: str) -> str:
    """natural-instructions eval/automatic/compute_metrics.py, as written there: "adapted from
    Squad v1.1 evaluation, without removing the articles" (lower, punctuation, whitespace)."""
    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_punc(s.lower()))


@pytest.mark.parametrize("text,normalized", [
    ("The  Answer, is: A cat!", "the answer is a cat"),
    ("an Apple", "an apple"),
    ("  yes.  ", "yes"),
    ("theatre", "theatre"),
])
def test_ni_answer_normalisation(text, normalized):
    assert normalize_answer(text) == normalized == official_ni_normalize(text)


def test_exact_match_after_normalisation_max_over_references():
    assert exact_match("Positive", "positive!") == 1.0
    assert exact_match("The positive", "positive") == 0.0  # the official NI scorer keeps articles
    assert exact_match("positives", "positive") == 0.0
    got = generation_metrics(PREDICTIONS, REFERENCES)
    assert got["exact_match"] == pytest.approx(100 * 1 / 4)  # only "positive" matches
    # articles decide: SQuAD's normaliser would count "a cat" == "the cat" == "cat", NI's does not
    preds, refs = ["a cat", "The Cat.", "cat"], [["the cat"], ["the cat"], ["A cat"]]
    want = sum(official_ni_normalize(p) == official_ni_normalize(r[0]) for p, r in zip(preds, refs)) / 3
    assert want == pytest.approx(1 / 3)
    assert generation_metrics(preds, refs)["exact_match"] == pytest.approx(100 * want)


def test_grouped_metrics_per_category():
    groups = ["a", "b", "a", "b"]
    got = grouped_generation_metrics(PREDICTIONS, REFERENCES, groups)
    assert set(got) == {"a", "b"}
    assert got["b"]["exact_match"] == pytest.approx(50.0)
    assert got["a"] == generation_metrics([PREDICTIONS[0], PREDICTIONS[2]], [REFERENCES[0], REFERENCES[2]])


def test_aggregate_median_over_seeds_then_mean_over_tasks():
    rows = [{"task": "cb", "seed": s, "evaluation": "best_val", "value": v}
            for s, v in [(0, 50.0), (1, 70.0), (2, 60.0)]]
    rows += [{"task": "rte", "seed": s, "evaluation": "best_val", "value": v}
             for s, v in [(0, 40.0), (1, 10.0), (2, 90.0)]]
    rows += [{"task": "rte", "seed": 0, "evaluation": "test", "value": 0.0}]
    out = aggregate(rows)
    assert out["per_task"] == {"cb": 60.0, "rte": 40.0}
    assert out["mean"] == pytest.approx(50.0)

"""Rouge-L and exact match as the official NI scorer computes them, checked against rouge-score."""

from __future__ import annotations

import pytest
from rouge_score import rouge_scorer

from mttl.evaluation.metrics import (aggregate, exact_match, generation_metrics, grouped_generation_metrics,
                                     normalize_answer)

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


@pytest.mark.parametrize("text,normalized", [
    ("The  Answer, is: A cat!", "answer is cat"),
    ("an Apple", "apple"),
    ("  yes.  ", "yes"),
    ("theatre", "theatre"),  # articles only as whole words
])
def test_ni_answer_normalisation(text, normalized):
    assert normalize_answer(text) == normalized


def test_exact_match_after_normalisation_max_over_references():
    assert exact_match("Positive", "positive!") == 1.0
    assert exact_match("The positive", "positive") == 1.0
    assert exact_match("positives", "positive") == 0.0
    got = generation_metrics(PREDICTIONS, REFERENCES)
    assert got["exact_match"] == pytest.approx(100 * 1 / 4)  # only "positive" matches


def test_grouped_metrics_per_category():
    groups = ["a", "b", "a", "b"]
    got = grouped_generation_metrics(PREDICTIONS, REFERENCES, groups)
    assert set(got) == {"a", "b"}
    assert got["b"]["exact_match"] == pytest.approx(50.0)
    assert got["a"] == generation_metrics([PREDICTIONS[0], PREDICTIONS[2]], [REFERENCES[0], REFERENCES[2]])


def test_aggregate_median_over_seeds_then_mean_over_tasks():
    rows = [{"task": "cb", "seed": s, "evaluation": "best_val", "value": v} for s, v in [(0, 50.0), (1, 70.0), (2, 60.0)]]
    rows += [{"task": "rte", "seed": s, "evaluation": "best_val", "value": v} for s, v in [(0, 40.0), (1, 10.0), (2, 90.0)]]
    rows += [{"task": "rte", "seed": 0, "evaluation": "test", "value": 0.0}]
    out = aggregate(rows)
    assert out["per_task"] == {"cb": 60.0, "rte": 40.0}
    assert out["mean"] == pytest.approx(50.0)

"""Scores of predictions, no model: what each task is scored by (`task_metric`), Rouge-L and exact match.

- multiple choice: accuracy of the rank-classified choice (computed by `mttl.evaluation.predict`).
- generation (Super-NaturalInstructions): Rouge-L (rouge-score, Porter stemming) and exact match after
  NI's answer normalisation (articles kept), each the max over a row's references, ×100, as the
  official NI scorer computes them; per task and category.
- aggregation over seeds and tasks: `mttl.run_folder.aggregate`.
"""

from __future__ import annotations

import string
from collections import defaultdict
from typing import Sequence

from rouge_score import rouge_scorer

def is_multiple_choice(row: dict) -> bool:
    return bool(row.get("answer_choices")) and int(row.get("label", -1)) >= 0


def normalize_answer(text: str) -> str:
    """NI's normalisation for exact match: lower case, no punctuation, single spaces.

    The official NI scorer adapts SQuAD's normaliser "without removing the articles": "the cat"
    and "cat" differ (SQuAD would count them equal)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    return " ".join(text.split())


_ROUGE_L = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    return _ROUGE_L.score(target=reference, prediction=prediction)["rougeL"].fmeasure


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def generation_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """{'rougeL', 'exact_match'}: per row the max over its references, mean over rows, ×100."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
    n = max(len(predictions), 1)
    rouge = sum(max(rouge_l(p, r) for r in refs) for p, refs in zip(predictions, references))
    em = sum(max(exact_match(p, r) for r in refs) for p, refs in zip(predictions, references))
    return {"rougeL": 100.0 * rouge / n, "exact_match": 100.0 * em / n}


def grouped_generation_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]],
                               groups: Sequence[str]) -> dict[str, dict]:
    """`generation_metrics` per group (task name or category), like NI's grouped scores."""
    members = defaultdict(list)
    for i, group in enumerate(groups):
        members[group].append(i)
    return {group: generation_metrics([predictions[i] for i in idx], [references[i] for i in idx])
            for group, idx in sorted(members.items())}


def row_references(row: dict) -> list[str]:
    return list(row.get("references") or [row["target"]])


METRIC_KEYS = {"accuracy": "accuracy", "rouge": "rougeL", "exact_match": "exact_match"}
SCORE_KEYS = ("accuracy", "rougeL", "exact_match")  # every score a result row carries besides `value`


def task_metric(rows: Sequence[dict], declared: str | None = None) -> str:
    """The manifest's metric for the task, else accuracy for multiple choice and rouge otherwise."""
    if declared:
        return declared
    return "accuracy" if rows and all(is_multiple_choice(r) for r in rows) else "rouge"

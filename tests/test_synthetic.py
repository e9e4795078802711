"""The synthetic skills suite: correct targets, the held-out/dedupe/position properties, determinism.

Skill functions are written out again here as explicit loops so the generated targets are checked
against an independent implementation, not against the module's own functions.
"""

from __future__ import annotations

import argparse
import random
import re
from collections import defaultdict

import pytest

from mttl.data import shards
from mttl.data.synthetic import add_cli_arguments, prepare_from_args, prepare_synthetic
from mttl.errors import DataError

LOWER = "abcdefghijklmnopqrstuvwxyz"
UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _reverse(s):
    out = ""
    for ch in s:
        out = ch + out
    return out


def _upper(s):
    return "".join(UPPER[LOWER.index(ch)] if ch in LOWER else ch for ch in s)


def _rotate(s):
    return s[1:] + s[0] if s else s


def _novowel(s):
    return "".join(ch for ch in s if ch.lower() not in "aeiou")


def _double(s):
    out = []
    for ch in s:
        out += [ch, ch]
    return "".join(out)


def _swapfirst(s):
    if not s:
        return s
    first = s[0]
    first = UPPER[LOWER.index(first)] if first in LOWER else LOWER[UPPER.index(first)]
    return first + s[1:]


def _caesar(s):
    out = ""
    for ch in s:
        alphabet = LOWER if ch in LOWER else UPPER
        out += alphabet[(alphabet.index(ch) + 1) % 26]
    return out


SKILLS = {"reverse": _reverse, "upper": _upper, "rotate": _rotate, "novowel": _novowel,
          "double": _double, "swapfirst": _swapfirst, "caesar": _caesar}


def _apply(skills, s):
    for name in skills:
        s = SKILLS[name](s)
    return s


def _probe_words(n=400, seed=12345):
    rng = random.Random(seed)
    words = []
    while len(words) < n:
        w = "".join(rng.choice(LOWER) for _ in range(rng.randint(4, 8)))
        if sum(ch not in "aeiou" for ch in w) >= 2:
            words.append(w)
    return words


SMALL = dict(rows_per_task=40, warmup_rows_per_task=40, validation_rows=10, heldout_pool=20,
             heldout_validation=10, heldout_test=20)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic") / "suite"
    manifest = prepare_synthetic(out, seed=0)  # the default sizes
    return out, manifest


def test_default_build_checks_clean(suite):
    out, manifest = suite
    assert shards.check(out) == []
    roles = defaultdict(int)
    for meta in manifest["tasks"].values():
        roles[meta["role"]] += 1
        assert meta["metric"] == "exact_match"
    assert roles["warmup"] == 1 + len(SKILLS)  # copy + one per primitive
    assert roles["test"] == 6 and roles["train"] >= 15


def test_targets_match_independent_skills_and_splits(suite):
    out, manifest = suite
    table = shards.read_rows(out).to_pylist()
    inputs = defaultdict(lambda: defaultdict(set))
    for row in table:
        meta = manifest["tasks"][row["task_name"]]
        if meta["role"] == "warmup":
            tag, word = row["source"].split(": ")
            assert tag == row["task_name"].split("/")[1]
            assert row["target"] == (word if tag == "copy" else SKILLS[tag](word))
        else:
            word = row["source"]
            # no task information in a composition's text: only the bare input string
            assert re.fullmatch(r"[a-z]{4,8}", word), row["source"]
            assert row["target"] == _apply(meta["skills"], word)
        assert row["references"] == [row["target"]] and row["label"] == -1 and row["answer_choices"] is None
        inputs[row["task_name"]][row["split"]].add(row["source"])
    for name, meta in manifest["tasks"].items():
        expected = {"warmup": {"train": 2000, "validation": 100}, "train": {"train": 1000, "validation": 100},
                    "test": {"train": 200, "validation": 100, "test": 200}}[meta["role"]]
        assert meta["rows"] == expected, name
        splits = inputs[name]
        for a in splits:
            for b in splits:
                if a < b:
                    assert not splits[a] & splits[b], f"{name}: {a} and {b} share inputs"


def test_heldout_agreement_below_ten_percent(suite):
    _, manifest = suite
    probes = _probe_words()
    train = {n: m["skills"] for n, m in manifest["tasks"].items() if m["role"] == "train"}
    references = {"copy": []} | {name: [name] for name in SKILLS}
    for name, meta in manifest["tasks"].items():
        if meta["role"] != "test":
            continue
        assert meta["nearest_agreement"] < 0.1
        held = [_apply(meta["skills"], p) for p in probes]
        for other, skills in (train | references).items():
            agree = sum(h == _apply(skills, p) for h, p in zip(held, probes)) / len(probes)
            assert agree < 0.1, f"held-out {name} agrees with {other} on {agree:.0%} of probes"


def test_every_skill_in_both_positions_among_training_compositions(suite):
    _, manifest = suite
    train = [m["skills"] for m in manifest["tasks"].values() if m["role"] == "train"]
    assert {s[0] for s in train} == set(SKILLS) == {s[1] for s in train}
    assert all(len(s) == 2 and s[0] != s[1] for s in train)


def test_kept_compositions_are_distinct_functions(suite):
    _, manifest = suite
    probes = _probe_words()
    functions = {n: tuple(_apply(m["skills"], p) for p in probes)
                 for n, m in manifest["tasks"].items() if m["role"] != "warmup"}
    primitives = {tuple(_apply([s], p) for p in probes) for s in SKILLS} | {tuple(probes)}
    assert len(set(functions.values())) == len(functions), "two kept compositions compute the same function"
    assert not set(functions.values()) & primitives, "a kept composition equals a primitive or copy"
    # and the dedupe is not over-eager: every distinct ordered pair's function is represented
    all_pairs = {tuple(_apply([a, b], p) for p in probes) for a in SKILLS for b in SKILLS if a != b}
    assert all_pairs - primitives == set(functions.values())


def test_deterministic_per_seed(tmp_path):
    first = prepare_synthetic(tmp_path / "a", seed=3, **SMALL)
    again = prepare_synthetic(tmp_path / "b", seed=3, **SMALL)
    prepare_synthetic(tmp_path / "c", seed=4, **SMALL)
    assert first["tasks"] == again["tasks"]
    assert shards.read_rows(tmp_path / "a").to_pylist() == shards.read_rows(tmp_path / "b").to_pylist()
    assert shards.read_rows(tmp_path / "a").to_pylist() != shards.read_rows(tmp_path / "c").to_pylist()
    # re-running the same command on the same folder is a no-op
    assert prepare_synthetic(tmp_path / "a", seed=3, **SMALL).get("unchanged") is True


def test_cli_arguments_and_impossible_request(tmp_path):
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "s"), "--seed", "1", "--n-heldout", "3",
                              "--rows-per-task", "5", "--warmup-rows-per-task", "5", "--validation-rows", "2",
                              "--heldout-pool", "4", "--heldout-validation", "2", "--heldout-test", "3"])
    manifest = prepare_from_args(args)
    assert sum(m["role"] == "test" for m in manifest["tasks"].values()) == 3
    with pytest.raises(DataError, match="--n-heldout"):
        prepare_synthetic(tmp_path / "too_many", n_heldout=40, **SMALL)
    assert not (tmp_path / "too_many").exists()

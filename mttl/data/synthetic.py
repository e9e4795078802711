"""The built-in synthetic skills suite: string skills and their two-step compositions.

No pretrained backbone can be downloaded everywhere, so the default task collection has to teach
a tiny T5 from scratch and still reward reusing skills. This module owns that collection:

- inputs are random lowercase strings of 4–8 letters;
- primitive skills are simple string functions a tiny model learns reliably (sorting is left out:
  a 0.7 M-parameter T5 does not learn it within the default budget);
- **warm-up** tasks (copy and each primitive) carry a tag in the text (`reverse: abcd`) and train
  the backbone itself;
- **composition** tasks apply two different primitives in order and carry no task information in
  the text (the source is the bare string): only the task id tells the router which task it is.

Compositions computing the same function (`upper>caesar` = `caesar>upper`) are deduplicated by
their outputs on a fixed probe set, and compositions that equal a primitive are dropped. Held-out
compositions are drawn among functions whose nearest training composition or primitive agrees
on fewer than `max_heldout_agreement` of the probes (the agreement is stored in the manifest),
while every primitive keeps appearing in both positions among the training compositions.
Everything is drawn from `random.Random(seed)`: the same seed gives the same suite.
"""

from __future__ import annotations

import argparse
import random
import string
from dataclasses import dataclass
from itertools import permutations
from pathlib import Path
from typing import Callable, Iterator

from mttl.data import shards
from mttl.errors import DataError

SOURCE_HELP = "built-in synthetic string-skill suite (warm-up tasks, compositions, held-out compositions)"

# Bump when the generated rows change for the same arguments, so old prepared folders are rebuilt.
GENERATOR_VERSION = 1
PROBE_SEED = "mttl-synthetic-probes"
N_PROBES = 256
MIN_LENGTH, MAX_LENGTH = 4, 8
VOWELS = set("aeiouAEIOU")


def _caesar(text: str) -> str:
    def shift(ch: str) -> str:
        base = ord("a") if ch.islower() else ord("A")
        return chr(base + (ord(ch) - base + 1) % 26)
    return "".join(shift(ch) for ch in text)


PRIMITIVES: dict[str, Callable[[str], str]] = {
    "reverse": lambda s: s[::-1],
    "upper": str.upper,
    "rotate": lambda s: s[1:] + s[:1],
    "novowel": lambda s: "".join(ch for ch in s if ch not in VOWELS),
    "double": lambda s: "".join(ch + ch for ch in s),
    "swapfirst": lambda s: s[:1].swapcase() + s[1:],
    "caesar": _caesar,
}
COPY = "copy"


@dataclass(frozen=True)
class Composition:
    """`first` applied, then `second`; the task name is `first>second`."""
    first: str
    second: str

    @property
    def name(self) -> str:
        return f"{self.first}>{self.second}"

    def __call__(self, text: str) -> str:
        return PRIMITIVES[self.second](PRIMITIVES[self.first](text))


def random_word(rng: random.Random) -> str:
    """A lowercase string of MIN_LENGTH..MAX_LENGTH letters with at least two consonants.

    Two consonants keep `novowel` (and its compositions) from producing an empty or one-letter
    target.
    """
    while True:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(MIN_LENGTH, MAX_LENGTH)))
        if sum(ch not in VOWELS for ch in word) >= 2:
            return word


def probe_inputs() -> list[str]:
    """The fixed probe set (independent of the suite's seed) on which functions are compared."""
    rng = random.Random(PROBE_SEED)
    return [random_word(rng) for _ in range(N_PROBES)]


def _outputs(fn: Callable[[str], str], probes: list[str]) -> tuple[str, ...]:
    return tuple(fn(p) for p in probes)


def _agreement(a: tuple[str, ...], b: tuple[str, ...]) -> float:
    """Fraction of probe inputs on which two functions' outputs are equal."""
    return sum(x == y for x, y in zip(a, b)) / len(a)


def reference_functions() -> dict[str, Callable[[str], str]]:
    """Copy and the primitives: the warm-up tasks, named by their tag."""
    return {COPY: lambda s: s, **PRIMITIVES}


def distinct_compositions(probes: list[str]) -> list[Composition]:
    """Ordered pairs of different primitives, one per distinct function on the probes.

    Pairs equal to a primitive or to copy on every probe are dropped (they would duplicate a
    warm-up task); among pairs computing the same function the first in name order is kept.
    """
    seen = {_outputs(fn, probes) for fn in reference_functions().values()}
    kept = []
    for first, second in sorted(permutations(PRIMITIVES, 2)):
        comp = Composition(first, second)
        outputs = _outputs(comp, probes)
        if outputs not in seen:
            seen.add(outputs)
            kept.append(comp)
    return kept


class _ProbeTable:
    """Outputs of every candidate function on the probes, computed once."""

    def __init__(self, compositions: list[Composition], probes: list[str]):
        self.references = {name: _outputs(fn, probes) for name, fn in reference_functions().items()}
        self.compositions = {c.name: _outputs(c, probes) for c in compositions}

    def nearest(self, comp: Composition, train: list[Composition]) -> tuple[str, float]:
        """The training composition, primitive or copy agreeing most with `comp` (ties: by name)."""
        target = self.compositions[comp.name]
        candidates = {**self.references, **{c.name: self.compositions[c.name] for c in train}}
        scores = {name: _agreement(target, outputs) for name, outputs in candidates.items()}
        best = min(scores, key=lambda name: (-scores[name], name))
        return best, scores[best]


def _covers_both_positions(train: list[Composition]) -> bool:
    return {c.first for c in train} == set(PRIMITIVES) == {c.second for c in train}


def split_compositions(n_heldout: int, seed: int, max_heldout_agreement: float = 0.1,
                       probes: list[str] | None = None
                       ) -> tuple[list[Composition], dict[str, tuple[Composition, str, float]]]:
    """Training compositions and held-out ones (name → (composition, nearest task, agreement)).

    Candidates are visited in a seeded order; one becomes held-out when, with it removed from the
    training set, it and every held-out composition so far stay below `max_heldout_agreement`
    with their nearest training composition or primitive, and the training set still has every
    primitive in both positions.
    """
    probes = probes or probe_inputs()
    pool = distinct_compositions(probes)
    table = _ProbeTable(pool, probes)
    order = list(pool)
    random.Random(seed).shuffle(order)
    heldout: list[Composition] = []
    for candidate in order:
        if len(heldout) == n_heldout:
            break
        trial = heldout + [candidate]
        train = [c for c in pool if c not in trial]
        if not _covers_both_positions(train):
            continue
        if all(table.nearest(h, train)[1] < max_heldout_agreement for h in trial):
            heldout = trial
    if len(heldout) < n_heldout:
        raise DataError(f"only {len(heldout)} held-out compositions satisfy agreement < {max_heldout_agreement} "
                        f"with every skill kept in both positions; use --n-heldout {len(heldout)} or less")
    train = [c for c in pool if c not in heldout]
    heldout_info = {}
    for comp in sorted(heldout, key=lambda c: c.name):
        near, agree = table.nearest(comp, train)
        heldout_info[comp.name] = (comp, near, agree)
    return train, heldout_info


def _distinct_words(rng: random.Random, n: int) -> list[str]:
    """n different words, so a task's validation/test inputs never occur in its training rows."""
    words: dict[str, None] = {}
    while len(words) < n:
        words[random_word(rng)] = None
    return list(words)


def _task_rows(name: str, fn: Callable[[str], str], splits: dict[str, int], rng: random.Random,
               tag: str | None) -> Iterator[dict]:
    words = iter(_distinct_words(rng, sum(splits.values())))
    for split, count in splits.items():
        for index in range(count):
            word = next(words)
            target = fn(word)
            yield {"task_name": name, "split": split, "source": f"{tag}: {word}" if tag else word,
                   "target": target, "references": [target], "answer_choices": None, "label": -1,
                   "instance_id": f"{name}/{split}/{index}"}


def prepare_synthetic(out: str | Path, *, seed: int = 0, n_heldout: int = 6, rows_per_task: int = 1000,
                      warmup_rows_per_task: int = 2000, validation_rows: int = 100, heldout_pool: int = 200,
                      heldout_validation: int = 100, heldout_test: int = 200,
                      max_heldout_agreement: float = 0.1) -> dict:
    """Generate the suite into `out` (Parquet shards + manifest) and return the manifest.

    Splits: warm-up and training compositions `train` + `validation`; held-out compositions
    `train` (the pool k-shot sets are drawn from), `validation` and `test`. Every task's metric is
    `exact_match`. Task meta records `skills` (primitives in application order) and, for held-out
    tasks, `nearest_task` and `nearest_agreement` on the probe set.
    """
    sizes = {"rows_per_task": rows_per_task, "warmup_rows_per_task": warmup_rows_per_task,
             "validation_rows": validation_rows, "heldout_pool": heldout_pool,
             "heldout_validation": heldout_validation, "heldout_test": heldout_test}
    negative = [k for k, v in sizes.items() if v < 0] + (["n_heldout"] if n_heldout < 0 else [])
    if negative:
        raise DataError(f"synthetic suite: {', '.join(negative)} must be >= 0")
    args = {"seed": seed, "n_heldout": n_heldout, "max_heldout_agreement": max_heldout_agreement,
            "generator_version": GENERATOR_VERSION, **sizes}
    fingerprint = shards.fingerprint_sources([], args)
    unchanged = shards.unchanged_manifest(out, fingerprint)
    if unchanged is not None:
        return unchanged
    probes = probe_inputs()
    train, heldout = split_compositions(n_heldout, seed, max_heldout_agreement, probes)

    tasks: dict[str, dict] = {}
    plan: list[tuple[str, Callable[[str], str], dict[str, int], str | None]] = []
    for name, fn in reference_functions().items():
        tasks[f"warmup/{name}"] = {"role": "warmup", "metric": "exact_match", "kind": "warmup",
                                   "skills": [] if name == COPY else [name]}
        plan.append((f"warmup/{name}", fn, {"train": warmup_rows_per_task, "validation": validation_rows}, name))
    for comp in train:
        tasks[comp.name] = {"role": "train", "metric": "exact_match", "kind": "composition",
                            "skills": [comp.first, comp.second]}
        plan.append((comp.name, comp, {"train": rows_per_task, "validation": validation_rows}, None))
    for name, (comp, near, agree) in heldout.items():
        tasks[name] = {"role": "test", "metric": "exact_match", "kind": "composition",
                       "skills": [comp.first, comp.second], "nearest_task": near,
                       "nearest_agreement": round(agree, 4)}
        plan.append((name, comp, {"train": heldout_pool, "validation": heldout_validation,
                                  "test": heldout_test}, None))

    def rows() -> Iterator[dict]:
        for name, fn, splits, tag in plan:
            # One generator per task, seeded from (seed, task): a task's rows do not depend on
            # which other tasks exist.
            yield from _task_rows(name, fn, splits, random.Random(f"{seed}/{name}"), tag)

    return shards.write_prepared(out, rows(), tasks, source="synthetic", args=args,
                                 fingerprint=fingerprint)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder. Example: --out data/shards/synthetic")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the held-out choice and of every row. Example: --seed 1")
    parser.add_argument("--n-heldout", type=int, default=6, help="held-out compositions. Example: --n-heldout 4")
    parser.add_argument("--rows-per-task", type=int, default=1000,
                        help="training rows per training composition. Example: --rows-per-task 500")
    parser.add_argument("--warmup-rows-per-task", type=int, default=2000,
                        help="training rows per warm-up task (copy and each primitive). "
                             "Example: --warmup-rows-per-task 1000")
    parser.add_argument("--validation-rows", type=int, default=100,
                        help="validation rows per warm-up and training task. Example: --validation-rows 50")
    parser.add_argument("--heldout-pool", type=int, default=200,
                        help="rows per held-out task from which k-shot training sets are drawn. "
                             "Example: --heldout-pool 100")
    parser.add_argument("--heldout-validation", type=int, default=100,
                        help="validation rows per held-out task. Example: --heldout-validation 50")
    parser.add_argument("--heldout-test", type=int, default=200,
                        help="test rows per held-out task. Example: --heldout-test 500")
    parser.add_argument("--max-heldout-agreement", type=float, default=0.1,
                        help="a held-out composition agrees with its nearest training task or primitive on fewer than "
                             "this fraction of probes. Example: --max-heldout-agreement 0.05")


def prepare_from_args(args: argparse.Namespace) -> dict:
    return prepare_synthetic(args.out, seed=args.seed, n_heldout=args.n_heldout, rows_per_task=args.rows_per_task,
                             warmup_rows_per_task=args.warmup_rows_per_task, validation_rows=args.validation_rows,
                             heldout_pool=args.heldout_pool, heldout_validation=args.heldout_validation,
                             heldout_test=args.heldout_test, max_heldout_agreement=args.max_heldout_agreement)

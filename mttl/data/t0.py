"""T0 / P3: held-out evaluation tasks, their T-Few few-shot files, and the training mixture.

Reads a folder laid out like `../shared/data/t0` (every part optional) and writes Parquet shards:

- `heldout_eval/<dataset>/<split>.jsonl[.gz]`: the held-out tasks' evaluation rows (Hugging Face
  field names), rendered with each of the dataset's original-task templates (COPA: the first 8,
  as the reference) → split `test` (the T-Few protocol evaluates on the validation set: val == test);
- `heldout_fewshot/<task>/<k>_shot/<seed>_seed.jsonl[.gz]`: T-Few few-shot training files →
  splits `fewshot_k<k>_seed<seed>`, rendered the same way;
- `train_mixture/*.jsonl[.gz]`: already-rendered P3 rows (`template`, `source`, `target`) →
  training tasks, split `train` plus a small `validation`;
- `<dataset>/train.jsonl[.gz]` (any other folder): a raw training dataset rendered with all of its
  templates; the folder name is the templates' `dataset[_subset]` (e.g. `glue_mrpc`).
- StoryCloze is read from the official CSV files in `storycloze_dir` when given, else reported
  absent in the manifest's `skipped`.

Every held-out row is one (instance, template) pair with its rendered `answer_choices` and the
gold `label` from the dataset (WinoGrande: `answer` − 1; StoryCloze: `answer_right_ending` − 1);
a rendering whose target is not `answer_choices[label]`, or whose input or target is empty, is
skipped and counted per template. Training tasks are datasets, or (dataset, template) pairs named
`<dataset>/<template>` with `use_t0_templates_as_tasks`.

The training mixture is the reference's (T0MixtureReader): every template of a dataset gets the
same first `min(train size, examples_per_dataset // templates)` rows of the dataset (500,000 per
dataset, not per template), and the P3 tasks of `TASK_BLACKLIST` are left out.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import gzip
import itertools
import json
import os
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from mttl.data import shards
from mttl.data.promptsource import DatasetTemplates, Renderer, Template, find_template_files, load_templates
from mttl.errors import DataError

SOURCE_HELP = ("T0/P3 from a folder like ../shared/data/t0 (held-out eval, T-Few few-shot files, training mixture) "
               "with promptsource templates")

HELDOUT_EVAL = "heldout_eval"
HELDOUT_FEWSHOT = "heldout_fewshot"
TRAIN_MIXTURE = "train_mixture"
# Folders of a source that are not raw training datasets.
RESERVED_FOLDERS = {HELDOUT_EVAL, HELDOUT_FEWSHOT, TRAIN_MIXTURE, "heldout_extra", "promptsource_templates", "LICENSES"}
FEWSHOT_FILE = re.compile(r"(\d+)_shot/(\d+)_seed\.jsonl(\.gz)?$")


def _int_field(name: str, offset: int = 0) -> Callable[[dict], int]:
    def label(row: dict) -> int:
        value = row.get(name)
        return -1 if value in (None, "") else int(value) + offset
    label.__name__ = f"label_from_{name}"
    return label


@dataclass(frozen=True)
class HeldoutTask:
    """A T0 held-out task: where its evaluation rows and templates live and how its label reads."""
    eval_folder: str             # under heldout_eval/
    eval_split: str              # file name (without .jsonl[.gz]) of the evaluation rows
    templates_key: str           # promptsource `dataset[_subset]`
    label: Callable[[dict], int]
    max_templates: int | None = None
    shots: int | None = None     # the reference's k when it differs from the shipped T-Few files' k


HELDOUT_TASKS: dict[str, HeldoutTask] = {
    "cb": HeldoutTask("super_glue_cb", "validation", "super_glue_cb", _int_field("label")),
    "rte": HeldoutTask("super_glue_rte", "validation", "super_glue_rte", _int_field("label")),
    # the reference evaluates COPA with its first 8 original-task templates only
    "copa": HeldoutTask("super_glue_copa", "validation", "super_glue_copa", _int_field("label"), max_templates=8),
    "wic": HeldoutTask("super_glue_wic", "validation", "super_glue_wic", _int_field("label")),
    "wsc": HeldoutTask("super_glue_wsc", "validation", "super_glue_wsc.fixed", _int_field("label")),
    "winogrande": HeldoutTask("winogrande_xl", "validation", "winogrande_winogrande_xl", _int_field("answer", -1)),
    "h-swag": HeldoutTask("hellaswag", "validation", "hellaswag", _int_field("label")),
    # ANLI: T-Few ships 50-shot files; the reference drew 32 from train_r* (not shipped), so 32 of
    # the 50 are drawn per seed (mttl.data.fewshot)
    "anli-r1": HeldoutTask("anli", "test_r1", "anli", _int_field("label"), shots=32),
    "anli-r2": HeldoutTask("anli", "test_r2", "anli", _int_field("label"), shots=32),
    "anli-r3": HeldoutTask("anli", "test_r3", "anli", _int_field("label"), shots=32),
    "storycloze": HeldoutTask("story_cloze_2016", "test", "story_cloze_2016", _int_field("answer_right_ending", -1)),
}
STORYCLOZE = "storycloze"
# Official StoryCloze CSV columns → the Hugging Face `story_cloze/2016` field names templates use.
STORYCLOZE_COLUMNS = {
    "InputStoryid": "story_id", "InputSentence1": "input_sentence_1", "InputSentence2": "input_sentence_2",
    "InputSentence3": "input_sentence_3", "InputSentence4": "input_sentence_4",
    "RandomFifthSentenceQuiz1": "sentence_quiz1", "RandomFifthSentenceQuiz2": "sentence_quiz2",
    "AnswerRightEnding": "answer_right_ending",
}

# The reference's T0 mixture cap (MAX_EXAMPLES_PER_DATASET): rows per dataset, split over its templates.
EXAMPLES_PER_DATASET = 500_000
# The reference's (and T0's) TASK_BLACKLIST, as P3 task names: templates whose inputs often run past
# 1,024 tokens, and one with broken cached files. Their rows never enter the training mixture.
TASK_BLACKLIST = frozenset({
    "hotpot_qa_distractor_Generate_Explanations", "hotpot_qa_fullwiki_Generate_Explanations",
    "hotpot_qa_distractor_Generate_Answer_and_Explanations", "hotpot_qa_fullwiki_Generate_Answer_and_Explanations",
    "hotpot_qa_fullwiki_Generate_Answer", "hotpot_qa_distractor_Generate_Answer",
    "hotpot_qa_distractor_Generate_Title_2", "hotpot_qa_fullwiki_Generate_Title_2",
    "hotpot_qa_fullwiki_Generate_Title_1", "hotpot_qa_distractor_Generate_Title_1",
    "hotpot_qa_distractor_Generate_Question", "hotpot_qa_fullwiki_Generate_Question",
    "tab_fact_tab_fact_tab_fact_3", "tab_fact_tab_fact_tab_fact_2", "tab_fact_tab_fact_tab_fact_1",
    "tab_fact_tab_fact_tab_fact_7", "tab_fact_tab_fact_tab_fact_4", "tab_fact_tab_fact_tab_fact_5",
    "tab_fact_tab_fact_tab_fact_6", "wiki_hop_masked_Choose_Best_Object_Candidate",
    "wiki_hop_masked_Indirect_Question_about_Birthplace_Citizenship_Place_of_Death", "narrativeqa_Template_05",
    "ecthr_cases_alleged_violation_prediction_silver_rationales", "gigaword_summarize_",
})


def p3_task_name(dataset_key: str, template_name: str) -> str:
    """The P3 / T0 task name of a (dataset[_subset], template) pair, as the reference cleans it."""
    return re.sub(r"[^\w\d\._]+", "_", f"{dataset_key}_{template_name}")


def per_template_cap(train_size: int, n_templates: int, examples_per_dataset: int = EXAMPLES_PER_DATASET) -> int:
    """Rows each template of a dataset renders: min(train size, examples_per_dataset // templates)."""
    return min(train_size, examples_per_dataset // max(n_templates, 1))


# Per-row rendering failures caused by the data (a label out of range, a missing list entry) are
# counted as skips, like promptsource's empty outputs; jinja and missing-field errors are not.
_ROW_ERRORS = (ArithmeticError, LookupError, TypeError, ValueError)


def template_slug(name: str) -> str:
    """A template name as P3 writes it in task names: runs of non-word characters → `_`."""
    return re.sub(r"\W+", "_", name)


# ----------------------------------------------------------------------------------- reading


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) for each non-empty line of a .jsonl or .jsonl.gz file."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}: line {number} is not valid JSON ({err.msg}); "
                                    "fix or remove the line") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}: line {number} is not a JSON object")
                yield number, row
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read ({err}); the file is truncated or not (gzipped) JSON lines") from None


def _jsonl_file(folder: Path, stem: str) -> Path | None:
    for suffix in (".jsonl", ".jsonl.gz"):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


def read_storycloze_csv(folder: Path) -> dict[str, tuple[Path, list[dict]]]:
    """The official StoryCloze 2016 files: {'train': validation CSV, 'test': test CSV}, as HF rows.

    As the reference: the 2016 validation set is the pool k-shot sets are drawn from, the 2016
    test set is evaluated.
    """
    found = {}
    for path in sorted(folder.glob("*.csv")):
        lowered = path.name.lower()
        split = "train" if "val" in lowered else "test" if "test" in lowered else None
        if split is None or split in found:
            continue
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = set(STORYCLOZE_COLUMNS) - set(reader.fieldnames or [])
            if missing:
                raise DataError(f"{path}: lacks the StoryCloze columns {sorted(missing)}; "
                                "--storycloze-dir must hold the official 2016 CSV files")
            found[split] = (path, [{STORYCLOZE_COLUMNS[k]: v for k, v in row.items() if k in STORYCLOZE_COLUMNS}
                                   for row in reader])
    if not found:
        raise DataError(f"{folder}: no StoryCloze CSV files (names containing 'val' or 'test'); "
                        "point --storycloze-dir at the official 2016 files")
    return found


# --------------------------------------------------------------------------------- rendering


class _Skips:
    """Per-template counts of rows skipped and why (the manifest's `skipped.rendering`)."""

    def __init__(self):
        self.counts: dict[str, Counter] = defaultdict(Counter)

    def add(self, templates: DatasetTemplates, template: Template, reason: str) -> None:
        self.counts[f"{templates.key}/{template.name}"][reason] += 1

    def as_dict(self) -> dict:
        return {k: dict(sorted(v.items())) for k, v in sorted(self.counts.items())}


def _render_heldout(task: str, spec: HeldoutTask, templates: DatasetTemplates, chosen: list[Template],
                    rows: list[dict], path: Path, split: str, renderer: Renderer, skips: _Skips) -> Iterator[dict]:
    """One output row per (instance, template): choices, gold label from the dataset, checked."""
    for index, row in enumerate(rows):
        gold = spec.label(row)
        for template in chosen:
            key = f"{task}/{split}/{index}/{template.id}"
            try:
                out = renderer.render(template, row, row_key=key, where=templates.path,
                                      origin=f"{path} row {index + 1}")
            except _ROW_ERRORS as err:
                skips.add(templates, template, f"render error ({type(err).__name__})")
                continue
            reason = out.skip_reason
            if reason is None and not out.answer_choices:
                reason = "no answer choices"
            elif reason is None and not 0 <= gold < len(out.answer_choices):
                reason = "no gold label"
            elif reason is None and out.answer_choices[gold] != out.target:
                reason = "target is not answer_choices[label]"
            if reason:
                skips.add(templates, template, reason)
                continue
            yield {"task_name": task, "split": split, "source": out.source, "target": out.target,
                   "references": [out.target], "answer_choices": out.answer_choices, "label": gold,
                   "instance_id": key}


def _template_meta(template: Template) -> dict:
    return {"name": template.name, "id": template.id, "original_task": template.metadata.original_task,
            "choices_in_prompt": template.metadata.choices_in_prompt, "metrics": list(template.metadata.metrics)}


def _training_row(task: str, index: str, source: str, target: str, choices: list[str] | None) -> dict:
    label = choices.index(target) if choices and target in choices else -1
    return {"task_name": task, "source": source, "target": target, "references": [target],
            "answer_choices": choices, "label": label, "instance_id": f"{task}/{index}"}


# ------------------------------------------------------------------------------------ prepare


@dataclass
class _Plan:
    """What a prepare run will write, assembled before any shard is written."""
    tasks: dict
    heldout: list            # (task, spec, templates, chosen, rows, path, split)
    training: dict           # training task → list of rows (without split)
    skipped: dict


def prepare_t0(source: str | Path, templates: str | Path | None = None, out: str | Path | None = None, *,
               use_t0_templates_as_tasks: bool = False, storycloze_dir: str | Path | None = None,
               tasks: list[str] | None = None, seed: int = 42, max_train_per_task: int | None = None,
               validation_per_task: int = 100, examples_per_dataset: int = EXAMPLES_PER_DATASET) -> dict:
    """Prepare the T0 folder `source` into `out`; return the manifest.

    `templates` defaults to `<source>/promptsource_templates`; `tasks` restricts the held-out
    tasks (default: all present); `storycloze_dir` defaults to $STORYCLOZE_DIR. Training tasks
    get `validation` = min(`validation_per_task`, 10 % of the task's rows) rows drawn by `seed`,
    and at most `max_train_per_task` `train` rows. Each training dataset renders its first
    `per_template_cap(rows, templates, examples_per_dataset)` rows with every template.
    """
    if out is None:
        raise DataError("prepare_t0 needs an output folder (--out)")
    source = Path(source)
    templates_dir = Path(templates) if templates else source / "promptsource_templates"
    storycloze_dir = storycloze_dir if storycloze_dir is not None else os.environ.get("STORYCLOZE_DIR") or None
    if not source.is_dir():
        raise DataError(f"--source {source} is not a folder; give a folder laid out like ../shared/data/t0")
    if examples_per_dataset < 1:
        raise DataError(f"--examples-per-dataset must be at least 1, got {examples_per_dataset}")
    if not templates_dir.is_dir():
        raise DataError(f"templates folder {templates_dir} not found; pass --templates DIR (promptsource's templates)")
    unknown = sorted(set(tasks or []) - set(HELDOUT_TASKS))
    if unknown:
        raise DataError(f"unknown T0 held-out task(s) {unknown} in --tasks; known: {', '.join(HELDOUT_TASKS)}")
    args = {"source": str(source), "templates": str(templates_dir),
            "use_t0_templates_as_tasks": use_t0_templates_as_tasks,
            "storycloze_dir": str(storycloze_dir) if storycloze_dir else None, "tasks": tasks, "seed": seed,
            "max_train_per_task": max_train_per_task, "validation_per_task": validation_per_task,
            "examples_per_dataset": examples_per_dataset}
    fingerprint = shards.fingerprint_sources([p for p in (source, templates_dir, storycloze_dir) if p], args)
    unchanged = shards.unchanged_manifest(out, fingerprint)
    if unchanged is not None:
        return unchanged

    renderer = Renderer(seed)
    skips = _Skips()
    template_files = find_template_files(templates_dir)
    plan = _Plan(tasks={}, heldout=[], training={}, skipped={"absent": {}})
    _plan_heldout(plan, source, template_files, renderer, tasks, storycloze_dir)
    _plan_mixture(plan, source, template_files, use_t0_templates_as_tasks, examples_per_dataset)
    _plan_raw_datasets(plan, source, template_files, renderer, skips, use_t0_templates_as_tasks, examples_per_dataset)
    if "blacklisted" in plan.skipped:
        plan.skipped["blacklisted"] = dict(sorted(plan.skipped["blacklisted"].items()))
    if not plan.tasks:
        raise DataError(f"{source}: nothing to prepare (no {HELDOUT_EVAL}/, {HELDOUT_FEWSHOT}/, {TRAIN_MIXTURE}/ "
                        "or dataset folders with train.jsonl[.gz])")

    rendered = [row for task, spec, dataset_templates, chosen, task_rows, path, split in plan.heldout
                for row in _render_heldout(task, spec, dataset_templates, chosen, task_rows, path, split,
                                           renderer, skips)]
    plan.skipped["rendering"] = skips.as_dict()

    def training_rows() -> Iterator[dict]:
        for task, task_rows in sorted(plan.training.items()):
            order = list(task_rows)
            random.Random(f"{seed}/{task}").shuffle(order)
            n_validation = min(validation_per_task, len(order) // 10)
            for row in order[:n_validation]:
                yield {**row, "split": "validation"}
            train = order[n_validation:]
            for row in train[:max_train_per_task] if max_train_per_task is not None else train:
                yield {**row, "split": "train"}

    return shards.write_prepared(out, itertools.chain(rendered, training_rows()), plan.tasks, source="t0",
                                 args=args, skipped=plan.skipped, fingerprint=fingerprint)


def _load_dataset_templates(key: str, template_files: dict[str, Path], renderer: Renderer,
                            wanted_by: str) -> DatasetTemplates:
    if key not in template_files:
        close = difflib.get_close_matches(key, list(template_files), n=3)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise DataError(f"unknown dataset {key!r} for {wanted_by}: no templates.yaml for it in the templates "
                        f"folder{hint}")
    templates = load_templates(template_files[key])
    for template in templates.templates:
        renderer.check(template, templates.path)
    return templates


def _plan_heldout(plan: _Plan, source: Path, template_files: dict[str, Path], renderer: Renderer,
                  wanted: list[str] | None, storycloze_dir: str | Path | None) -> None:
    eval_root, fewshot_root = source / HELDOUT_EVAL, source / HELDOUT_FEWSHOT
    known_folders = {spec.eval_folder for spec in HELDOUT_TASKS.values()}
    if eval_root.is_dir():
        strays = sorted(p.name for p in eval_root.iterdir() if p.is_dir() and p.name not in known_folders)
        if strays:
            raise DataError(f"{eval_root}: unknown dataset folder(s) {strays}; held-out datasets are "
                            f"{', '.join(sorted(known_folders - {HELDOUT_TASKS[STORYCLOZE].eval_folder}))}")
    if fewshot_root.is_dir():
        plan.skipped["ignored_fewshot_folders"] = sorted(
            p.name for p in fewshot_root.iterdir() if p.is_dir() and p.name not in HELDOUT_TASKS)
    for task, spec in HELDOUT_TASKS.items():
        if wanted and task not in wanted:
            continue
        parts: list[tuple[str, Path, list[dict]]] = []  # (split, file, rows)
        if task == STORYCLOZE:
            if not storycloze_dir:
                reason = "STORYCLOZE_DIR / --storycloze-dir not set (the official CSV files are not redistributable)"
                if wanted:
                    raise DataError(f"storycloze was asked for in --tasks but {reason}")
                plan.skipped["absent"][task] = reason
                continue
            for split, (path, rows) in read_storycloze_csv(Path(storycloze_dir)).items():
                parts.append((split, path, rows))
        else:
            path = _jsonl_file(eval_root / spec.eval_folder, spec.eval_split)
            if path is not None:
                parts.append(("test", path, [row for _, row in read_jsonl(path)]))
        fewshot_files = (fewshot_root / task).glob("*_shot/*_seed.jsonl*") if (fewshot_root / task).is_dir() else []
        for path in sorted(fewshot_files):
            match = FEWSHOT_FILE.search(path.relative_to(fewshot_root / task).as_posix())
            if match:
                parts.append((f"fewshot_k{match.group(1)}_seed{match.group(2)}", path,
                              [row for _, row in read_jsonl(path)]))
        if not parts:
            reason = (f"no {HELDOUT_EVAL}/{spec.eval_folder}/{spec.eval_split}.jsonl[.gz] and no "
                      f"{HELDOUT_FEWSHOT}/{task}/ files")
            if wanted:
                raise DataError(f"held-out task {task} was asked for in --tasks but {source} has {reason}")
            plan.skipped["absent"][task] = reason
            continue
        templates = _load_dataset_templates(spec.templates_key, template_files, renderer, f"held-out task {task}")
        chosen = templates.original_task_templates()[:spec.max_templates]
        if not chosen:
            raise DataError(f"{templates.path}: no original-task templates for held-out task {task}")
        if not any(split == "test" for split, _, _ in parts):
            plan.skipped["absent"][f"{task}:test"] = (f"no {HELDOUT_EVAL}/{spec.eval_folder}/"
                                                      f"{spec.eval_split}.jsonl[.gz]")
        plan.tasks[task] = {"role": "test", "metric": "accuracy", "dataset": templates.key,
                            "rows_per_instance": len(chosen), "templates": [_template_meta(t) for t in chosen]}
        for split, path, rows in parts:
            plan.heldout.append((task, spec, templates, chosen, rows, path, split))


def _p3_index(template_files: dict[str, Path], names: set[str]) -> dict[str, tuple[str, Template]]:
    """P3 task name (`<dataset>_<subset>_<template>`, non-word runs → `_`) → (dataset key, template).

    Only the template files whose dataset is a prefix of one of `names` are read.
    """
    prefixes = {template_slug(key) + "_": key for key in template_files}
    wanted = {key for prefix, key in prefixes.items() if any(name.startswith(prefix) for name in names)}
    index = {}
    for key in sorted(wanted):
        for template in load_templates(template_files[key]).templates:
            index[template_slug(f"{key}_{template.name}")] = (key, template)
    return index


def _plan_mixture(plan: _Plan, source: Path, template_files: dict[str, Path], per_template: bool,
                  examples_per_dataset: int = EXAMPLES_PER_DATASET) -> None:
    """Already-rendered P3 rows: grouped into dataset (or dataset/template) training tasks.

    Each template keeps its first `per_template_cap` rows in file order (P3 renders a dataset's
    train split in order, so these are the dataset's first rows); blacklisted templates are
    dropped and counted in the manifest's `skipped.blacklisted`."""
    root = source / TRAIN_MIXTURE
    files = sorted(root.glob("*.jsonl")) + sorted(root.glob("*.jsonl.gz")) if root.is_dir() else []
    rows = []
    for path in files:
        for number, row in read_jsonl(path):
            missing = [k for k in ("template", "source", "target") if not isinstance(row.get(k), str)]
            if missing:
                raise DataError(f"{path}: line {number} lacks {missing}; training-mixture rows are "
                                "{template, source, target}")
            rows.append((path, number, row))
    index = _p3_index(template_files, {row["template"] for _, _, row in rows})
    for path, number, row in rows:
        if row["template"] not in index:
            raise DataError(f"{path}: line {number}: unknown dataset/template {row['template']!r} "
                            "(no matching promptsource template); check --templates")
    sizes = Counter(row["template"] for _, _, row in rows)
    n_templates = {key: len(load_templates(template_files[key]).templates) for key, _ in index.values()}
    kept: Counter = Counter()
    for path, number, row in rows:
        key, template = index[row["template"]]
        if p3_task_name(key, template.name) in TASK_BLACKLIST:
            plan.skipped.setdefault("blacklisted", Counter())[p3_task_name(key, template.name)] += 1
            continue
        if kept[row["template"]] >= per_template_cap(sizes[row["template"]], n_templates[key], examples_per_dataset):
            continue
        kept[row["template"]] += 1
        task = f"{key}/{template_slug(template.name)}" if per_template else key
        if task not in plan.tasks:
            plan.tasks[task] = _training_meta(key, template if per_template else None)
        plan.training.setdefault(task, []).append(
            _training_row(task, f"{path.name}:{number}", row["source"].strip(), row["target"].strip(), None))


def _training_meta(key: str, template: Template | None) -> dict:
    meta = {"role": "train", "metric": "rouge", "dataset": key}
    if template is not None:
        meta.update(template=template.name, original_task=template.metadata.original_task,
                    choices_in_prompt=template.metadata.choices_in_prompt, metrics=list(template.metadata.metrics))
    return meta


def _plan_raw_datasets(plan: _Plan, source: Path, template_files: dict[str, Path], renderer: Renderer,
                       skips: _Skips, per_template: bool, examples_per_dataset: int = EXAMPLES_PER_DATASET) -> None:
    """`<source>/<dataset>/train.jsonl[.gz]`: its first `per_template_cap` rows rendered with every
    template of that dataset that is not in `TASK_BLACKLIST`."""
    heldout_keys = ({spec.templates_key for spec in HELDOUT_TASKS.values()}
                    | {spec.eval_folder for spec in HELDOUT_TASKS.values()})
    for folder in sorted(p for p in source.iterdir() if p.is_dir() and p.name not in RESERVED_FOLDERS):
        path = _jsonl_file(folder, "train")
        if path is None:
            continue
        if folder.name in heldout_keys:
            raise DataError(f"{folder}: {folder.name} is a held-out dataset and cannot be a training dataset; "
                            f"move it under {HELDOUT_EVAL}/ or remove it")
        templates = _load_dataset_templates(folder.name, template_files, renderer, f"dataset folder {folder}")
        dataset_rows = list(read_jsonl(path))
        cap = per_template_cap(len(dataset_rows), len(templates.templates), examples_per_dataset)
        chosen = [t for t in templates.templates if p3_task_name(templates.key, t.name) not in TASK_BLACKLIST]
        for template in templates.templates:
            if template not in chosen:
                plan.skipped.setdefault("blacklisted", Counter())[p3_task_name(templates.key, template.name)] += cap
        for number, row in dataset_rows[:cap]:
            for template in chosen:
                task = f"{templates.key}/{template_slug(template.name)}" if per_template else templates.key
                try:
                    out = renderer.render(template, row, row_key=f"{folder.name}:{number}", where=templates.path,
                                          origin=f"{path} line {number}")
                except _ROW_ERRORS as err:
                    skips.add(templates, template, f"render error ({type(err).__name__})")
                    continue
                if out.skip_reason:
                    skips.add(templates, template, out.skip_reason)
                    continue
                if task not in plan.tasks:
                    plan.tasks[task] = _training_meta(templates.key, template if per_template else None)
                plan.training.setdefault(task, []).append(
                    _training_row(task, f"{number}/{template.id}", out.source, out.target, out.answer_choices))


# ---------------------------------------------------------------------------------------- CLI


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True,
                        help="folder laid out like ../shared/data/t0. Example: --source ../shared/data/t0")
    parser.add_argument("--templates", default=None,
                        help="promptsource templates folder. Default: <source>/promptsource_templates. "
                             "Example: --templates ../shared/data/t0/promptsource_templates")
    parser.add_argument("--out", required=True, help="output folder. Example: --out data/shards/t0")
    parser.add_argument("--use-t0-templates-as-tasks", action="store_true",
                        help="one training task per (dataset, template), named <dataset>/<template>. "
                             "Example: --use-t0-templates-as-tasks")
    parser.add_argument("--storycloze-dir", default=os.environ.get("STORYCLOZE_DIR"),
                        help="folder with the official StoryCloze 2016 CSV files. Default: $STORYCLOZE_DIR. "
                             "Example: --storycloze-dir ~/storycloze")
    parser.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                        help=f"held-out tasks to prepare (default: all present; one of {', '.join(HELDOUT_TASKS)}). "
                             "Example: --tasks cb rte")
    parser.add_argument("--seed", type=int, default=42,
                        help="seed of the choice filter and the validation draw. Example: --seed 13")
    parser.add_argument("--max-train-per-task", type=int, default=None,
                        help="cap on training rows per training task. Example: --max-train-per-task 1000")
    parser.add_argument("--examples-per-dataset", type=int, default=EXAMPLES_PER_DATASET,
                        help="training rows per dataset, split evenly over its templates (each renders the same "
                             "first min(rows, N // templates) rows), as the reference's T0 mixture. Default: 500000. "
                             "Example: --examples-per-dataset 50000")
    parser.add_argument("--validation-per-task", type=int, default=100,
                        help="validation rows per training task (at most 10%% of its rows). "
                             "Example: --validation-per-task 50")


def prepare_from_args(args: argparse.Namespace) -> dict:
    return prepare_t0(args.source, args.templates, args.out, use_t0_templates_as_tasks=args.use_t0_templates_as_tasks,
                      storycloze_dir=args.storycloze_dir, tasks=args.tasks, seed=args.seed,
                      max_train_per_task=args.max_train_per_task, validation_per_task=args.validation_per_task,
                      examples_per_dataset=args.examples_per_dataset)

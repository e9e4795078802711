"""Super-NaturalInstructions → shards: task files, official splits, prompt formatting, truncation.

Reads the layout of the allenai/natural-instructions repository (`tasks/<task>.json`,
`splits/<NAME>/{train,test}_tasks.txt`), in the current schema and the 2021 one (plain-string
`Definition`, no instance ids, no language fields).

Rows (one per instance; `target` is the first reference output, `references` keeps all of them
for multi-reference scoring):
- train task (role `train`): up to `max_instances_per_task` instances drawn by seed → `train`,
  then up to `validation_per_task` of the remaining ones → `validation`;
- test task (role `test`): the first `test_instances` instances (the official evaluation set,
  identical for every seed) → `test`, all the others → `validation`, the pool k-shot training
  sets are drawn from.

Prompt: `"<task name>. "` (optional) + `"Definition: <definition>\\n\\n"` (optional) + positive
then negative examples (`"Positive Example 1 -\\nInput: …\\nOutput: …\\n"`) added only while the
prompt stays within the length limit + `"Now complete the following example -\\nInput: <input>.\\nOutput:"`.
A prompt over `max_input_length` is cut inside its text, keeping the `"\\nOutput:"` suffix.
Length is counted in whitespace-separated words, or in a tokenizer's tokens when one is given.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path
from typing import Callable

from mttl.data.shards import fingerprint_sources, unchanged_manifest, write_prepared
from mttl.errors import DataError

SOURCE_HELP = "Super-NaturalInstructions from a natural-instructions checkout (tasks/ + splits/)"
SUFFIX = "\nOutput:"
_END_PUNCTUATION = tuple(".!?;:\"')]")

# (text) -> character end offset of each length unit, in order
Spans = Callable[[str], list[int]]


def _word_ends(text: str) -> list[int]:
    return [m.end() for m in re.finditer(r"\S+", text)]


def _tokenizer_ends(spec: str) -> Spans:
    from transformers import ByT5Tokenizer

    from mttl.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(spec)
    if isinstance(tokenizer, ByT5Tokenizer):
        # one token per UTF-8 byte, and this slow tokenizer has no offset mapping
        return lambda text: [i + 1 for i, char in enumerate(text) for _ in char.encode("utf-8")]
    if not tokenizer.is_fast:
        raise DataError(f"--tokenizer {spec}: a slow tokenizer gives no character offsets to cut prompts at; "
                        "use a folder with a tokenizer.json (fast tokenizer) or 'byte'")

    def ends(text: str) -> list[int]:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return [end for _, end in offsets]

    return ends


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith(_END_PUNCTUATION) else text + "."


def _truncate(text: str, limit: int, ends: Spans) -> str:
    """`text` + SUFFIX cut to at most `limit` units, always ending with SUFFIX."""
    text_ends = ends(text)
    budget = min(len(text_ends), max(limit - len(ends(SUFFIX)), 0))
    while True:
        prompt = (text[: text_ends[budget - 1]] if budget else "") + SUFFIX
        # a tokenizer may split the joint between the cut text and the suffix differently
        if budget == 0 or len(ends(prompt)) <= limit:
            return prompt
        budget -= 1


class TaskPrompter:
    """Formats the instances of one task; the task-level text is built and measured once.

    Segment lengths are added up (they join at whitespace, so words add exactly and tokens all
    but exactly); a prompt whose sum comes within `_JOINT_SLACK` units of the limit is measured
    as a whole and cut exactly.
    """

    _JOINT_SLACK = 8

    def __init__(self, task: dict, task_name: str, *, use_task_descriptions: bool, add_task_name: bool,
                 num_pos_examples: int, num_neg_examples: int, max_input_length: int, ends: Spans = _word_ends):
        self.limit, self.ends = max_input_length, ends
        self.head = f"{task_name}. " if add_task_name else ""
        definition = _definition(task)
        if use_task_descriptions and definition:
            self.head += f"Definition: {_sentence(definition)}\n\n"
        self.examples = []
        for kind, key, count in (("Positive", "Positive Examples", num_pos_examples),
                                 ("Negative", "Negative Examples", num_neg_examples)):
            shown = [e for e in (task.get(key) or []) if isinstance(e, dict) and "input" in e and "output" in e]
            self.examples += [f"{kind} Example {i} -\nInput: {_sentence(e['input'])}\n"
                              f"Output: {_sentence(_first(e['output']))}\n\n" for i, e in enumerate(shown[:count], 1)]
        self.head_length = len(ends(self.head))
        self.example_lengths = [len(ends(text)) for text in self.examples]

    def __call__(self, instance_input: str) -> str:
        """The model input for one instance: examples only while they fit next to this input."""
        query = f"Now complete the following example -\nInput: {_sentence(instance_input)}"
        used = self.head_length + len(self.ends(query + SUFFIX))
        text = self.head
        for example, length in zip(self.examples, self.example_lengths):
            if used + length > self.limit:
                break
            text += example
            used += length
        if used <= self.limit - self._JOINT_SLACK:
            return text + query + SUFFIX
        return _truncate(text + query, self.limit, self.ends)


def _first(value) -> str:
    return str(value[0] if isinstance(value, list) and value else value)


def _definition(task: dict) -> str:
    definition = task.get("Definition")
    if isinstance(definition, list):
        return str(definition[0]) if definition else ""
    return str(definition or "")


def read_split(source: Path, split: str) -> tuple[list[str], list[str]]:
    """(train task names, test task names) of `splits/<split>/`."""
    folder = source / "splits" / split
    if not folder.is_dir():
        present = sorted(p.name for p in (source / "splits").iterdir()) if (source / "splits").is_dir() else []
        raise DataError(f"{folder} not found: --split must be one of {present or 'the folders under splits/'} "
                        f"and --source the natural-instructions checkout")
    names = {}
    for role in ("train", "test"):
        path = folder / f"{role}_tasks.txt"
        if not path.is_file():
            raise DataError(f"{path} not found: a split folder needs train_tasks.txt and test_tasks.txt")
        names[role] = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        # a name becomes tasks/<name>.json: one with a path in it would read a file outside tasks/
        odd = [n for n in names[role] if "/" in n or "\\" in n or n in (".", "..")]
        if odd:
            raise DataError(f"{path}: {odd[0]!r} is not a task name (names are files under tasks/, without a path); "
                            "list task names only, e.g. task001_quoref_question_generation")
    both = sorted(set(names["train"]) & set(names["test"]))
    if both:
        raise DataError(f"{folder}: task(s) {both[:3]} are in both train_tasks.txt and test_tasks.txt; "
                        "keep each in one")
    return names["train"], names["test"]


def load_task(path: Path) -> dict:
    """A task JSON, checked: instances exist and each has an input and a non-empty output list."""
    try:
        task = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: malformed JSON ({err}); fix or re-download the task file") from None
    if not isinstance(task, dict):
        raise DataError(f"{path}: expected a JSON object with 'Definition' and 'Instances'")
    definition = task.get("Definition")
    texts = [definition] if isinstance(definition, str) else definition
    if not isinstance(texts, list) or not all(isinstance(d, str) for d in texts) or not _definition(task).strip():
        raise DataError(f"{path}: task has no 'Definition' text (a string or a list of strings); fix or re-download "
                        "the task file")
    for key in ("Categories", "Positive Examples", "Negative Examples"):
        if task.get(key) is not None and not isinstance(task[key], list):
            raise DataError(f"{path}: '{key}' must be a list, got {type(task[key]).__name__}; fix the task file")
    instances = task.get("Instances")
    if not isinstance(instances, list):
        raise DataError(f"{path}: 'Instances' must be a list of {{input, output}} objects, "
                        f"got {type(instances).__name__}; fix the task file")
    if not instances:
        raise DataError(f"{path}: task has no instances; remove it from the split's task list")
    for index, instance in enumerate(instances):
        ident = instance.get("id", f"#{index}") if isinstance(instance, dict) else f"#{index}"
        if not isinstance(instance, dict) or not isinstance(instance.get("input"), str):
            raise DataError(f"{path}: instance {ident} has no 'input' string; fix the task file")
        output = instance.get("output")
        if isinstance(output, str):
            output = [output]
        if not isinstance(output, list) or not output or not all(isinstance(o, str) for o in output):
            raise DataError(f"{path}: instance {ident} has no output strings; every instance needs a non-empty "
                            "'output' list of strings")
        instance["output"] = output
    return task


def prepare_ni(source: str | Path, out: str | Path, *, split: str = "default", num_pos_examples: int = 0,
               num_neg_examples: int = 0, use_task_descriptions: bool = True, add_task_name: bool = False,
               max_instances_per_task: int = 100, validation_per_task: int = 10, test_instances: int = 100,
               max_input_length: int = 512, tokenizer: str | None = None, seed: int = 42,
               allow_missing_tasks: bool = False) -> dict:
    """Prepare Super-NaturalInstructions into `out`; returns the manifest (see module docstring)."""
    source = Path(source)
    if not (source / "tasks").is_dir():
        raise DataError(f"{source / 'tasks'} not found: --source must be a natural-instructions checkout")
    train_names, test_names = read_split(source, split)
    roles = {**{n: "train" for n in train_names}, **{n: "test" for n in test_names}}
    missing = sorted(n for n in roles if not (source / "tasks" / f"{n}.json").is_file())
    if missing and not allow_missing_tasks:
        raise DataError(f"{len(missing)} task(s) of splits/{split} missing from {source / 'tasks'}: "
                        f"{', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}; "
                        "add the files or pass --allow-missing-tasks to skip them")
    present = [n for n in roles if n not in set(missing)]
    if not present:
        raise DataError(f"none of the tasks of splits/{split} is in {source / 'tasks'}")

    args = {"source": str(source.resolve()), "split": split, "num_pos_examples": num_pos_examples,
            "num_neg_examples": num_neg_examples, "use_task_descriptions": use_task_descriptions,
            "add_task_name": add_task_name, "max_instances_per_task": max_instances_per_task,
            "validation_per_task": validation_per_task, "test_instances": test_instances,
            "max_input_length": max_input_length, "tokenizer": tokenizer, "seed": seed,
            "allow_missing_tasks": allow_missing_tasks}
    split_dir = source / "splits" / split
    fingerprint = fingerprint_sources([split_dir, *(source / "tasks" / f"{n}.json" for n in present)], args)
    existing = unchanged_manifest(out, fingerprint)
    if existing is not None:
        return existing

    ends = _tokenizer_ends(tokenizer) if tokenizer else _word_ends
    tasks, rows = {}, []
    for name in present:
        task = load_task(source / "tasks" / f"{name}.json")
        categories = task.get("Categories") or []
        tasks[name] = {"role": roles[name], "metric": "rouge", "category": categories[0] if categories else None}
        instances = [(inst.get("id") or f"{name}-{index}", inst) for index, inst in enumerate(task["Instances"])]
        if roles[name] == "train":
            random.Random(f"{seed}:{name}").shuffle(instances)
            chosen = [("train", x) for x in instances[:max_instances_per_task]]
            chosen += [("validation", x) for x in
                       instances[max_instances_per_task: max_instances_per_task + validation_per_task]]
        else:
            chosen = [("test", x) for x in instances[:test_instances]]
            chosen += [("validation", x) for x in instances[test_instances:]]
        prompter = TaskPrompter(task, name, use_task_descriptions=use_task_descriptions, add_task_name=add_task_name,
                                num_pos_examples=num_pos_examples, num_neg_examples=num_neg_examples,
                                max_input_length=max_input_length, ends=ends)
        for row_split, (instance_id, inst) in chosen:
            rows.append({"task_name": name, "split": row_split, "source": prompter(inst["input"]),
                         "target": inst["output"][0], "references": inst["output"], "instance_id": str(instance_id)})
    return write_prepared(out, rows, tasks, source="ni", args=args, fingerprint=fingerprint,
                          skipped={"missing_tasks": missing})


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, metavar="DIR",
                        help="natural-instructions checkout with tasks/ and splits/. "
                             "Example: --source ../shared/data/natural-instructions")
    parser.add_argument("--split", default="default",
                        help="folder under splits/ with train_tasks.txt and test_tasks.txt (default: default). "
                             "Example: --split available")
    parser.add_argument("--num-pos-examples", type=int, default=0,
                        help="positive examples shown in each prompt (default 0). Example: --num-pos-examples 2")
    parser.add_argument("--num-neg-examples", type=int, default=0,
                        help="negative examples shown after the positive ones (default 0). "
                             "Example: --num-neg-examples 1")
    parser.add_argument("--use-task-descriptions", action=argparse.BooleanOptionalAction, default=True,
                        help="put 'Definition: …' into each prompt (default on). Example: --no-use-task-descriptions")
    parser.add_argument("--add-task-name", action="store_true",
                        help="start each prompt with '<task name>. '. Example: --add-task-name")
    parser.add_argument("--max-instances-per-task", type=int, default=100,
                        help="instances drawn by seed from each train task (default 100). "
                             "Example: --max-instances-per-task 32")
    parser.add_argument("--validation-per-task", type=int, default=10,
                        help="further instances of each train task kept as its validation split (default 10). "
                             "Example: --validation-per-task 25")
    parser.add_argument("--test-instances", type=int, default=100,
                        help="first instances of each test task used as its test split; the rest is the k-shot "
                             "pool (default 100, the official evaluation set). Example: --test-instances 100")
    parser.add_argument("--max-input-length", type=int, default=512,
                        help="prompt length limit, in words (or tokens with --tokenizer) (default 512). "
                             "Example: --max-input-length 1024")
    parser.add_argument("--tokenizer", default=None, metavar="PATH",
                        help="measure --max-input-length in this tokenizer's tokens: a local folder, hub name or "
                             "'byte'. Example: --tokenizer ../shared/tokenizers/t5")
    parser.add_argument("--seed", type=int, default=42,
                        help="seed drawing the train tasks' instances (default 42). Example: --seed 13")
    parser.add_argument("--allow-missing-tasks", action="store_true",
                        help="skip split tasks that have no tasks/<task>.json (listed in the manifest's skipped). "
                             "Example: --allow-missing-tasks")


def prepare_from_args(args: argparse.Namespace) -> dict:
    return prepare_ni(args.source, args.out, split=args.split, num_pos_examples=args.num_pos_examples,
                      num_neg_examples=args.num_neg_examples, use_task_descriptions=args.use_task_descriptions,
                      add_task_name=args.add_task_name, max_instances_per_task=args.max_instances_per_task,
                      validation_per_task=args.validation_per_task, test_instances=args.test_instances,
                      max_input_length=args.max_input_length, tokenizer=args.tokenizer, seed=args.seed,
                      allow_missing_tasks=args.allow_missing_tasks)

"""CrossFit → shards: the k-shot TSV files of each task and a partition of tasks into train/test.

Files are `<source>/<task>/<task>_<k>_<seed>_{train,dev,test}.tsv`, one instance per line:
`input \\t output [\\t more outputs]` (the CrossFit build puts them under an extra `data/`
level; `--source` may point at either). The partition JSON lists `train`, `dev` and `test` tasks.

Rows (prompt `"[<task>] <input>"`, preceded by `"<description>. "` with task descriptions;
`target` = first output, `references` = all outputs; metric `rouge`, which also reports exact match):
- train task (role `train`): the train files of all its prefixes → `train`, their dev files → `validation`;
- test task (role `test`): per prefix `<task>_<k>_<seed>`, its train file → `fewshot_k<k>_seed<seed>`;
  the dev file of the first prefix (sorted by name) → `validation`; its test file → `test` (the
  CrossFit test file is the same for every prefix of a task);
- dev tasks are not used (CrossFit's meta-validation tasks): listed in the manifest's `skipped`.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from mttl.data.shards import fingerprint_sources, unchanged_manifest, write_prepared
from mttl.errors import DataError

SOURCE_HELP = "CrossFit k-shot TSV files (<task>/<task>_<k>_<seed>_{train,dev,test}.tsv) and a partition JSON"
_PREFIX = re.compile(r"^(?P<task>.+)_(?P<k>\d+)_(?P<seed>\d+)_train\.tsv$")


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: {what} file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: malformed JSON ({err}); fix the {what} file") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: the {what} file must hold a JSON object")
    return data


# Partition files kept in the repository (CrossFit's random split lives there as `random.json`).
PARTITION_DIR = Path(__file__).resolve().parents[2] / "data" / "xfit"


def resolve_partition(name: str | Path) -> Path:
    """A partition path as given, else a file of that name in the repository's data/xfit/ folder."""
    path = Path(name)
    if path.is_file() or path.is_absolute() or len(path.parts) > 1:
        return path
    shipped = PARTITION_DIR / path.name
    return shipped if shipped.is_file() else path


def read_partition(path: Path) -> dict[str, list[str]]:
    """{"train": [...], "dev": [...], "test": [...]} with every list present (possibly empty)."""
    data = _read_json(path, "partition")
    out = {}
    for key in ("train", "dev", "test"):
        names = data.get(key, [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DataError(f"{path}: '{key}' must be a list of task names")
        out[key] = names
    if not out["train"] and not out["test"]:
        raise DataError(f"{path}: no 'train' or 'test' tasks listed")
    return out


def read_tsv(path: Path) -> list[tuple[str, list[str]]]:
    """(input, outputs) per line; DataError naming file and line for a line without an output."""
    if not path.is_file():
        raise DataError(f"{path} not found: every k-shot prefix needs its train, dev and test files")
    instances = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        outputs = [o.strip() for o in fields[1:] if o.strip()]
        if not outputs:
            raise DataError(f"{path}:{number}: instance without output; each line is 'input<TAB>output'")
        instances.append((fields[0].strip(), outputs))
    if not instances:
        raise DataError(f"{path}: no instances; remove the task from the partition or rebuild its files")
    return instances


def _prefixes(task_dir: Path, task: str) -> list[tuple[str, int, int]]:
    """(prefix, k, seed) of every `<task>_<k>_<seed>_train.tsv`, sorted by prefix name."""
    found = []
    for path in task_dir.glob("*_train.tsv"):
        match = _PREFIX.match(path.name)
        if match and match["task"] == task:
            found.append((path.name[: -len("_train.tsv")], int(match["k"]), int(match["seed"])))
    if not found:
        raise DataError(f"{task_dir}: no '{task}_<k>_<seed>_train.tsv' files for task {task}")
    return sorted(found)


def prepare_xfit(source: str | Path, out: str | Path, *, partition: str | Path, descriptions: str | Path | None = None,
                 use_task_descriptions: bool = False, allow_missing_tasks: bool = False) -> dict:
    """Prepare CrossFit tasks into `out`; returns the manifest (see module docstring)."""
    source = Path(source)
    if not source.is_dir():
        raise DataError(f"{source} not found: --source must be the CrossFit data folder")
    partition = resolve_partition(partition)
    parts = read_partition(partition)
    roles = {**{n: "train" for n in parts["train"]}, **{n: "test" for n in parts["test"]}}
    both = sorted(set(parts["train"]) & set(parts["test"]))
    if both:
        raise DataError(f"{partition}: task(s) {both[:3]} are in both 'train' and 'test'; keep each in one")
    root = source
    if not any((source / n).is_dir() for n in roles) and (source / "data").is_dir():
        root = source / "data"  # the CrossFit build's extra level
    missing = sorted(n for n in roles if not (root / n).is_dir())
    if missing and not allow_missing_tasks:
        raise DataError(f"{len(missing)} task(s) of {partition} missing from {root}: "
                        f"{', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}; "
                        "add their folders or pass --allow-missing-tasks to skip them")
    present = sorted(n for n in roles if n not in set(missing))
    if not present:
        raise DataError(f"none of the tasks of {partition} is in {root}")
    task_descriptions = _read_json(Path(descriptions), "task descriptions") if descriptions else {}
    if use_task_descriptions:
        undescribed = [n for n in present if not task_descriptions.get(n)]
        if undescribed:
            raise DataError(f"{descriptions or '--descriptions'}: no description for task(s) {undescribed[:5]}; "
                            "add them or drop --use-task-descriptions")

    args = {"source": str(root.resolve()), "partition": str(Path(partition).resolve()),
            "descriptions": str(Path(descriptions).resolve()) if descriptions else None,
            "use_task_descriptions": use_task_descriptions, "allow_missing_tasks": allow_missing_tasks}
    inputs = [Path(partition), *([Path(descriptions)] if descriptions else []), *(root / n for n in present)]
    fingerprint = fingerprint_sources(inputs, args)
    existing = unchanged_manifest(out, fingerprint)
    if existing is not None:
        return existing

    tasks, rows = {}, []
    for name in present:
        lead = f"{task_descriptions[name].rstrip('. ')}. " if use_task_descriptions else ""
        prefixes = _prefixes(root / name, name)
        if roles[name] == "train":
            files = [(f"{p}_{kind}", split) for p, _, _ in prefixes for kind, split in
                     (("train", "train"), ("dev", "validation"))]
        else:
            first = prefixes[0][0]
            files = [(f"{p}_train", f"fewshot_k{k}_seed{seed}") for p, k, seed in prefixes]
            files += [(f"{first}_dev", "validation"), (f"{first}_test", "test")]
        for stem, split in files:
            for index, (text, outputs) in enumerate(read_tsv(root / name / f"{stem}.tsv")):
                rows.append({"task_name": name, "split": split, "source": f"{lead}[{name}] {text}",
                             "target": outputs[0], "references": outputs, "instance_id": f"{stem}-{index}"})
        tasks[name] = {"role": roles[name], "metric": "rouge", "prefixes": [p for p, _, _ in prefixes]}
    return write_prepared(out, rows, tasks, source="xfit", args=args, fingerprint=fingerprint,
                          skipped={"missing_tasks": missing, "dev_tasks": sorted(parts["dev"])})


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, metavar="DIR",
                        help="CrossFit data folder holding one folder per task. "
                             "Example: --source data/xfit_data/processed")
    parser.add_argument("--partition", required=True, metavar="FILE",
                        help='JSON {"train": [...], "dev": [...], "test": [...]} of task names. '
                             "A bare name is also looked up in the repository's data/xfit/ (random.json: CrossFit's "
                             "random split, 120/20/20 tasks). Example: --partition random.json")
    parser.add_argument("--descriptions", default=None, metavar="FILE",
                        help='JSON {task: description} used with --use-task-descriptions. '
                             "Example: --descriptions xfit_descriptions.json")
    parser.add_argument("--use-task-descriptions", action="store_true",
                        help="start each prompt with '<description>. '. Example: --use-task-descriptions")
    parser.add_argument("--allow-missing-tasks", action="store_true",
                        help="skip partition tasks without a folder (listed in the manifest's skipped). "
                             "Example: --allow-missing-tasks")


def prepare_from_args(args: argparse.Namespace) -> dict:
    return prepare_xfit(args.source, args.out, partition=args.partition, descriptions=args.descriptions,
                        use_task_descriptions=args.use_task_descriptions, allow_missing_tasks=args.allow_missing_tasks)

"""Reading the run folders `mttl report` is given: what each holds (pre-training, fine-tuning, sweep), read once."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

from mttl.errors import DataError
from mttl.run_folder import (ADAPTERS_FILE, CONFIG_FILE, FINAL_DIR, METRICS_FILE, RESULTS_CSV, RESULTS_FILE, read_json,
                             read_jsonl)

REQUIRED_RESULT_KEYS = {"task", "seed", "evaluation", "metric", "value"}


@dataclass
class Run:
    """What one run folder holds, read once."""

    path: Path
    name: str
    config: dict = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)
    results: list[dict] = field(default_factory=list)
    trials: list[dict] = field(default_factory=list)
    adapters_file: Path | None = None

    @property
    def holds(self) -> list[str]:
        found = [(self.metrics, "training curves"), (self.adapters_file, "routing"),
                 (self.results, "fine-tuning results"), (self.trials, "sweep trials")]
        return [label for present, label in found if present]


def is_run_folder(path: Path) -> bool:
    markers = [METRICS_FILE, RESULTS_FILE, f"{FINAL_DIR}/{ADAPTERS_FILE}"]
    return any((path / m).is_file() for m in markers) or _is_sweep_csv(path / RESULTS_CSV)


def _is_sweep_csv(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open(newline="") as handle:
        header = next(csv.reader(handle), [])
    return "trial_id" in header


def read_run(path: str | os.PathLike) -> Run:
    """Read one run folder; raises DataError when it is not a pre-training, fine-tuning or sweep run."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"run folder '{path}' does not exist; give the folder of a run (e.g. output/<run_name>)")
    if not is_run_folder(path):
        raise DataError(
            f"'{path}' is not a run folder: expected metrics.jsonl or final/adapters.safetensors (pre-training), "
            f"results.jsonl (fine-tuning) or results.csv with a trial_id column (sweep); pass the run's own folder")
    run = Run(path=path, name=path.resolve().name)
    if (path / CONFIG_FILE).is_file():
        run.config = read_json(path / CONFIG_FILE)
    if (path / METRICS_FILE).is_file():
        run.metrics = read_jsonl(path / METRICS_FILE)
    if (path / FINAL_DIR / ADAPTERS_FILE).is_file():
        run.adapters_file = path / FINAL_DIR / ADAPTERS_FILE
    if (path / RESULTS_FILE).is_file():
        run.results = read_jsonl(path / RESULTS_FILE)
        for number, row in enumerate(run.results, 1):
            missing = REQUIRED_RESULT_KEYS - row.keys()
            if missing:
                raise DataError(f"{path / RESULTS_FILE} line {number} lacks {sorted(missing)}; the file must come "
                                "from `mttl finetune` or `mttl evaluate`")
    if _is_sweep_csv(path / RESULTS_CSV):
        with (path / RESULTS_CSV).open(newline="") as handle:
            run.trials = list(csv.DictReader(handle))
    return run


def expand_run_dirs(paths: list[str | os.PathLike]) -> list[Path]:
    """Each path is a run, or a folder whose immediate sub-folders are runs (e.g. an output_dir)."""
    out = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir() and not is_run_folder(path):
            children = sorted(p for p in path.iterdir() if p.is_dir() and is_run_folder(p))
            if children:
                out.extend(children)
                continue
        out.append(path)
    return out

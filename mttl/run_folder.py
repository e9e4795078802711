"""The run folder and the outputs commands write: what they are called, how they are read and written.

One module owns, for every command (`pretrain`, `finetune`, `evaluate`, `sweep`, `report`, `export`,
`prepare`, the quick start):

- the names of what a run folder holds (`config.json`, `tasks.json`, `metrics.jsonl`, `results.jsonl`,
  `results.csv`, `final/`, `logs/`, ...) and where a run folder is (`run_dir_for`, `safe_name`);
- reading JSON and JSONL files into one-line errors naming the file (`read_json`, `read_jsonl`),
  the metrics and results rows (`read_metrics`, `read_results`, `write_results`);
- writing: a text file written whole then renamed (`atomic_write_text`), the one CSV writer
  (`write_csv`), and whole folders built beside their place and renamed onto it (`make_staging`,
  `staged_folder`, `remove_stale_staging`);
- the aggregation of results rows (median over seeds per task, then mean over tasks: `aggregate`).

A run folder may live in object storage (`output_dir=s3://bucket/prefix`): `run_dir_for` then names this
machine's copy of it under cache_dir, `remote_run_for` its URI, and `pull_run` / `push_run` copy its
files down before a command reads them and up after it writes them (`mttl.storage` does the I/O).

It imports neither torch nor any other mttl module than `mttl.errors` and `mttl.storage` at import time,
so `mttl report` and the command-line help stay light, and every package can use it without an import cycle.

Staging folders: `mttl prepare`, `mttl report` and `mttl export` build their output in
`.<out>.tmp-<host>-<pid>-<random>` next to `<out>` (and `mttl prepare` moves a replaced output aside
into `.<out>.old-...`). A process killed with SIGKILL, or an out-of-memory kill, cannot remove its
folder, so the next command writing the same `<out>` removes every such folder whose owner is gone:
made on this host by a process that no longer runs. Folders of other hosts (an output on shared
storage) are left alone, as their processes cannot be checked from here.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
import socket
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from mttl import storage
from mttl.errors import ConfigError, DataError, MttlError

if TYPE_CHECKING:
    from mttl.config import Config

# ------------------------------------------------------------------------------------ names
CONFIG_FILE = "config.json"  # the merged config of the run (mttl.config.Config.save / load)
TASKS_FILE = "tasks.json"  # task name -> routing row, of a pre-training run
METRICS_FILE = "metrics.jsonl"  # one JSON row per logged step (mttl.tracking.MetricsLogger)
TRACKING_FILE = "tracking.json"  # the MLflow / W&B run ids a resumed run continues
RESULTS_FILE = "results.jsonl"  # fine-tuning and evaluation rows (RESULT_FIELDS and scores)
RESULTS_CSV = "results.csv"  # the same rows as a table; a sweep's one row per trial
FINAL_DIR = "final"  # the finished run's adapters (and trained backbone)
BACKBONE_DIR = "backbone"  # in final/: a backbone trained by the run, in save_pretrained layout
ADAPTERS_FILE = "adapters.safetensors"  # in final/: adapter and routing tensors
ADAPTERS_DESCRIPTION = "adapters.json"  # in final/: the adapter config those tensors were made with
TENSORBOARD_DIR = "tensorboard"  # TensorBoard event files (mttl.tracking)
LOGS_DIR = "logs"  # Ray's and DeepSpeed's own logs (mttl.console)

RESULT_FIELDS = ["task", "seed", "finetune_type", "evaluation", "metric", "value", "step", "epoch"]
STAGING_KINDS = ("tmp", "old")


def safe_name(name: str) -> str:
    """A folder name without shell-hostile characters (task names hold '>', '/', …)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def run_name_for(cfg: Config, prefix: str) -> str:
    """run_name, defaulting to <prefix>_<task>_<finetune type>."""
    return cfg.run_name or safe_name(f"{prefix}_{cfg.finetune_task_name or 'tasks'}_{cfg.finetune_type or 'Poly'}")


def run_dir_for(cfg: Config, prefix: str) -> Path:
    """$output_dir/$run_name; for an output_dir URI, this machine's copy of that run folder under cache_dir."""
    uri = remote_run_for(cfg, prefix)
    if uri is not None:
        return storage.local_mirror(uri, cfg.cache_dir)
    return Path(cfg.output_dir) / run_name_for(cfg, prefix)


def remote_run_for(cfg: Config, prefix: str) -> str | None:
    """The URI of the run folder when output_dir is one (`s3://bucket/runs/<run_name>`), else None."""
    if not storage.is_uri(str(cfg.output_dir)):
        return None
    return storage.join(str(cfg.output_dir), run_name_for(cfg, prefix))


def local_output_only(cfg: Config, command: str) -> None:
    """ConfigError for a command whose outputs cannot go to an output_dir URI yet."""
    if storage.is_uri(str(cfg.output_dir)):
        raise ConfigError(f"{command} writes its run folder to a local output_dir only, not {cfg.output_dir} yet; "
                          "give a local -k output_dir=DIR (a checkpoint=s3://... run can still be read)")


# the files of a run folder a command reads before it continues the run, and uploads after writing
RUN_FILES = [CONFIG_FILE, TASKS_FILE, METRICS_FILE, TRACKING_FILE, RESULTS_FILE, RESULTS_CSV]


def pull_run(run_dir: Path, uri: str | None, names: list[str] | None = None) -> None:
    """For a run folder at `uri`: `run_dir` made a fresh copy of its files `names` (default RUN_FILES)."""
    if uri is None:
        return
    storage.check_reachable(uri)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    storage.pull(uri, run_dir, RUN_FILES if names is None else names)


def push_run(run_dir: Path, uri: str | None, names: list[str] | None = None, fs=None) -> None:
    """For a run folder at `uri`: the files `names` (default RUN_FILES) of `run_dir` uploaded, each whole,
    and its TensorBoard events (added to those already there: a resumed run writes a new events file
    beside the earlier attempt's, and TensorBoard pointed at the bucket reads them together)."""
    if uri is not None:
        storage.push(run_dir, uri, RUN_FILES if names is None else names, fs)
        if (run_dir / TENSORBOARD_DIR).is_dir():
            storage.upload_folder(run_dir / TENSORBOARD_DIR, storage.join(uri, TENSORBOARD_DIR), marker=None,
                                  replace=False, fs=fs)


# ---------------------------------------------------------------------------------- reading
def read_json(path: str | os.PathLike, *, error: type[MttlError] = DataError, name: str | None = None,
              fix: str = "fix or remove the file") -> dict:
    """A file holding one JSON object; `error` (a one-line message: `name`, default the path,
    what is wrong, then `fix`) when it is missing, unreadable, not UTF-8, not JSON or not an object."""
    path = Path(path)
    name = name or str(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{name} does not exist") from None
    except json.JSONDecodeError as err:
        raise error(f"{name} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); {fix}") from None
    except UnicodeDecodeError:
        raise error(f"{name} is not a text file (not UTF-8); {fix}") from None
    except OSError as err:  # a folder, no permission
        raise error(f"{name} cannot be read ({err.strerror}); give a readable JSON file") from None
    if not isinstance(data, dict):
        raise error(f"{name} must hold a JSON object, got {type(data).__name__}; {fix}")
    return data


def read_jsonl(path: str | os.PathLike, *, skip_bad_lines: bool = False) -> list[dict]:
    """The JSON object rows of a JSONL file ([] when it is missing). A bad line is a DataError naming
    the file and line, or, with `skip_bad_lines`, left out (a torn last line from a killed writer)."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{path} is not a text file (not UTF-8); fix or remove the file") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if skip_bad_lines:
                continue
            raise DataError(f"{path} line {number} is not valid JSON ({err.msg}); fix or remove that line") from None
        if not isinstance(row, dict):
            if skip_bad_lines:
                continue
            raise DataError(f"{path} line {number} is not a JSON object; fix or remove that line")
        rows.append(row)
    return rows


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """All rows of a run's metrics.jsonl (a torn last line from a killed writer is skipped)."""
    return read_jsonl(Path(run_dir) / METRICS_FILE, skip_bad_lines=True)


def read_results(run_dir: str | os.PathLike) -> list[dict]:
    """The rows of a run's results.jsonl ([] when there is none yet)."""
    path = Path(run_dir) / RESULTS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# ---------------------------------------------------------------------------------- writing
def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write next to the target, then rename: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_csv(path: str | os.PathLike, rows: list[dict], fields: list[str] | None = None) -> Path:
    """`rows` as a CSV table, written whole then renamed. Columns: `fields` (other keys left out),
    else every key of the rows in first-seen order."""
    fields = fields if fields is not None else list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buffer.getvalue())


def write_results(run_dir: str | os.PathLike, rows: list[dict]) -> None:
    """results.jsonl and results.csv, each written whole and renamed into place."""
    run_dir = Path(run_dir)
    atomic_write_text(run_dir / RESULTS_FILE, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    write_csv(run_dir / RESULTS_CSV, rows, RESULT_FIELDS)


# ------------------------------------------------------------------------------ aggregation
def aggregate(results: Iterable[dict], evaluation: str = "best_val") -> dict:
    """Median over seeds per task, then mean over tasks, for rows of one `evaluation` kind.

    `results` are `results.jsonl` rows (`task`, `seed`, `evaluation`, `value`). Returns
    {'per_task': {task: median}, 'mean': mean of the medians, 'std': population std across tasks}.
    """
    by_task = defaultdict(list)
    for row in results:
        if row["evaluation"] == evaluation:
            by_task[row["task"]].append(float(row["value"]))
    per_task = {task: statistics.median(values) for task, values in sorted(by_task.items())}
    medians = list(per_task.values())
    return {"per_task": per_task,
            "mean": statistics.fmean(medians) if medians else float("nan"),
            "std": statistics.pstdev(medians) if medians else float("nan")}


# --------------------------------------------------------------------------- staging folders
def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def make_staging(out: Path, kind: str = "tmp") -> Path:
    """A new empty folder beside `out`, named after this host and process (mode 0755)."""
    folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-{_host()}-{os.getpid()}-", dir=out.parent))
    folder.chmod(0o755)  # mkdtemp makes it owner-only; what is renamed out of it is an ordinary folder
    return folder


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_staging(out: str | os.PathLike) -> list[Path]:
    """Remove the staging folders beside `out` left by processes of this host that no longer run;
    says so in one line on stderr. Returns the folders removed."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    kinds = "|".join(STAGING_KINDS)
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(?:{kinds})-(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-[A-Za-z0-9_]+")
    removed = []
    for path in sorted(out.parent.iterdir()):
        match = pattern.fullmatch(path.name)
        if not match or match["host"] != _host() or not path.is_dir() or path.is_symlink():
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or _running(pid):
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(path)
    if removed:
        names = ", ".join(p.name for p in removed)
        print(f"[mttl] removed {len(removed)} temporary folder(s) beside {out} left by processes that no longer run "
              f"(killed before they finished): {names}", file=sys.stderr)
    return removed


@contextlib.contextmanager
def staged_folder(out: Path):
    """A new folder beside `out` (whose parent exists), renamed onto `out` when the block succeeds
    and removed when it fails; stale folders of dead processes beside `out` are removed first."""
    remove_stale_staging(out)
    staging = make_staging(out)
    try:
        yield staging
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

"""Metrics of a run: `metrics.jsonl` in the run folder, TensorBoard events, MLflow and Weights & Biases.

`MetricsLogger(run_dir, cfg).log(row)` appends one JSON object per call (flushed at once, so a
killed run keeps every row it logged) and mirrors the row's numbers, with `step` as the x axis, to
TensorBoard (`cfg.tensorboard`), MLflow (`cfg.mlflow_tracking_uri`) and W&B (`cfg.wandb_project`).
Pre-training (rank 0 of the Ray Train workers only) and fine-tuning both write through it.

A row that carries a `seed` is one seed's series: its numbers are logged as `seed<N>/<key>`, so
the seeds of a fine-tuning run draw separate curves instead of interleaving on one step axis.

The MLflow and W&B run ids are kept in the run folder (`tracking.json`): a run resumed after a
failure or continued to more steps goes on logging into the same tracked run.

Relative MLflow locations (`file:./mlruns`, `./mlruns`, `sqlite:///mlflow.db`) are made absolute
against the working folder of the process that reads the config (`absolute_tracking_uri`, called
by `Config.update`), so Ray workers, which run elsewhere, log to the place the user meant.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from mttl.errors import ConfigError
from mttl.run_folder import METRICS_FILE, TENSORBOARD_DIR, TRACKING_FILE

if TYPE_CHECKING:
    from mttl.config import Config

MLFLOW_EXPERIMENT = "mttl"
# Row keys that identify a row rather than measure something.
ID_KEYS = ("step", "seed")
# MLflow refuses longer parameter values on older servers.
MLFLOW_PARAM_CHARS = 250


def absolute_tracking_uri(uri: str, base: str | os.PathLike | None = None) -> str:
    """`uri` with a relative local path (file store, bare folder, SQLite file) made absolute against `base`
    (default: the current working folder); remote and absolute URIs are returned unchanged."""
    base = Path(base or os.getcwd())
    scheme = urlparse(uri).scheme
    if scheme == "" and uri != "databricks":  # MLflow reads a bare path as a file store
        return (base / Path(uri).expanduser()).resolve().as_uri()
    if scheme == "file":
        path = uri[len("file:"):]
        if path.startswith("//"):  # file:///abs or file://host/…
            return uri
        return (base / Path(path).expanduser()).resolve().as_uri()
    if scheme == "sqlite" and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = uri[len("sqlite:///"):]
        if path and path != ":memory:":
            return "sqlite:///" + str((base / Path(path).expanduser()).resolve())
    return uri


class MetricsLogger:
    def __init__(self, run_dir: str | os.PathLike, cfg: Config, name: str | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.name = name or self.run_dir.name
        self._jsonl = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")
        self._tensorboard = None
        self._mlflow = None
        self._wandb = None
        try:
            ids = self._read_ids()
            if cfg.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tensorboard = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR))
            if cfg.mlflow_tracking_uri:
                self._mlflow = _MlflowRun(cfg, self.name, self.run_dir, ids.get("mlflow_run_id"))
                ids["mlflow_run_id"] = self._mlflow.run_id
            if cfg.wandb_project:
                self._wandb = _start_wandb(cfg, self.name, self.run_dir, ids.get("wandb_run_id"))
                ids["wandb_run_id"] = self._wandb.id
            if ids:
                from mttl.run_folder import atomic_write_text

                atomic_write_text(self.run_dir / TRACKING_FILE, json.dumps(ids, indent=2, sort_keys=True) + "\n")
        except BaseException:
            self.close()
            raise

    def _read_ids(self) -> dict:
        path = self.run_dir / TRACKING_FILE
        try:
            return json.loads(path.read_text()) if path.exists() else {}
        except json.JSONDecodeError:  # a damaged file only costs the link to the earlier tracked run
            return {}

    def log(self, row: dict) -> None:
        self._jsonl.write(json.dumps(row, sort_keys=True, default=str) + "\n")
        self._jsonl.flush()
        step = int(row.get("step", 0))
        scalars = tracked_scalars(row)
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(key, value, step)
            self._tensorboard.flush()
        if self._mlflow is not None:
            self._mlflow.log(scalars, step)
        if self._wandb is not None:
            # W&B's own step must only grow, but fine-tuning restarts `step` for each seed: log it as a
            # value and draw every chart against it (see define_metric in _start_wandb)
            self._wandb.log({"step": step, **scalars})

    def close(self) -> None:
        if not self._jsonl.closed:
            self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._mlflow is not None:
            self._mlflow.finish()
            self._mlflow = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def tracked_scalars(row: dict) -> dict[str, float]:
    """The finite numbers of a row under their tracked names (`seed<N>/` in front for a seed's row)."""
    prefix = f"seed{row['seed']}/" if "seed" in row else ""
    return {prefix + key: float(value) for key, value in row.items()
            if key not in ID_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value)}


def mlflow_name(key: str) -> str:
    """A metric name MLflow accepts: alphanumerics, '.', '-', '_' and spaces; '/' becomes '.' because
    MLflow's file store keeps each name as a file path, where `val_loss` and `val_loss/<task>` clash."""
    return "".join(c if c.isalnum() or c in "._- " else "." if c == "/" else "_" for c in key)


class _MlflowRun:
    """One MLflow run, through an explicit client (no process-wide active run: several loggers may coexist)."""

    def __init__(self, cfg: Config, name: str, run_dir: Path, run_id: str | None):
        from mlflow.exceptions import MlflowException

        uri = absolute_tracking_uri(cfg.mlflow_tracking_uri)
        if urlparse(uri).scheme == "file":
            # Setting a file: URI is the user's choice of the file store, which MLflow 3 otherwise refuses
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            self._start(cfg, uri, name, run_dir, run_id)
        except (MlflowException, OSError) as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise ConfigError(f"cannot log to MLflow at mlflow_tracking_uri={uri!r} ({reason}); fix the URI "
                              "(e.g. file:./mlruns or http://HOST:5000) or unset mlflow_tracking_uri") from None

    def _start(self, cfg: Config, uri: str, name: str, run_dir: Path, run_id: str | None) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = run_id if run_id and self._exists(run_id) else None
        if self.run_id is None:
            experiment = self.client.get_experiment_by_name(MLFLOW_EXPERIMENT)
            experiment_id = experiment.experiment_id if experiment else self._create_experiment()
            run = self.client.create_run(experiment_id, run_name=name, tags={"mttl.run_dir": str(run_dir.resolve())})
            self.run_id = run.info.run_id
            self.client.log_batch(self.run_id, params=[Param(k, str(v)[:MLFLOW_PARAM_CHARS])
                                                       for k, v in sorted(cfg.to_dict().items())])
        else:
            self.client.update_run(self.run_id, status="RUNNING")

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
            return True
        except MlflowException:  # the id belongs to another tracking store
            return False

    def _create_experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.create_experiment(MLFLOW_EXPERIMENT)
        except MlflowException:  # another process created it meanwhile
            return self.client.get_experiment_by_name(MLFLOW_EXPERIMENT).experiment_id

    def log(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(mlflow_name(k), v, now, step) for k, v in scalars.items()])

    def finish(self) -> None:
        self.client.set_terminated(self.run_id)


def _start_wandb(cfg: Config, name: str, run_dir: Path, run_id: str | None):
    """A W&B run filed under the run folder; WANDB_MODE (e.g. offline) and WANDB_API_KEY are W&B's own."""
    try:
        import wandb
    except ImportError:
        raise ConfigError(f"wandb_project={cfg.wandb_project!r} is set but the wandb package is not installed; "
                          "run pip install 'mttl[wandb]' or unset wandb_project") from None
    run = wandb.init(project=cfg.wandb_project, name=name, dir=str(run_dir), config=cfg.to_dict(),
                     id=run_id, resume="allow")
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run

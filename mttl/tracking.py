"""Metrics of a run: `metrics.jsonl` in the run folder, TensorBoard events, MLflow when configured.

`MetricsLogger(run_dir, cfg).log(row)` appends one JSON object per call (flushed at once, so a
killed run keeps every row it logged) and mirrors the numeric values to TensorBoard (and MLflow
when `mlflow_tracking_uri` is set), using `step` as the x axis. Pre-training and fine-tuning
both write through it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from mttl.config import Config

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    def __init__(self, run_dir: str | os.PathLike, cfg: Config):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")
        self._tensorboard = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        self._mlflow = None
        if cfg.mlflow_tracking_uri:
            import mlflow

            mlflow.set_tracking_uri(cfg.mlflow_tracking_uri)
            mlflow.set_experiment("mttl")
            mlflow.start_run(run_name=cfg.run_name or self.run_dir.name)
            mlflow.log_params({k: str(v)[:250] for k, v in cfg.to_dict().items()})
            self._mlflow = mlflow

    def log(self, row: dict) -> None:
        self._jsonl.write(json.dumps(row, sort_keys=True, default=str) + "\n")
        self._jsonl.flush()
        step = int(row.get("step", 0))
        scalars = {k: float(v) for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(key, value, step)
            self._tensorboard.flush()
        if self._mlflow is not None:
            # MLflow metric names allow '/', '.', '-', '_' and alphanumerics only
            self._mlflow.log_metrics({_mlflow_name(k): v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._mlflow is not None:
            self._mlflow.end_run()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _mlflow_name(key: str) -> str:
    return "".join(c if c.isalnum() or c in "/._- " else "_" for c in key)


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """All rows of a run's metrics.jsonl (a torn last line from a killed writer is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows

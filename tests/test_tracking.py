"""Tracking: MLflow (a local file store read back with MLflow's own client), Weights & Biases (offline
run files read back with W&B's record format), relative MLflow locations resolved on the driver, and
pre-training's Ray Train workers and fine-tuning reaching MLflow."""

from __future__ import annotations

import glob
import json
import struct
import sys
import time
from pathlib import Path

import pytest

from mttl.config import Config, load_config
from mttl.errors import ConfigError
from mttl.run_folder import read_metrics
from mttl.tracking import TRACKING_FILE, MetricsLogger, absolute_tracking_uri

ROWS = [
    {"step": 1, "loss": 2.5, "lr/adapters": 1e-3},
    {"step": 2, "loss": 2.0, "lr/adapters": 2e-3, "note": "text is not a metric"},
    {"step": 5, "loss": 1.5, "val_loss/caesar>reverse": 3.25},
]


def _cfg(**values) -> Config:
    return Config().update({"tensorboard": False, "learning_rate": 0.02, "run_name": "demo", **values}, source="test")


def _mlflow_client(store: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=store.as_uri())


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.fixture(autouse=True)
def allow_file_store(monkeypatch):
    # MLflow 3 refuses file stores unless opted in; the logger opts in for a file: URI, the test's reading client too
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


def test_relative_locations_become_absolute_against_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    here = tmp_path.resolve()
    assert absolute_tracking_uri("file:./mlruns") == "file://" + str(here / "mlruns")
    assert absolute_tracking_uri("file:mlruns") == "file://" + str(here / "mlruns")
    assert absolute_tracking_uri("mlruns") == "file://" + str(here / "mlruns")
    assert absolute_tracking_uri("sqlite:///mlflow.db") == "sqlite:///" + str(here / "mlflow.db")
    for unchanged in ("file:///srv/mlruns", "sqlite:////srv/mlflow.db", "http://127.0.0.1:5000", "databricks"):
        assert absolute_tracking_uri(unchanged) == unchanged
    # loading the config on the driver fixes the location; workers elsewhere get the absolute one
    cfg = load_config(None, ["mlflow_tracking_uri=file:./mlruns"])
    assert cfg.mlflow_tracking_uri == "file://" + str(here / "mlruns")
    monkeypatch.chdir("/")
    assert Config().update(cfg.to_dict()).mlflow_tracking_uri == cfg.mlflow_tracking_uri


def test_mlflow_file_store_holds_params_and_metric_histories(tmp_path):
    store = tmp_path / "mlruns"
    cfg = _cfg(mlflow_tracking_uri=f"file:{store}")
    with MetricsLogger(tmp_path / "run", cfg) as logger:
        for row in ROWS:
            logger.log(row)

    client = _mlflow_client(store)
    experiment = client.get_experiment_by_name("mttl")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.tags["mttl.run_dir"] == str((tmp_path / "run").resolve())
    assert run.data.params == {key: str(value)[:250] for key, value in cfg.to_dict().items()}
    assert _history(client, run.info.run_id, "loss") == [(1, 2.5), (2, 2.0), (5, 1.5)]
    # MLflow names: '/' becomes '.', characters MLflow refuses become '_'
    assert _history(client, run.info.run_id, "lr.adapters") == [(1, 1e-3), (2, 2e-3)]
    assert _history(client, run.info.run_id, "val_loss.caesar_reverse") == [(5, 3.25)]
    assert set(run.data.metrics) == {"loss", "lr.adapters", "val_loss.caesar_reverse"}
    assert read_metrics(tmp_path / "run") == ROWS  # the run folder keeps every row as logged


def test_an_unusable_mlflow_location_is_a_one_line_error(tmp_path):
    (tmp_path / "a_file").write_text("not a folder\n")
    for uri in (f"file:{tmp_path / 'a_file' / 'mlruns'}", "ftp://127.0.0.1/mlruns"):
        with pytest.raises(ConfigError) as err:
            MetricsLogger(tmp_path / "run", _cfg(mlflow_tracking_uri=uri))
        assert "\n" not in str(err.value) and "mlflow_tracking_uri=" in str(err.value)
        assert "unset mlflow_tracking_uri" in str(err.value)


def test_a_resumed_run_logs_into_the_same_mlflow_run(tmp_path):
    store = tmp_path / "mlruns"
    cfg = _cfg(mlflow_tracking_uri=f"file:{store}")
    with MetricsLogger(tmp_path / "run", cfg) as logger:
        logger.log({"step": 1, "loss": 3.0})
    with MetricsLogger(tmp_path / "run", cfg) as logger:  # e.g. Ray Train restarting after a failure
        logger.log({"step": 2, "loss": 2.0})
    client = _mlflow_client(store)
    [run] = client.search_runs([client.get_experiment_by_name("mttl").experiment_id])
    assert json.loads((tmp_path / "run" / TRACKING_FILE).read_text()) == {"mlflow_run_id": run.info.run_id}
    assert _history(client, run.info.run_id, "loss") == [(1, 3.0), (2, 2.0)]


def test_each_seed_is_its_own_series(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, _cfg(tensorboard=True)) as logger:
        for seed in (13, 42):
            for step in (1, 2):
                logger.log({"step": step, "seed": seed, "train/loss": seed + step / 10})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["seed13/train/loss", "seed42/train/loss"]
    assert [(e.step, e.value) for e in events.Scalars("seed42/train/loss")] == [(1, pytest.approx(42.1)),
                                                                               (2, pytest.approx(42.2))]


def _wandb_records(run_file: str) -> list:
    """Records of a W&B run file: a 7-byte header, then LevelDB-log chunks (7-byte header: CRC, length,
    type FULL=1/FIRST=2/MIDDLE=3/LAST=4) in 32 KiB blocks, each record a `Record` protobuf."""
    from wandb.proto import wandb_internal_pb2

    data = Path(run_file).read_bytes()
    block, position, pending, records = 32 * 1024, 7, b"", []
    while position + 7 <= len(data):
        room = block - position % block
        if room < 7:  # block trailer
            position += room
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if position + 7 + length > len(data):  # a chunk still being written
            break
        if kind == 0:  # zero padding up to the end of the block
            position += room
            continue
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_run_holds_config_and_history(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = _cfg(wandb_project="mttl-test")
    with MetricsLogger(tmp_path / "run", cfg) as logger:
        for row in ROWS:
            logger.log(row)

    [run_file] = glob.glob(str(tmp_path / "run" / "wandb" / "offline-run-*" / "run-*.wandb"))
    for _ in range(100):  # W&B's core process may still be writing the file when finish() returns
        records = _wandb_records(run_file)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.1)
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "mttl-test" and run.display_name == "run"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["learning_rate"] == 0.02 and config["run_name"] == "demo"
    history = [{item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [(h["step"], h["loss"]) for h in history] == [(1, 2.5), (2, 2.0), (5, 1.5)]
    assert [h["val_loss/caesar>reverse"] for h in history if "val_loss/caesar>reverse" in h] == [3.25]
    assert [(h["step"], h["lr/adapters"]) for h in history if "lr/adapters" in h] == [(1, 1e-3), (2, 2e-3)]
    assert json.loads((tmp_path / "run" / TRACKING_FILE).read_text())["wandb_run_id"] == run.run_id


def test_wandb_missing_is_a_one_line_error_naming_the_key_and_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` sees when it is not installed
    with pytest.raises(ConfigError) as err:
        MetricsLogger(tmp_path, _cfg(wandb_project="mttl"))
    message = str(err.value)
    assert "\n" not in message and "wandb_project='mttl'" in message
    assert "pip install 'mttl[wandb]'" in message and "unset wandb_project" in message


def test_finetuning_reaches_mlflow(tmp_path):
    from mttl.cli import main
    from test_finetune import FAST, make_checkpoint

    from mttl.data.shards import read_manifest
    from mttl.data.synthetic import prepare_synthetic

    data = tmp_path / "synthetic"
    prepare_synthetic(data, seed=0, n_heldout=2, rows_per_task=16, warmup_rows_per_task=8, validation_rows=4,
                      heldout_pool=32, heldout_validation=8, heldout_test=8)
    task = sorted(t for t, m in read_manifest(data)["tasks"].items() if m["role"] == "test")[0]
    checkpoint = make_checkpoint(tmp_path, data, "poly")
    store = tmp_path / "mlruns"
    assert main(["finetune", "-k", f"checkpoint={checkpoint}", f"finetune_task_name={task}", "finetune_type=Z",
                 f"output_dir={tmp_path}", "run_name=ft", f"mlflow_tracking_uri=file:{store}", "do_zs=False",
                 *FAST]) == 0

    client = _mlflow_client(store)
    [run] = client.search_runs([client.get_experiment_by_name("mttl").experiment_id])
    assert run.info.run_name == "ft" and run.data.params["finetune_type"] == "Z"
    rows = read_metrics(tmp_path / "ft")
    for key in ("train/loss", "val/exact_match"):
        expected = sorted((r["step"], r[key]) for r in rows if key in r)
        assert expected and _history(client, run.info.run_id, "seed13." + key.replace("/", ".")) == expected


@pytest.mark.slow
def test_pretraining_workers_log_once_to_a_relative_store_of_the_driver(tmp_path, monkeypatch, ray_cluster):
    from mttl.data.synthetic import prepare_synthetic
    from mttl.train.loop import pretrain
    from train_support import tiny_config, train_rows

    prepare_synthetic(tmp_path / "synthetic", seed=0, rows_per_task=32, warmup_rows_per_task=8, validation_rows=8,
                      heldout_pool=8, heldout_validation=4, heldout_test=4)
    monkeypatch.chdir(tmp_path)  # the driver's folder; Ray Train workers run in folders of their own
    cfg = tiny_config(tmp_path / "synthetic", tmp_path / "runs", "tracked", num_workers=2, total_steps=4,
                      eval_every=4, save_every=4, warmup_steps=1, mlflow_tracking_uri="file:./mlruns")
    run_dir = pretrain(cfg)

    client = _mlflow_client(tmp_path / "mlruns")
    [run] = client.search_runs([client.get_experiment_by_name("mttl").experiment_id])  # rank 0 only
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    expected = [(r["step"], r["loss"]) for r in train_rows(run_dir)]
    assert len(expected) == cfg.total_steps
    assert _history(client, run.info.run_id, "loss") == expected
    validation = [(r["step"], r["val_loss"]) for r in read_metrics(run_dir) if "val_loss" in r]
    assert validation and _history(client, run.info.run_id, "val_loss") == validation

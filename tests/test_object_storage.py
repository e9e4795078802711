"""Runs and data in object storage: every command on `s3://` URIs, against a real S3 server on 127.0.0.1.

The module starts moto's S3 server itself (a real HTTP server, spoken to by pyarrow's S3 client as
any bucket would be), puts fake credentials and its endpoint into the environment and creates a
bucket. Then: `mttl prepare` into the bucket, pre-training of 2 workers with output_dir and data_dir
in the bucket, a worker killed after a checkpoint and the run resumed from the bucket, the run
continued by run_name from the bucket, fine-tuning and export reading the run from the bucket.
Nothing may be written to a local path but caches, and the secret key never lands in a file.
The tests run as that story, in order; a test selected alone gets the prepared data and the run
`pre` from module fixtures (`bucket_data`, `bucket_run`) instead of from the tests before it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from mttl import storage
from mttl.cli import main
from train_support import TASKS, kill_a_worker_after_a_checkpoint, tiny_config

pytestmark = pytest.mark.slow

BUCKET = "mttl-test"
SECRET = "s3cr3t-never-in-a-file-0123456789"
DATA = f"s3://{BUCKET}/data/synthetic"
RUNS = f"s3://{BUCKET}/runs"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free loopback port, the AWS_* variables naming it, and one bucket."""
    import boto3  # both come with moto[server], a test dependency: a missing one fails, never skips
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing-key", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> Path:
    """The only local folder the commands get: their cache_dir."""
    return tmp_path_factory.mktemp("s3_local")


def _rows(uri: str) -> list[dict]:
    data = storage.read_bytes(uri)
    return [json.loads(line) for line in (data or b"").decode().splitlines() if line.strip()]


def _registered_steps(run_uri: str) -> list[int]:
    data = storage.read_bytes(storage.join(run_uri, "checkpoint_manager_snapshot.json"))
    try:
        return sorted(r["metrics"]["step"] for r in json.loads(data)["checkpoint_results"]) if data else []
    except (json.JSONDecodeError, KeyError):
        return []


def _local_files_outside_cache(local: Path) -> list[str]:
    """Files under `local` but outside its cache/ (and report/: `mttl report --out` is a local folder)."""
    return sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()
                  and p.relative_to(local).parts[0] not in ("cache", "report"))


def _pretrain_config(local: Path, **overrides):
    keys = dict(total_steps=12, save_every=4, eval_every=None, log_every=2, num_to_keep=2, max_failures=1)
    cfg = tiny_config(Path("unused"), Path("unused"), "pre", **{**keys, **overrides})
    # strings, not Paths: a URI is no local path
    return cfg.update({"data_dir": DATA, "output_dir": RUNS, "cache_dir": str(local / "cache")}, source="test")


PREPARE = ["prepare", "synthetic", "--out", DATA, "--rows-per-task", "16", "--warmup-rows-per-task", "8",
           "--validation-rows", "4", "--heldout-pool", "32", "--heldout-validation", "8", "--heldout-test", "8"]


@pytest.fixture(scope="module")
def bucket_data(s3):
    """The prepared suite in the bucket. The tests below are one story in order (prepare, pre-train with
    a killed worker, continue, ...) and this is normally the first test's work; run alone, a later
    test gets it here."""
    if storage.read_bytes(f"{DATA}/manifest.json") is None:
        assert main(PREPARE) == 0
    return DATA


@pytest.fixture(scope="module")
def bucket_run(bucket_data, local, ray_cluster):
    """The pre-trained run `pre` in the bucket (the killed-worker test's, when it ran first)."""
    run_uri = f"{RUNS}/pre"
    if storage.read_bytes(f"{run_uri}/final/{storage.COMPLETE}") is None:
        from mttl.train.loop import pretrain

        pretrain(_pretrain_config(local))
    return run_uri


def test_prepare_into_the_bucket(s3, local, capsys):
    started = time.perf_counter()
    assert main(PREPARE) == 0
    files = storage.list_files(DATA)
    assert "manifest.json" in files and any(f.endswith(".parquet") for f in files)
    manifest = json.loads(storage.read_bytes(storage.join(DATA, "manifest.json")))
    assert sorted(f["path"] for f in manifest["files"]) == sorted(f for f in files if f.endswith(".parquet"))
    assert set(TASKS) <= set(manifest["tasks"])
    # the same command again finds the bucket's manifest unchanged and writes nothing
    assert main(PREPARE) == 0
    assert main(["prepare", "check", DATA]) == 0
    assert f"ok: {DATA}:" in capsys.readouterr().out
    shard = f"{DATA}/{manifest['files'][0]['path']}"
    whole = storage.read_bytes(shard)
    storage.write_bytes(shard, whole[:-10])  # a shard changed in the bucket after it was prepared
    try:
        assert main(["prepare", "check", DATA]) == 1
        assert manifest["files"][0]["path"] in capsys.readouterr().err
    finally:
        storage.write_bytes(shard, whole)
    assert _local_files_outside_cache(local) == []
    print(f"prepare into the bucket: {time.perf_counter() - started:.1f} s")


def test_pretrain_in_the_bucket_survives_a_killed_worker(bucket_data, local, ray_cluster):
    run_uri = f"{RUNS}/pre"
    cfg = _pretrain_config(local)
    killed_after = kill_a_worker_after_a_checkpoint(cfg, lambda: _registered_steps(run_uri), timeout=300)

    files = storage.list_files(run_uri)
    assert {"config.json", "tasks.json", "metrics.jsonl", "final/_COMPLETE", "final/adapters.safetensors",
            "logs/internal.log"} <= set(files)
    assert any(f.startswith("checkpoint_") for f in files)
    rows = _rows(f"{run_uri}/metrics.jsonl")
    resumed = [r["resumed_from_step"] for r in rows if "resumed_from_step" in r]
    assert resumed and killed_after <= resumed[0] < 12
    assert max(r["step"] for r in rows if "loss" in r) == 12
    saved = json.loads(storage.read_bytes(f"{run_uri}/config.json"))
    assert saved["data_dir"] == DATA and saved["output_dir"] == RUNS
    assert _local_files_outside_cache(local) == []


def test_a_run_continues_by_run_name_from_the_bucket(bucket_run, local, ray_cluster):
    from mttl.train.loop import pretrain

    run_uri = f"{RUNS}/pre"
    assert _registered_steps(run_uri)[-1] == 12
    # this machine's copies are gone (another machine, a cleaned cache): the bucket is all there is
    import shutil

    shutil.rmtree(local / "cache" / "storage", ignore_errors=True)
    pretrain(_pretrain_config(local, total_steps=16))
    rows = _rows(f"{run_uri}/metrics.jsonl")
    assert [r["resumed_from_step"] for r in rows if "resumed_from_step" in r][-1] == 12
    assert max(r["step"] for r in rows if "loss" in r) == 16
    assert _registered_steps(run_uri)[-1] == 16
    assert _local_files_outside_cache(local) == []


def test_a_damaged_latest_checkpoint_in_the_bucket_falls_back_to_the_one_before(bucket_run, local, ray_cluster):
    """The newest registered checkpoint truncated in the bucket (an upload cut off): the resume skips
    it, downloads the previous one and continues from there, as it does for a local run; with
    tensorboard=True its events reach the bucket."""
    from mttl.train.loop import pretrain

    run_uri = f"{RUNS}/pre"
    if _registered_steps(run_uri)[-1] == 12:  # run without the continuation test before it: its 4 steps
        pretrain(_pretrain_config(local, total_steps=16))
    assert _registered_steps(run_uri)[-2:] == [12, 16]
    snapshot = json.loads(storage.read_bytes(f"{run_uri}/checkpoint_manager_snapshot.json"))
    latest = snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
    state_file = sorted(f for f in storage.list_files(f"{run_uri}/{latest}") if f.endswith(".pt"))[0]
    whole = storage.read_bytes(f"{run_uri}/{latest}/{state_file}")
    storage.write_bytes(f"{run_uri}/{latest}/{state_file}", whole[:200])

    pretrain(_pretrain_config(local, total_steps=20, tensorboard=True))
    rows = _rows(f"{run_uri}/metrics.jsonl")
    fallback = [r for r in rows if "resumed_from_step" in r][-1]
    assert fallback["resumed_from_step"] == 12
    skipped = fallback["skipped_damaged_checkpoints"]
    assert len(skipped) == 1 and latest in skipped[0] and Path(state_file).name in skipped[0]
    assert max(r["step"] for r in rows if "loss" in r) == 20 and _registered_steps(run_uri)[-1] == 20
    # the TensorBoard events are in the bucket too, not only in the worker's local copy
    events = [f for f in storage.list_files(f"{run_uri}/tensorboard") if "tfevents" in f]
    assert events and all(storage.read_bytes(f"{run_uri}/tensorboard/{f}") for f in events)
    assert _local_files_outside_cache(local) == []


def test_finetune_and_export_read_the_run_from_the_bucket(bucket_run, local):
    manifest = json.loads(storage.read_bytes(f"{DATA}/manifest.json"))
    task = sorted(t for t, m in manifest["tasks"].items() if m["role"] == "test")[0]
    assert main(["finetune", "-k", f"checkpoint={RUNS}/pre", f"finetune_task_name={task}", f"output_dir={RUNS}",
                 "run_name=ft", f"cache_dir={local / 'cache'}", "seeds=[13]", "total_steps=2", "train_batch_size=4",
                 "eval_every_epochs=1", "num_shots=8", "num_beams=1", "predict_batch_size=16", "tensorboard=False",
                 "log_every=1"]) == 0
    rows = _rows(f"{RUNS}/ft/results.jsonl")
    assert [r["evaluation"] for r in rows] == ["zero_shot", "best_val", "test"] and {r["task"] for r in rows} == {task}
    assert {"config.json", "metrics.jsonl", "results.csv"} <= set(storage.list_files(f"{RUNS}/ft"))
    assert main(["evaluate", "-k", f"checkpoint={RUNS}/pre", f"tasks=['{task}']", f"output_dir={RUNS}",
                 "run_name=zs", f"cache_dir={local / 'cache'}", "num_beams=1", "predict_batch_size=16"]) == 0
    assert [(r["task"], r["evaluation"]) for r in _rows(f"{RUNS}/zs/results.jsonl")] == [(task, "zero_shot")]

    os.environ["CACHE_DIR"] = str(local / "cache")  # export's and report's cache: they take no -k keys
    try:
        assert main(["export", f"{RUNS}/pre", "--format", "peft", "--out", f"s3://{BUCKET}/exports/pre_peft"]) == 0
        # an output_dir URI: every run under it is reported
        assert main(["report", RUNS, "--out", str(local / "report")]) == 0
    finally:
        os.environ.pop("CACHE_DIR")
    report = (local / "report" / "report.md").read_text()
    assert task in report  # the fine-tuning results, read from the bucket
    exported = storage.list_files(f"s3://{BUCKET}/exports/pre_peft")
    assert "adapter_config.json" in exported and "_COMPLETE" in exported
    assert _local_files_outside_cache(local) == []


def test_several_tasks_fan_out_from_and_into_the_bucket(bucket_run, local, tmp_path):
    """tasks=[...]: every task x seed a Ray task reading checkpoint and data from the bucket; the run
    folder is in the bucket, its results uploaded after each pair, and a rerun skips finished pairs.

    `mttl finetune` runs as its own process with its own Ray cluster, as a user's would: Ray tasks
    get the bucket's credentials from their node's environment (never through Ray's runtime env,
    which the dashboard shows), and this session's cluster started before the fixture set them."""
    import subprocess
    import sys

    manifest = json.loads(storage.read_bytes(f"{DATA}/manifest.json"))
    tasks = sorted(t for t, m in manifest["tasks"].items() if m["role"] == "test")[:2]
    argv = [sys.executable, "-m", "mttl.cli", "finetune", "-k", f"checkpoint={RUNS}/pre", f"tasks={tasks}",
            f"output_dir={RUNS}", "run_name=fan", f"cache_dir={local / 'cache'}", "seeds=[13]", "total_steps=2",
            "train_batch_size=4", "eval_every_epochs=1", "num_shots=8", "num_beams=1", "predict_batch_size=16",
            "tensorboard=False", "log_every=1"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}

    def run():
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]

    run()
    rows = _rows(f"{RUNS}/fan/results.jsonl")
    assert sorted({(r["task"], r["seed"]) for r in rows if r["evaluation"] == "test"}) == [(t, 13) for t in tasks]
    assert {"config.json", "metrics.jsonl", "results.csv"} <= set(storage.list_files(f"{RUNS}/fan"))
    assert {r["task"] for r in _rows(f"{RUNS}/fan/metrics.jsonl")} == set(tasks)
    # another machine (no local copy): the bucket's results say both pairs are done
    import shutil

    shutil.rmtree(local / "cache" / "storage" / "s3" / BUCKET / "runs" / "fan")
    run()
    assert _rows(f"{RUNS}/fan/results.jsonl") == rows
    assert _local_files_outside_cache(local) == []


def test_a_sweep_runs_in_and_resumes_from_the_bucket(bucket_run, local, tmp_path):
    """output_dir=s3://...: the sweep folder (results, best.json, summary, each study's Tune state and
    trial folders) ends in the bucket; run again on another machine (no local mirror), the study is
    restored from the bucket's Tune state and no finished trial runs again. Its own process and Ray
    cluster, for the credentials (see the fan-out test above)."""
    import shutil
    import subprocess
    import sys

    manifest = json.loads(storage.read_bytes(f"{DATA}/manifest.json"))
    task = sorted(t for t, m in manifest["tasks"].items() if m["role"] == "test")[0]
    argv = [sys.executable, "-m", "mttl.cli", "sweep", "-k", f"checkpoint={RUNS}/pre", f"tasks=['{task}']",
            "search=grid", f"output_dir={RUNS}", "run_name=sw", f"cache_dir={local / 'cache'}", "seeds=[13]",
            "total_steps=2", "train_batch_size=4", "eval_every_epochs=1", "num_shots=8", "num_beams=1",
            "predict_batch_size=16", "tensorboard=False", "max_concurrent_trials=1"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}

    def run() -> str:
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    out = run()
    assert f"results: {RUNS}/sw/results.csv" in out
    from mttl.run_folder import safe_name

    files = set(storage.list_files(f"{RUNS}/sw"))
    study = safe_name(task)  # the study's folder
    assert {"config.json", "results.csv", "summary.md", f"{study}/best.json"} <= files
    assert any(f.startswith(f"{study}/experiment_state") for f in files)
    trial_results = sorted(f for f in files if f.endswith("/result.json"))
    rows = storage.read_bytes(f"{RUNS}/sw/results.csv").decode().splitlines()
    assert len(trial_results) == len(rows) - 1 >= 2  # one trial per grid point, each with its folder
    reported = {f: storage.read_bytes(f"{RUNS}/sw/{f}") for f in trial_results}

    shutil.rmtree(local / "cache" / "storage" / "s3" / BUCKET / "runs" / "sw")  # another machine
    run()
    after = set(storage.list_files(f"{RUNS}/sw"))
    assert sorted(f for f in after if f.endswith("/result.json")) == trial_results  # no trial ran again
    assert {f: storage.read_bytes(f"{RUNS}/sw/{f}") for f in trial_results} == reported
    assert storage.read_bytes(f"{RUNS}/sw/results.csv").decode().splitlines() == rows
    # the report of the bucket's runs has the sweep's best trial
    os.environ["CACHE_DIR"] = str(local / "cache")  # report's cache: it takes no -k keys
    try:
        assert main(["report", f"{RUNS}/sw", "--out", str(tmp_path / "report")]) == 0
    finally:
        os.environ.pop("CACHE_DIR")
    best = (tmp_path / "report" / "sweep_best.csv").read_text()
    assert "sw" in best and task in best
    assert _local_files_outside_cache(local) == []


def test_the_two_phase_default_runs_in_the_bucket(bucket_data, local, tmp_path):
    """No -k model: phase one trains the tiny backbone into the bucket, phase two names that backbone by
    its URI (no local path in its config.json), and a reader on another machine (no local copies)
    fine-tunes from phase two, copying the backbone down itself."""
    import shutil
    import subprocess
    import sys

    tiny = ["num_workers=1", "tiny_d_model=32", "tiny_num_layers=1", "train_batch_size=8", "max_input_length=16",
            "max_output_length=16", "total_steps=2", "save_every=2", "eval_every=None", "log_every=1",
            "tensorboard=False"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}

    def run(*argv):
        done = subprocess.run([sys.executable, "-m", "mttl.cli", *argv], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]

    run("pretrain", "-k", f"data_dir={DATA}", f"output_dir={RUNS}", "run_name=two", f"cache_dir={local / 'cache'}",
        *tiny)
    backbone = f"{RUNS}/two-backbone/final/backbone"
    assert "config.json" in storage.list_files(backbone)
    assert "_COMPLETE" in storage.list_files(f"{RUNS}/two/final")
    assert json.loads(storage.read_bytes(f"{RUNS}/two/config.json"))["model"] == backbone

    shutil.rmtree(local / "cache" / "storage")  # another machine
    manifest = json.loads(storage.read_bytes(f"{DATA}/manifest.json"))
    task = sorted(t for t, m in manifest["tasks"].items() if m["role"] == "test")[0]
    run("finetune", "-k", f"checkpoint={RUNS}/two", f"finetune_task_name={task}", f"output_dir={RUNS}",
        "run_name=two_ft", f"cache_dir={local / 'cache'}", "seeds=[13]", "total_steps=2", "train_batch_size=4",
        "eval_every_epochs=1", "num_shots=8", "num_beams=1", "predict_batch_size=16", "tensorboard=False")
    assert [r["evaluation"] for r in _rows(f"{RUNS}/two_ft/results.jsonl")] == ["zero_shot", "best_val", "test"]
    assert (local / "cache" / "storage" / "s3" / BUCKET / "runs" / "two-backbone" / "final" / "backbone"
            / "config.json").is_file()
    assert _local_files_outside_cache(local) == []


def test_half_uploaded_folders_are_not_taken_for_whole_ones(bucket_run, local):
    from mttl.config import Config
    from mttl.data.locate import resolve_data_dir
    from mttl.errors import CheckpointError, DataError
    from mttl.models.run import resolve_run_dir

    half = f"s3://{BUCKET}/half"
    # a run whose final/ upload stopped before its marker, and shards whose manifest never came
    storage.write_bytes(f"{half}/run/config.json", storage.read_bytes(f"{RUNS}/pre/config.json"))
    storage.write_bytes(f"{half}/run/final/adapters.safetensors", b"partial")
    storage.write_bytes(f"{half}/data/train/part-00000.parquet", b"partial")
    cfg = Config().update({"checkpoint": f"{half}/run", "cache_dir": str(local / "cache")})
    with pytest.raises(CheckpointError, match="has no final/ yet"):
        resolve_run_dir(cfg.checkpoint_path())
    with pytest.raises(DataError, match=f"{half}/data/manifest.json not found"):
        resolve_data_dir(Config().update({"data_dir": f"{half}/data", "cache_dir": str(local / "cache")}))
    # the marker written last makes the same folder whole
    storage.upload_folder(local / "cache" / "storage" / "s3" / BUCKET / "runs" / "pre" / "final", f"{half}/run/final")
    assert (Path(storage.local_run_copy(f"{half}/run", local / "other", folders=("final",))) / "final").is_dir()


class _CountingS3:
    """The real S3 filesystem, recording the largest single read and write its streams see."""

    def __init__(self):
        self.fs, _ = storage.filesystem(f"s3://{BUCKET}")
        self.largest = {"read": 0, "write": 0}

    def __getattr__(self, name):
        return getattr(self.fs, name)

    def open_output_stream(self, path, *args, **kwargs):
        return _CountingStream(self.fs.open_output_stream(path, *args, **kwargs), self.largest)

    def open_input_stream(self, path, *args, **kwargs):
        return _CountingStream(self.fs.open_input_stream(path, *args, **kwargs), self.largest)


class _CountingStream:
    def __init__(self, stream, largest):
        self.stream, self.largest = stream, largest

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.stream.__exit__(*exc)

    def write(self, data):
        self.largest["write"] = max(self.largest["write"], len(data))
        return self.stream.write(data)

    def read(self, size=-1):
        data = self.stream.read() if size is None or size < 0 else self.stream.read(size)
        self.largest["read"] = max(self.largest["read"], len(data))
        return data


def test_large_files_stream_through_without_being_held_whole(s3, tmp_path):
    """A checkpoint shard of many GB must not be read into memory to upload or download it: a file of
    three chunks goes up and comes back byte for byte, moved one chunk at a time each way."""
    payload = os.urandom(3 * storage.CHUNK + 123)
    (tmp_path / "up").mkdir()
    (tmp_path / "up" / "shard.bin").write_bytes(payload)
    uri = f"s3://{BUCKET}/streamed"
    fs = _CountingS3()
    storage.upload_folder(tmp_path / "up", uri, fs=fs)
    storage.download_folder(uri, tmp_path / "down", fs=fs)
    assert (tmp_path / "down" / "shard.bin").read_bytes() == payload
    assert sorted(storage.list_files(uri)) == [storage.COMPLETE, "shard.bin"]
    assert 0 < fs.largest["write"] <= storage.CHUNK and 0 < fs.largest["read"] <= storage.CHUNK, fs.largest
    assert not list((tmp_path / "down").glob(".*tmp*"))  # the temp file was renamed into place


def test_the_secret_key_is_in_no_file(bucket_run, local, ray_cluster):
    secret = SECRET.encode()
    objects = storage.list_files(f"s3://{BUCKET}")
    assert len(objects) > 20
    leaked = [o for o in objects if secret in (storage.read_bytes(f"s3://{BUCKET}/{o}") or b"")]
    # this machine's copies and logs, and the logs of the Ray cluster the runs used
    logs = Path(ray_cluster._private.worker._global_node.get_session_dir_path()) / "logs"
    for folder in (local, logs):
        leaked += [str(p) for p in folder.rglob("*") if p.is_file() and secret in p.read_bytes()]
    assert leaked == []


def test_bad_buckets_and_endpoints_are_one_line_errors(bucket_run, local, capsys, monkeypatch):
    assert main(["prepare", "synthetic", "--out", "s3://no-such-bucket/data"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no-such-bucket" in err and "does not exist" in err and len(err.splitlines()) == 1
    assert main(["pretrain", "-k", "output_dir=s3://no-such-bucket/runs", "run_name=x", "model=tiny-t5",
                 "tokenizer=byte", "total_steps=2", f"data_dir={DATA}", f"cache_dir={local / 'cache'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "s3://no-such-bucket/runs" in err and len(err.splitlines()) == 1
    assert main(["sweep", "-k", "output_dir=s3://no-such-bucket/runs", f"checkpoint={RUNS}/pre",
                 f"cache_dir={local / 'cache'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no-such-bucket" in err and "does not exist" in err and len(err.splitlines()) == 1
    # the quick start (a local demo) cannot write to a bucket and says so before doing anything
    assert main(["quickstart", "-k", f"output_dir={RUNS}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "mttl quickstart writes its run folder to a local output_dir only" in err and len(err.splitlines()) == 1
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    assert main(["finetune", "-k", f"checkpoint={RUNS}/pre", "finetune_task_name=t",
                 f"cache_dir={local / 'cache' / 'other'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"cannot reach {RUNS}/pre" in err and "AWS_ENDPOINT_URL" in err and len(err.splitlines()) == 1
    assert SECRET not in err

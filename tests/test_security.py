"""Security and nothing left behind: code from folders others can write never runs, failures leave no files.

- A run folder's config.json cannot turn `trust_remote_code` on: export, evaluate, finetune and
  sweep load a backbone folder whose planted Python would write a marker, and it never runs.
- A sweep resumes only from Ray Tune state this user's mttl signed: a planted `tuner.pkl` is
  refused in one line before it is unpickled; damaged state is one line, not a traceback.
- A failed `mttl finetune` writes nothing; a killed `mttl prepare` leaves no temporary folder for good.
- Audit: no unpickling outside Tune's verified state, no `trust_remote_code=True`, no credentials in
  the files of a fine-tuning run.
"""

from __future__ import annotations

import ast
import csv
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mttl.cli import main
from mttl.config import Config
from test_finetune import FAST, make_checkpoint

REPO = Path(__file__).resolve().parent.parent
PLANTED_CODE = '''
import pathlib

pathlib.Path({marker!r}).write_text("planted code ran")

from transformers import PretrainedConfig, PreTrainedModel


class PlantedConfig(PretrainedConfig):
    model_type = "mttl_planted"


class PlantedModel(PreTrainedModel):
    config_class = PlantedConfig
'''


def plant_backbone(folder: Path, marker: Path) -> None:
    """A save_pretrained-looking folder whose config.json points `auto_map` at its own Python files."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "mttl_planted", "auto_map": {
        "AutoConfig": "configuration_planted.PlantedConfig",
        "AutoModelForSeq2SeqLM": "modeling_planted.PlantedModel"}}))
    for name in ("configuration_planted.py", "modeling_planted.py"):
        (folder / name).write_text(PLANTED_CODE.format(marker=str(marker)))


class PlantedPickle:
    """Unpickling it writes `marker`: what a planted Tune state file could do."""

    def __init__(self, marker: Path):
        self.marker = Path(marker)

    def __reduce__(self):
        return Path.write_text, (self.marker, "planted pickle ran")


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mttl: error:"), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from mttl.data.shards import read_manifest
    from mttl.data.synthetic import prepare_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    prepare_synthetic(out, seed=0, n_heldout=2, rows_per_task=16, warmup_rows_per_task=8, validation_rows=4,
                      heldout_pool=32, heldout_validation=8, heldout_test=8)
    held_out = sorted(t for t, m in read_manifest(out)["tasks"].items() if m["role"] == "test")
    return out, held_out[0]


@pytest.fixture(scope="module")
def healthy_run(tmp_path_factory, synthetic):
    return make_checkpoint(tmp_path_factory.mktemp("runs"), synthetic[0], "poly")


@pytest.fixture(autouse=True)
def state_key(tmp_path, monkeypatch):
    """Each test signs sweep state with its own key, not the user's."""
    path = tmp_path / "keys" / "sweep-state.key"
    monkeypatch.setenv("MTTL_STATE_KEY_FILE", str(path))
    return path


# ------------------------------------------------------------------ 1. trust_remote_code
@pytest.fixture
def planted_run(tmp_path, healthy_run):
    """A finished run whose final/backbone/ carries planted code and whose config.json asks to trust it."""
    run = tmp_path / "handed_over_run"
    shutil.copytree(healthy_run, run)
    marker = tmp_path / "planted_code_ran"
    shutil.rmtree(run / "final" / "backbone")
    plant_backbone(run / "final" / "backbone", marker)
    saved = json.loads((run / "config.json").read_text())
    saved["trust_remote_code"] = True
    saved["_overridden"] = sorted({*saved["_overridden"], "trust_remote_code"})
    (run / "config.json").write_text(json.dumps(saved))
    return run, marker


def test_run_folder_config_cannot_turn_on_remote_code(tmp_path, planted_run, synthetic, capsys):
    run, marker = planted_run
    out = tmp_path / "out"
    commands = {
        "export": ["export", str(run), "--format", "peft", "--out", str(out / "export")],
        "evaluate": ["evaluate", "-k", f"checkpoint={run}", f"output_dir={out}", "run_name=ev"],
        "finetune": ["finetune", "-k", f"checkpoint={run}", f"finetune_task_name={synthetic[1]}", f"output_dir={out}",
                     "run_name=ft", "finetune_type=Z", *FAST],
    }
    for command, argv in commands.items():
        assert main(argv) == 2, command
        assert "contains custom code" in _one_error_line(capsys), command
        assert not marker.exists(), f"{command} ran the backbone folder's code"
    assert not out.exists()  # none of them wrote anything


def test_security_keys_come_only_from_the_users_own_keys(planted_run):
    from mttl.finetune.types import checkpoint_finetune_config
    from mttl.sweep import sweep_base_config

    run, _ = planted_run
    saved = Config.load(run / "config.json")
    assert saved.trust_remote_code is False and not saved.was_overridden("trust_remote_code")
    asked = {"checkpoint": str(run), "finetune_type": "Z", "tune_space": "poly_z"}
    assert checkpoint_finetune_config(Config().update(asked)).trust_remote_code is False
    assert sweep_base_config(Config().update(asked))[0].trust_remote_code is False
    # the user's own -k still decides, for this command
    assert sweep_base_config(Config().update({**asked, "trust_remote_code": True}))[0].trust_remote_code is True


def test_the_planted_code_is_real_and_runs_when_the_user_trusts_it(tmp_path, planted_run):
    """The control: `mttl export --trust-remote-code` (the user's own flag) does import the planted modules."""
    run, marker = planted_run
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}  # not the user's module cache
    subprocess.run([sys.executable, "-m", "mttl.cli", "export", str(run), "--format", "peft", "--out",
                    str(tmp_path / "export"), "--trust-remote-code"], env=env, capture_output=True, timeout=300)
    assert marker.read_text() == "planted code ran"


def test_saved_config_does_not_expand_the_environment(tmp_path, monkeypatch):
    """`$VAR` in a handed-over config.json would copy this shell's secrets into every config saved from it."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-5678")
    (tmp_path / "config.json").write_text(json.dumps({"tokenizer": "/data/$AWS_SECRET_ACCESS_KEY",
                                                      "data_dir": "${AWS_SECRET_ACCESS_KEY}/shards"}))
    cfg = Config.load(tmp_path / "config.json")
    assert (cfg.tokenizer, cfg.data_dir) == ("/data/$AWS_SECRET_ACCESS_KEY", "${AWS_SECRET_ACCESS_KEY}/shards")
    assert "aws-secret" not in cfg.save(tmp_path / "saved").read_text()
    assert Config().update({"data_dir": "$AWS_SECRET_ACCESS_KEY"}).data_dir == "aws-secret-5678"  # -k: the user's own


# --------------------------------------------------------------------------- 2. sweep state
def test_state_signatures_refuse_what_this_user_did_not_sign(tmp_path, state_key, monkeypatch):
    from mttl.errors import CheckpointError, ConfigError
    from mttl.sweep_state import SIGNATURES_FILE, adopt_state, sign_files, state_files, verify_state

    study = tmp_path / "study"
    study.mkdir()
    (study / "tuner.pkl").write_bytes(pickle.dumps({"trainable": "x"}))
    (study / "experiment_state-2026.json").write_text('{"trial_data": []}')
    (study / "best.json").write_text("{}")  # not Tune state: never read back as a pickle
    with pytest.raises(CheckpointError, match=f"{SIGNATURES_FILE} missing.*trust_sweep_state=True"):
        verify_state(study)
    sign_files(study, state_files(study))
    assert state_key.stat().st_mode & 0o777 == 0o600
    verify_state(study)
    (study / "tuner.pkl").write_bytes(pickle.dumps({"trainable": "y"}))  # a later save, signed as saved
    sign_files(study, [study / "tuner.pkl"])
    verify_state(study)
    (study / "searcher-state-2027.pkl").write_bytes(pickle.dumps(PlantedPickle(tmp_path / "marker")))
    with pytest.raises(CheckpointError, match="searcher-state-2027.pkl' is not a file mttl saved"):
        verify_state(study)
    (study / "searcher-state-2027.pkl").unlink()
    (study / "anything.pkl").write_bytes(b"")  # any other pickle too
    with pytest.raises(CheckpointError, match="anything.pkl"):
        verify_state(study)
    (study / "anything.pkl").unlink()
    verify_state(study)

    other = tmp_path / "other-machine.key"  # the same folder seen with another user's key
    monkeypatch.setenv("MTTL_STATE_KEY_FILE", str(other))
    with pytest.raises(CheckpointError, match="another mttl key"):
        verify_state(study)
    adopt_state(study)  # -k trust_sweep_state=True
    verify_state(study)
    other.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        verify_state(study)


def _sweep_argv(tmp_path: Path, run: Path, task: str) -> list[str]:
    space = tmp_path / "space.py"
    space.write_text('FINETUNE_TYPE = "Z"\nGRID = [{"module_logits_learning_rate": 0.1}]\n\n\n'
                     'def space(trial):\n'
                     '    rate = trial.suggest_float("module_logits_learning_rate", 0.01, 1.0, log=True)\n'
                     '    return {"module_logits_learning_rate": rate}\n')
    return ["sweep", "-k", f"checkpoint={run}", f"tune_space={space}", "num_samples=1", f"output_dir={tmp_path}",
            "run_name=sw", f"tasks=['{task}']", "seeds=[13]", "total_steps=2", "train_batch_size=4",
            "eval_every_epochs=1", "num_shots=8", "num_beams=1", "predict_batch_size=16", "tensorboard=False",
            "max_concurrent_trials=1"]


def test_sweep_resumes_only_the_state_it_signed(ray_cluster, tmp_path, healthy_run, synthetic, capsys):
    from mttl.run_folder import safe_name

    argv = _sweep_argv(tmp_path, healthy_run, synthetic[1])
    assert main(argv) == 0
    assert main(argv) == 0  # its own signed state: restored, the finished trial kept
    capsys.readouterr()
    with open(tmp_path / "sw" / "results.csv") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["complete"]
    study = tmp_path / "sw" / safe_name(synthetic[1])
    tuner = (study / "tuner.pkl").read_bytes()

    marker = tmp_path / "planted_pickle_ran"
    (study / "tuner.pkl").write_bytes(pickle.dumps(PlantedPickle(marker)))
    assert main(argv) == 2
    assert "tuner.pkl' is not a file mttl saved" in _one_error_line(capsys)
    assert not marker.exists()
    (study / "tuner.pkl").write_bytes(tuner)

    searcher = sorted(study.glob("searcher-state-*.pkl"))[-1]
    searcher.write_bytes(searcher.read_bytes()[:100])  # damaged (or changed) since it was signed
    assert main(argv) == 2
    assert "trust_sweep_state=True" in _one_error_line(capsys)
    assert main([*argv, "trust_sweep_state=True"]) == 2  # trusted, then read as Tune would: still one line
    assert "cannot be restored (UnpicklingError" in _one_error_line(capsys)
    searcher.write_bytes(pickle.dumps({"_ot_study": "not a study"}))  # loads, but would fail later in Tune
    assert main([*argv, "trust_sweep_state=True"]) == 2
    assert "holds no Optuna study" in _one_error_line(capsys)


# ----------------------------------------------------------------------- 3. failed finetune
@pytest.mark.parametrize("case", ["unknown task", "bad override", "damaged checkpoint"])
def test_failed_finetune_writes_nothing(tmp_path, healthy_run, synthetic, capsys, case):
    run = tmp_path / "run"
    shutil.copytree(healthy_run, run)
    task, extra = synthetic[1], []
    if case == "unknown task":
        task, expect = "no_such_task", "task 'no_such_task' is not in"
    elif case == "bad override":
        extra, expect = ["trainable_param_names='.*nothing_has_this_name.*'"], "matches no parameter"
    else:
        adapters = run / "final" / "adapters.safetensors"
        adapters.write_bytes(adapters.read_bytes()[:64])
        expect = "cannot read"
    out = tmp_path / "out"
    argv = ["finetune", "-k", f"checkpoint={run}", f"finetune_task_name={task}", f"output_dir={out}", "run_name=ft",
            "finetune_type=Z", *FAST, *extra]
    assert main(argv) == 2
    assert expect in _one_error_line(capsys)
    assert not out.exists()


def test_failed_finetune_rerun_leaves_the_run_folder_as_it_was(tmp_path, healthy_run, synthetic, capsys):
    run = tmp_path / "run"
    shutil.copytree(healthy_run, run)
    argv = ["finetune", "-k", f"checkpoint={run}", f"finetune_task_name={synthetic[1]}", f"output_dir={tmp_path}",
            "run_name=ft", "finetune_type=Z", *FAST, "tensorboard=True"]
    assert main(argv) == 0
    before = _snapshot(tmp_path / "ft")
    adapters = run / "final" / "adapters.safetensors"
    adapters.write_bytes(adapters.read_bytes()[:64])
    capsys.readouterr()
    assert main([*argv, "seeds=[13, 42]"]) == 2  # seed 42 is new: the damaged checkpoint stops it
    assert "cannot read" in _one_error_line(capsys)
    assert _snapshot(tmp_path / "ft") == before


# ---------------------------------------------------------------------- 4. killed prepare
def test_killed_prepare_leaves_no_temporary_folder_for_good(tmp_path):
    from mttl.run_folder import _host

    out = tmp_path / "shards"
    command = [sys.executable, "-m", "mttl.cli", "prepare", "synthetic", "--out", str(out), "--n-heldout", "2",
               "--rows-per-task", "200000"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not list(tmp_path.glob(".shards.tmp-*")):
            assert proc.poll() is None, "prepare ended before it could be killed"
            assert time.time() < deadline, "prepare never made its temporary folder"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    left = list(tmp_path.glob(".shards.tmp-*"))
    assert len(left) == 1 and f"-{proc.pid}-" in left[0].name
    # folders that are not stale: another host's (shared storage), and one of a running process
    other_host = tmp_path / ".shards.tmp-otherhost-1-abc"
    running = tmp_path / f".shards.tmp-{_host()}-{os.getppid()}-abc"
    for folder in (other_host, running):
        folder.mkdir()
    rerun = subprocess.run([*command[:-2], "--rows-per-task", "16", "--warmup-rows-per-task", "8"],
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    removed = [line for line in rerun.stderr.splitlines() if "temporary folder" in line]
    assert len(removed) == 1 and left[0].name in removed[0] and "no longer run" in removed[0]
    assert not left[0].exists() and other_host.is_dir() and running.is_dir()
    assert (out / "manifest.json").is_file()


# ---------------------------------------------------------------------------------- 5. audit
UNPICKLERS = {("pickle", "load"), ("pickle", "loads"), ("cloudpickle", "load"), ("cloudpickle", "loads"),
              ("dill", "load"), ("dill", "loads"), ("joblib", "load"), ("pd", "read_pickle"),
              ("pandas", "read_pickle"), ("np", "load"), ("numpy", "load")}
# Files allowed to unpickle, each with the reason: none today. Tune's study state is unpickled by
# Ray itself, only after mttl.sweep_state has verified every state file's signature.
ALLOWED_UNPICKLING: dict[str, str] = {}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                yield node, (func.value.id, func.attr)
            elif isinstance(func, ast.Attribute):
                yield node, ("", func.attr)
            elif isinstance(func, ast.Name):
                yield node, ("", func.id)


def _scan(rel: str, source: str) -> list[str]:
    """What the audit forbids in one module: unpickling, torch.load without weights_only=True, remote code."""
    problems = []
    tree = ast.parse(source, filename=rel)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            if any(n and n.split(".")[0] in ("pickle", "cloudpickle", "dill", "shelve", "marshal") for n in names):
                problems.append(f"{rel}:{node.lineno} imports a pickle module")
    for call, (owner, name) in _calls(tree):
        keywords = {k.arg: k.value for k in call.keywords}
        if (owner, name) in UNPICKLERS:
            if not (name == "load" and owner in ("np", "numpy") and _is_false(keywords.get("allow_pickle"))):
                problems.append(f"{rel}:{call.lineno} {owner}.{name}(...) unpickles")
        if name == "load" and owner == "torch" and not _is_true(keywords.get("weights_only")):
            problems.append(f"{rel}:{call.lineno} torch.load without weights_only=True")
        if name == "Unpickler":
            problems.append(f"{rel}:{call.lineno} Unpickler")
        if _is_true(keywords.get("trust_remote_code")):
            problems.append(f"{rel}:{call.lineno} trust_remote_code=True")
    return problems


def test_audit_no_unpickling_and_no_remote_code():
    problems = []
    for path in sorted((REPO / "mttl").rglob("*.py")):
        rel = str(path.relative_to(REPO))
        if rel not in ALLOWED_UNPICKLING:
            problems += _scan(rel, path.read_text())
    assert not problems, problems


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _is_false(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is False


def test_audit_catches_what_it_looks_for():
    """The scan itself: each forbidden form in a snippet is reported, the allowed form is not."""
    snippet = ("import pickle\npickle.loads(b'')\ntorch.load('x')\ntorch.load('x', weights_only=False)\n"
               "torch.load('x', weights_only=True)\nAutoModel.from_pretrained('m', trust_remote_code=True)\n")
    assert [p.split(" ", 1)[0] for p in _scan("m.py", snippet)] == ["m.py:1", "m.py:2", "m.py:3", "m.py:4", "m.py:6"]


SECRETS = {"WANDB_API_KEY": "wandb-secret-1234", "AWS_SECRET_ACCESS_KEY": "aws-secret-5678",
           "MLFLOW_TRACKING_PASSWORD": "mlflow-secret-9012"}


def test_audit_no_credentials_in_a_finetune_runs_files(tmp_path, healthy_run, synthetic, monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    argv = ["finetune", "-k", f"checkpoint={healthy_run}", f"finetune_task_name={synthetic[1]}",
            f"output_dir={tmp_path / 'out'}", "run_name=ft", "finetune_type=Z", *FAST, "tensorboard=True",
            "mlflow_tracking_uri=file:./mlruns", "wandb_project=audit"]
    assert main(argv) == 0
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "metrics.jsonl" for p in written) and any("tfevents" in p.name for p in written)
    assert any("mlruns" in p.parts for p in written) and any("wandb" in p.parts for p in written)
    for path in written:
        data = path.read_bytes()
        for name, value in SECRETS.items():
            assert value.encode() not in data and name.encode() not in data, (path, name)

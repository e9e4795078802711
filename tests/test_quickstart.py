"""`mttl quickstart`: prepare → two-phase pre-training (MHR) → every method on every held-out task →
results table → report, checked against the run folders it leaves (tiny sizes, few steps).

The pre-training is `mttl pretrain`'s embedded default: phase one trains a tiny T5 whole on the
warm-up tasks, phase two freezes that backbone and trains routed adapters on the composition tasks;
this test checks both phases too (one run of the default serves both commands' tests)."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mttl.cli import main
from mttl.data.shards import read_manifest
from mttl.data.synthetic import prepare_synthetic
from mttl.models.backbone import load_backbone
from mttl.models.run import load_run
from mttl.models.tokenizer import load_tokenizer
from mttl.train.recipe import BACKBONE_STEP_FACTOR

pytestmark = pytest.mark.slow

TINY = ["tiny_d_model=32", "tiny_num_layers=1", "max_input_length=16", "max_output_length=16",
        "train_batch_size=8", "total_steps=4", "eval_every=None", "save_every=None", "log_every=2"]


def test_quickstart_runs_every_method_and_reports(tmp_path, ray_cluster, capsys):
    data_dir = tmp_path / "synthetic"
    prepare_synthetic(data_dir, seed=0, n_heldout=2, rows_per_task=40, warmup_rows_per_task=40, validation_rows=8,
                      heldout_pool=40, heldout_validation=8, heldout_test=8)
    runs = tmp_path / "runs"
    # its own process joining the session's cluster, so the console holds what a user's terminal
    # would: the driver's lines and those Ray forwards from the training workers and tasks
    mttl = shutil.which("mttl", path=str(Path(sys.executable).parent)) or "mttl"
    address = ray_cluster.get_runtime_context().gcs_address
    done = subprocess.run([mttl, "quickstart", "-k", f"output_dir={runs}", f"data_dir={data_dir}", "run_name=qs",
                           f"ray_address={address}", *TINY, "--finetune", "total_steps=2", "seeds=[13, 42]",
                           "num_shots=4", "predict_batch_size=8"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    printed = done.stdout
    assert done.returncode == 0, printed
    # a readable console (at most 40 lines) that ends with the table, what it shows, and the report
    lines = printed.rstrip("\n").splitlines()
    assert len(lines) <= 40, printed
    last = [line for line in lines if line.strip()][-3:]
    assert last[0].startswith("| **mean**") and "exact match" in last[1] and "report:" in last[2], printed
    held_out = sorted(t for t, meta in read_manifest(data_dir)["tasks"].items() if meta["role"] == "test")

    adapters = json.loads((runs / "qs" / "config.json").read_text())
    assert adapters["n_splits"] == 4 and adapters["n_skills"] == 8
    check_two_phases(data_dir, runs / "qs-backbone", runs / "qs")

    expected = {"mhr": (None, "qs"), "mhr-z": ("Z", "qs"), "mhr-mu": ("MuZ", "qs"), "lora": ("A", "qs-backbone")}
    table_row = {line.split("|")[1].strip(): line for line in printed.splitlines() if line.startswith("| **mean**")}
    assert table_row, printed
    means = []
    for method, (finetune_type, checkpoint) in expected.items():
        folder = runs / f"qs-ft-{method}"
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["finetune_type"] == finetune_type and cfg["checkpoint"] == str(runs / checkpoint)
        rows = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
        tests = [r for r in rows if r["evaluation"] == "test"]
        assert sorted({r["task"] for r in tests}) == held_out
        assert sorted((r["task"], r["seed"]) for r in tests) == sorted((t, s) for t in held_out for s in (13, 42))
        medians = [statistics.median(r["value"] for r in tests if r["task"] == t) for t in held_out]
        means.append(f"**{statistics.fmean(medians):.3f}**")
    assert table_row["**mean**"].split("|")[2:-1] == [f" {m} " for m in means]
    assert json.loads((runs / "qs-ft-lora" / "config.json").read_text())["model_modifier"] == "lora"
    assert json.loads((runs / "qs-ft-mhr-z" / "config.json").read_text())["trainable_param_names"] \
        == ".*module_logits.*"

    report = (runs / "qs-report" / "report.md").read_text()
    assert "## Routing: qs" in report and "## Fine-tuning results" in report
    assert list((runs / "qs-report" / "figures").glob("*.png"))


def test_quickstart_refuses_an_unknown_method(tmp_path, capsys):
    assert main(["quickstart", "--methods", "mhr,adapterdrop", "-k", f"output_dir={tmp_path}"]) != 0
    err = capsys.readouterr().err
    assert "adapterdrop" in err and "mhr-z" in err and "Traceback" not in err


def check_two_phases(data_dir, phase_one, phase_two):
    """Phase one: the whole tiny T5 on the warm-up tasks; phase two: routed adapters on the training
    compositions, on phase one's backbone, which it leaves exactly as saved."""
    manifest = read_manifest(data_dir)
    roles = {name: meta["role"] for name, meta in manifest["tasks"].items()}
    assert {roles[t] for t in json.loads((phase_one / "tasks.json").read_text())} == {"warmup"}
    assert {roles[t] for t in json.loads((phase_two / "tasks.json").read_text())} == {"train"}
    assert len(json.loads((phase_two / "tasks.json").read_text())) == sum(r == "train" for r in roles.values())

    one = json.loads((phase_one / "config.json").read_text())
    two = json.loads((phase_two / "config.json").read_text())
    assert one["model"] == "tiny-t5" and one["model_modifier"] is None and one["trainable_param_names"] == ".*"
    assert one["total_steps"] == BACKBONE_STEP_FACTOR * two["total_steps"]
    assert two["model"] == str(phase_one / "final" / "backbone") and two["model_modifier"] == "poly"
    assert not (phase_two / "final" / "backbone").exists()  # the frozen backbone is not copied

    tokenizer = load_tokenizer("byte")
    built = load_backbone("tiny-t5", vocab_size=len(tokenizer), tiny_d_model=one["tiny_d_model"],
                          tiny_num_layers=one["tiny_num_layers"], seed=one["seed"])
    trained = load_backbone(str(phase_one / "final" / "backbone"))
    assert not torch.equal(built.shared.weight, trained.shared.weight)
    routed = load_run(phase_two).model.hf_model.state_dict()
    for name, tensor in trained.state_dict().items():
        assert torch.equal(tensor, routed[name]), name

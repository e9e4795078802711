"""`mttl pretrain` without a model: phase one trains a tiny T5 whole on the warm-up tasks, phase two
freezes that backbone and trains routed adapters on the composition tasks."""

from __future__ import annotations

import json

import pytest
import torch

from mttl.cli import main
from mttl.data.shards import read_manifest
from mttl.data.synthetic import prepare_synthetic
from mttl.models.run import load_run
from mttl.models.backbone import load_backbone
from mttl.models.tokenizer import load_tokenizer
from mttl.train.cli import BACKBONE_STEP_FACTOR

pytestmark = pytest.mark.slow


def test_default_trains_the_backbone_then_adapters_on_it(tmp_path, ray_cluster):
    data_dir = tmp_path / "synthetic"
    manifest = prepare_synthetic(data_dir, seed=0)
    code = main(["pretrain", "-k", f"output_dir={tmp_path / 'runs'}", f"data_dir={data_dir}", "run_name=demo",
                 "total_steps=4", "eval_every=None", "save_every=None", "log_every=2", "tiny_d_model=32",
                 "tiny_num_layers=1", "max_input_length=16", "max_output_length=16", "train_batch_size=8"])
    assert code == 0
    phase_one, phase_two = tmp_path / "runs" / "demo-backbone", tmp_path / "runs" / "demo"
    roles = {name: meta["role"] for name, meta in read_manifest(data_dir)["tasks"].items()}
    assert {roles[t] for t in json.loads((phase_one / "tasks.json").read_text())} == {"warmup"}
    assert {roles[t] for t in json.loads((phase_two / "tasks.json").read_text())} == {"train"}
    assert len(json.loads((phase_two / "tasks.json").read_text())) == sum(
        meta["role"] == "train" for meta in manifest["tasks"].values())

    one = json.loads((phase_one / "config.json").read_text())
    two = json.loads((phase_two / "config.json").read_text())
    assert one["model"] == "tiny-t5" and one["model_modifier"] is None and one["total_steps"] == 4 * BACKBONE_STEP_FACTOR
    assert two["model"] == str(phase_one / "final" / "backbone") and two["model_modifier"] == "poly"
    assert not (phase_two / "final" / "backbone").exists()  # the frozen backbone is not copied

    # phase one changed the backbone it built; phase two left it exactly as phase one saved it
    tokenizer = load_tokenizer("byte")
    built = load_backbone("tiny-t5", vocab_size=len(tokenizer), tiny_d_model=32, tiny_num_layers=1, seed=42)
    trained = load_backbone(str(phase_one / "final" / "backbone"))
    assert not torch.equal(built.shared.weight, trained.shared.weight)
    routed = load_run(phase_two).model.hf_model.state_dict()
    for name, tensor in trained.state_dict().items():
        assert torch.equal(tensor, routed[name]), name

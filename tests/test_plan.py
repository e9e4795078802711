"""`mttl plan`: parameter counts, byte arithmetic and the command's output and errors.

- Named T5 v1.1 shapes built on the meta device have the published parameter counts.
- The model-state arithmetic equals DeepSpeed's own estimators for a model whose every parameter
  trains (the case those estimators describe), under ZeRO-2 and ZeRO-3 with and without offload.
- The meta-device counts equal those of a real build, and the plan's model-state bytes are within
  20 % of the tensors a real build holds after one AdamW step (measured, plain torch).
- The activation estimate is within 20 % of the tensors autograd saves (tiny T5, no dropout).
- Bad input is a one-line error naming the key; the output parses; the docs show the real output.
"""

from __future__ import annotations

import json

import pytest
import torch

from mttl.cli import main
from mttl.config import load_config
from mttl.models.run import build_routed_model
from mttl.models.tokenizer import BYTE, load_tokenizer
from mttl.plan import build_meta_model, count_params, model_states
from mttl.train.deepspeed_config import deepspeed_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Published totals (encoder + decoder + shared embedding + untied output head) of google/t5-v1_1-*
PUBLISHED = {"small": 76_961_152, "base": 247_577_856, "large": 783_150_080, "xl": 2_849_757_184}
TINY = ["model=tiny-t5", "tiny_d_model=64", "tiny_num_layers=2"]
MHR = ["model_modifier=poly", "n_skills=4", "n_splits=2", "lora_rank=4", "n_tasks=3",
       "trainable_param_names=.*lora_[ab].*|.*module_logits.*"]


@pytest.mark.parametrize("size", sorted(PUBLISHED))
def test_named_shapes_have_the_published_parameter_counts(size):
    counts = count_params(build_meta_model(load_config(None, [f"model=t5-v1_1-{size}"])))
    assert counts.total == PUBLISHED[size]
    # the LM-adapt hub name maps to the same shape when its config cannot be fetched
    lm_adapt = count_params(build_meta_model(load_config(None, [f"model=google/t5-{size}-lm-adapt"])))
    assert lm_adapt.total == PUBLISHED[size]


def _real(kwargs):
    cfg = load_config(None, kwargs)
    torch.manual_seed(0)
    return cfg, build_routed_model(cfg, load_tokenizer(BYTE))


def test_meta_counts_equal_a_real_build():
    cfg, model = _real(TINY + MHR)
    counts = count_params(build_meta_model(cfg))
    params = {id(p): p for p in model.parameters()}.values()
    assert counts.trained == sum(p.numel() for p in params if p.requires_grad)
    assert counts.frozen == sum(p.numel() for p in params if not p.requires_grad)
    assert counts.routing == sum(p.numel() for n, p in model.named_parameters() if n.endswith("module_logits"))
    assert counts.adapters == sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert counts.trained_backbone == 0 and counts.routing > 0 and counts.adapters > 0


@pytest.mark.parametrize("world", [1, 2, 8])
def test_model_states_equal_deepspeeds_estimators_when_everything_trains(world):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs, model_to_params
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cfg, model = _real(TINY)  # no modifier: every parameter trains, DeepSpeed's estimators' case
    counts = count_params(build_meta_model(cfg))
    total, largest = model_to_params(model)
    assert counts.frozen == 0 and counts.total == total and counts.largest_layer == largest

    def ours(stage, off_opt=False, off_par=False):
        return model_states(counts, stage=stage, world=world, precision="bf16", offload_optimizer=off_opt,
                            offload_params=off_par).device

    for offload in (False, True):
        _, gpu = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=world, cpu_offload=offload)
        assert abs(ours(2, offload) - gpu) <= 4, (offload, ours(2, offload), gpu)
    for off_opt, off_par in ((False, False), (True, False), (True, True)):
        _, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=world,
                                                          cpu_offload=off_opt, cpu_offload_params=off_par)
        assert abs(ours(3, off_opt, off_par) - gpu) <= 4, (off_opt, off_par, ours(3, off_opt, off_par), gpu)


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


@pytest.mark.parametrize("kwargs", [MHR, []], ids=["mhr", "full"])
def test_model_states_within_20_percent_of_a_measured_step(kwargs):
    cfg, model = _real(TINY + kwargs)
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-3)
    batch = {"input_ids": torch.randint(3, 200, (4, 16)), "labels": torch.randint(3, 200, (4, 8)),
             "task_ids": torch.tensor([0, 1, 2, 0])}
    if not kwargs:
        batch.pop("task_ids")
    model(**batch).loss.backward()
    optimizer.step()
    measured = _tensor_bytes([*model.parameters(), *(p.grad for p in trained),
                              *(v for state in optimizer.state.values() for v in state.values())])
    planned = model_states(count_params(build_meta_model(cfg)), stage=0, world=1, precision="32").device
    assert abs(planned - measured) / measured <= 0.20, (planned, measured)


def test_plan_output_parses_and_recommends_a_setting(capsys):
    args = ["plan", "-k", "model=t5-v1_1-xl", "model_modifier=poly", "n_skills=8", "n_splits=4", "lora_rank=16",
            "modify_layers=q|k|v|o", "trainable_param_names=.*lora_[ab].*|.*module_logits.*",
            "num_workers=8", "use_gpu=True", "device_memory_gb=80", "precision=bf16", "train_batch_size=256",
            "max_input_length=1024", "max_output_length=128"]
    assert main(args + ["--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    worker = plan["per_worker_bytes"]
    assert plan["params"]["backbone_frozen"] == PUBLISHED["xl"]
    assert worker["total"] == worker["model_states"] + worker["activations"]
    assert worker["model_states"] == sum(worker[k] for k in ("backbone", "trained_weights", "gradients", "optimizer",
                                                            "gather_buffer"))
    fit = plan["cheapest_fit"]
    assert fit is not None and fit["total_bytes"] <= 0.9 * 80e9
    assert fit["micro_batch"] * fit["gradient_accumulation_steps"] * 8 == 256
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "cheapest fit: -k zero_stage=" in text and "model states" in text


@pytest.mark.parametrize("kwargs, key", [
    (["model=t5-v1_1-huge"], "model=t5-v1_1-huge"),
    (["model=t5-v1_1-xl", "device_memory_gb=0"], "device_memory_gb"),
    (["model=t5-v1_1-xl", "offload_params=cpu", "zero_stage=2"], "offload_params"),
    (["model=/no/such/folder"], "model=/no/such/folder"),
])
def test_bad_input_is_one_line_naming_the_key(kwargs, key, capsys):
    assert main(["plan", "-k", *kwargs]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0] and "Traceback" not in err[0], err


def test_offload_keys_map_to_deepspeeds_sections():
    zero = deepspeed_config(load_config(None, ["zero_stage=3", "offload_optimizer=cpu", "offload_params=cpu",
                                               "use_gpu=False"]), 1)
    assert zero["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert zero["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert zero["zero_force_ds_cpu_optimizer"] is False
    plain = deepspeed_config(load_config(None, ["zero_stage=2", "use_gpu=False"]), 1)["zero_optimization"]
    assert "offload_optimizer" not in plain and "offload_param" not in plain


@pytest.mark.parametrize("kwargs", [[], MHR], ids=["full", "mhr"])
def test_activation_estimate_within_20_percent_of_the_saved_tensors(kwargs):
    from mttl.plan import activation_bytes

    cfg, model = _real(TINY + kwargs)
    model.train()
    b, li, lo = 4, 64, 16
    batch = {"input_ids": torch.randint(3, 200, (b, li)), "labels": torch.randint(3, 200, (b, lo))}
    if kwargs:
        batch["task_ids"] = torch.tensor([0, 1, 2, 0])
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):  # every tensor autograd keeps for backward, once per storage, weights excluded
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch)
    measured = sum(saved.values())
    estimate = activation_bytes(model.config, micro_batch=b, input_len=li, output_len=lo, precision="32")
    assert abs(estimate - measured) / measured <= 0.20, (estimate, measured)


def test_docs_examples_are_the_commands_output(capsys):
    import re
    import shlex
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "memory-plan.md").read_text()
    examples = re.findall(r"```\n(mttl plan [^\n]*)\n```\s*```text\n(.*?)```", text, re.S)
    assert len(examples) == 2
    for command, shown in examples:
        assert main(shlex.split(command)[1:]) == 0
        assert capsys.readouterr().out == shown, f"docs/memory-plan.md is out of date for `{command}`"


ENGINE_AFTER_ONE_STEP = """
import json, os, socket, sys
import deepspeed, torch
from mttl.config import load_config
from mttl.models.run import build_routed_model
from mttl.models.tokenizer import load_tokenizer
from mttl.train.deepspeed_config import deepspeed_config
from mttl.train.optim import build_optimizer, optimizer_groups
from mttl.train.zero_memory import share_fp32_partition

stage, keys = int(sys.argv[1]), json.loads(sys.argv[2])
with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
deepspeed.init_distributed(dist_backend="gloo")
cfg = load_config(None, keys)
config = deepspeed_config(cfg, 1)
torch.manual_seed(0)
model = build_routed_model(cfg, load_tokenizer("byte"), zero3_config=config if stage == 3 else None)
engine, optimizer, _, _ = deepspeed.initialize(model=model, config=config,
                                               optimizer=build_optimizer(optimizer_groups(model, cfg), cfg))
batch = {"input_ids": torch.randint(3, 200, (4, 16)), "labels": torch.randint(3, 200, (4, 8)),
         "task_ids": torch.tensor([0, 1, 2, 0])}
share_fp32_partition(engine)  # as the training loop does
engine.backward(engine(**batch).loss)
engine.step()
if stage == 3:
    masters, weights = optimizer.fp32_partitioned_groups_flat, optimizer.fp16_partitioned_groups_flat
else:
    masters, weights = optimizer.single_partition_of_fp32_groups, list(model.parameters())
moments = [v for state in optimizer.optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.dim()]
weight_storages = {w.untyped_storage().data_ptr() for w in weights}
clones = [m for m in masters if m.untyped_storage().data_ptr() not in weight_storages]  # a master that is the weights costs nothing
print(json.dumps({"copy": bool(clones), "bytes": sum(t.untyped_storage().nbytes() for t in [*clones, *moments])}))
"""


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_optimizers_in_fp32_keep_a_master_copy_the_plan_counts(stage, tmp_path):
    """DeepSpeed's ZeRO optimizers step a clone of the trained partition even in fp32 (ZeRO-0's torch
    optimizer steps the weights themselves; stage 3's code means to skip the clone for a partition
    already in fp32 on its device, but compares a torch.device with a device name, which is never
    equal, so mttl points its optimizer at the partition itself): the plan's optimizer bytes are the
    clone (ZeRO-2 only) plus Adam's two moments, read from a real engine after one step (a one-process
    group in its own process: DeepSpeed keeps its group across tests; ZeRO-3 with the partitioned
    build)."""
    import os
    import subprocess
    import sys

    keys = TINY + MHR + [f"zero_stage={stage}", "train_batch_size=4", "optimizer=adamw"]
    script = tmp_path / "engine.py"
    script.write_text(ENGINE_AFTER_ONE_STEP)
    done = subprocess.run([sys.executable, str(script), str(stage), json.dumps(keys)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["copy"] == (stage == 2)  # ZeRO-2: a clone, not the weights; ZeRO-3: the partition itself
    planned = model_states(count_params(build_meta_model(load_config(None, keys))), stage=stage, world=1,
                           precision="32").optimizer
    assert planned == pytest.approx(measured["bytes"], rel=0.01), (planned, measured)

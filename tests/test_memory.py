"""Memory at scale on the tiny model: gradient checkpointing with routed adapters (same loss and
gradients as without, blocks really recomputed), and the ZeRO-3 partitioned build (the very weights
of the whole build; under Ray, the losses of ZeRO-0)."""

from __future__ import annotations

import platform
import socket

import pytest
import torch

from mttl.config import Config
from mttl.models.run import build_routed_model
from mttl.models.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# the heap tests below measure glibc's malloc (its trim and its mmap threshold)
needs_glibc = pytest.mark.skipif("glibc" not in " ".join(platform.libc_ver()), reason="measures glibc's malloc")


def _cfg(**overrides) -> Config:
    # MHR (poly, 2 splits) with the stochastic relaxed-Bernoulli selector: recomputation must draw
    # the same routing sample and reuse the weights computed in earlier blocks
    values = dict(model="tiny-t5", tiny_d_model=32, tiny_num_layers=2, tokenizer="byte", model_modifier="poly",
                  n_skills=3, n_splits=2, lora_rank=2, n_tasks=4, router_granularity="coarsegrained",
                  trainable_param_names=".*lora_[ab].*|.*module_logits.*", seed=3)
    values.update(overrides)
    return Config().update(values, source="test")


def _loss_and_grads(cfg: Config, calls: list | None = None):
    torch.manual_seed(cfg.seed)
    model = build_routed_model(cfg, load_tokenizer("byte"))
    model.train()
    with torch.no_grad():  # B starts at zero; nonzero, every adapter and routing logit gets a gradient
        for name, param in model.named_parameters():
            if "lora_b" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    if calls is not None:
        for block in model.hf_model.encoder.block:
            block.layer[0].register_forward_pre_hook(lambda *_: calls.append(1))
    gen = torch.Generator().manual_seed(0)
    batch = dict(input_ids=torch.randint(2, 200, (4, 12), generator=gen),
                 attention_mask=torch.ones(4, 12, dtype=torch.long),
                 labels=torch.randint(2, 200, (4, 6), generator=gen), task_ids=torch.tensor([0, 1, 2, 1]))
    torch.manual_seed(11)  # the routing sample
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    plain_calls, ckpt_calls = [], []
    loss, grads = _loss_and_grads(_cfg(), plain_calls)
    loss_ckpt, grads_ckpt = _loss_and_grads(_cfg(gradient_checkpointing=True), ckpt_calls)
    # each encoder block runs twice with checkpointing (forward, then recomputation in backward)
    assert len(plain_calls) == 2 and len(ckpt_calls) == 4
    # same operations on the same values: only summation order inside kernels may differ
    assert torch.allclose(loss, loss_ckpt, rtol=0, atol=1e-6)
    assert grads.keys() == grads_ckpt.keys() and any("module_logits" in n for n in grads)
    for name in grads:
        assert grads[name].abs().sum() > 0, name
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_gradient_checkpointing_without_the_routing_restore_fails():
    """The check above can fail: recomputing without the captured routing loses the task ids."""
    from contextlib import nullcontext

    cfg = _cfg(gradient_checkpointing=True)
    torch.manual_seed(cfg.seed)
    model = build_routed_model(cfg, load_tokenizer("byte"))
    model.hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs={
        "use_reentrant": False, "context_fn": lambda: (nullcontext(), nullcontext())})
    model.train()
    batch = dict(input_ids=torch.randint(2, 200, (2, 8)), attention_mask=torch.ones(2, 8, dtype=torch.long),
                 labels=torch.randint(2, 200, (2, 4)), task_ids=torch.tensor([0, 1]))
    loss = model(**batch).loss
    with pytest.raises(RuntimeError, match="without task ids"):
        loss.backward()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_partitioned_build_holds_the_whole_builds_weights(monkeypatch):
    """One-process group: every backbone tensor is built partitioned (empty locally) and, gathered,
    equals the whole build's seeded weights exactly; adapters stay whole for deepspeed.initialize."""
    import deepspeed

    from mttl.train.deepspeed_config import deepspeed_config

    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                           LOCAL_RANK="0").items():
        monkeypatch.setenv(key, value)
    deepspeed.init_distributed(dist_backend="gloo")
    try:
        cfg = _cfg(zero_stage=3, train_batch_size=2)
        torch.manual_seed(cfg.seed)
        whole = dict(build_routed_model(cfg, load_tokenizer("byte")).named_parameters())
        torch.manual_seed(cfg.seed)
        parted = build_routed_model(cfg, load_tokenizer("byte"), zero3_config=deepspeed_config(cfg, 1))
        named = dict(parted.named_parameters())
        assert named.keys() == whole.keys()
        backbone = [n for n in named if "lora_" not in n and "module_logits" not in n]
        assert backbone and all(hasattr(named[n], "ds_id") and named[n].numel() == 0 for n in backbone)
        with deepspeed.zero.GatheredParameters([named[n] for n in backbone]):
            for name in backbone:
                assert torch.equal(named[name].detach(), whole[name].detach()), name
        for name in set(named) - set(backbone):
            assert torch.equal(named[name].detach(), whole[name].detach()), name
    finally:
        torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------- under Ray, 2 workers
RAY_STEPS = dict(total_steps=6, save_every=3, eval_every=None, log_every=1, num_to_keep=10)
# fp32 throughout; the runs differ in how gradients are reduced (ZeRO-3 reduce-scatters partitioned
# buckets, ZeRO-0 all-reduces whole ones) and ZeRO-3 recomputes its blocks in backward: the same
# sums in another order, ~1e-7 apart per step, and 6 steps of Adam stay well inside 2e-5
LOSS_TOLERANCE = 2e-5
# the runs' adapters differ only by the order of fp32 reductions, amplified by Adam where a gradient is
# near zero; an adapter written unpartitioned or half-gathered would differ by its whole magnitude (~1e-2)
ADAPTER_TOLERANCE = 1e-3


@pytest.mark.slow
def test_partitioned_zero3_with_checkpointing_matches_zero0(ray_cluster, default_synthetic,
                                                                         tmp_path):
    from train_support import tiny_config, train_rows

    from mttl.train.loop import pretrain

    (tmp_path / "synthetic").symlink_to(default_synthetic)

    def run(name: str, **overrides):
        return pretrain(tiny_config(tmp_path / "synthetic", tmp_path / "runs", name, **RAY_STEPS, **overrides))

    zero0 = run("zero0", zero_stage=0)
    zero3 = run("zero3", zero_stage=3, gradient_checkpointing=True)
    reference = [r["loss"] for r in train_rows(zero0)]
    losses = [r["loss"] for r in train_rows(zero3)]
    assert len(losses) == RAY_STEPS["total_steps"]
    assert losses == pytest.approx(reference, rel=0, abs=LOSS_TOLERANCE), (losses, reference)
    assert losses[0] != losses[-1]  # the adapters moved
    # the first step's high-water mark by phase, logged once per run: it only grows through the step
    import json

    for run_dir in (zero0, zero3):
        marks = {k: v for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                 for k, v in r.items() if k.startswith("peak_rss_after_")}
        phases = [marks[f"peak_rss_after_{p}_gb"] for p in ("initialize", "forward", "backward", "optimizer_step")]
        assert phases == sorted(phases) and phases[0] > 0.1, phases
    # final/backbone: ZeRO-0 writes it whole, ZeRO-3 a gathered group at a time in transformers' shards;
    # the frozen backbone loads back with the same weights from both
    import torch
    from transformers import AutoModelForSeq2SeqLM

    from mttl.train.checkpoint import BACKBONE_INDEX

    assert (zero3 / "final" / "backbone" / BACKBONE_INDEX).is_file()
    whole = AutoModelForSeq2SeqLM.from_pretrained(zero0 / "final" / "backbone").state_dict()
    shards = AutoModelForSeq2SeqLM.from_pretrained(zero3 / "final" / "backbone").state_dict()
    assert whole.keys() == shards.keys()
    assert all(torch.equal(whole[k], shards[k]) for k in whole), [k for k in whole if not torch.equal(whole[k], shards[k])]
    # the adapters, written by ZeRO-3 a gathered group at a time, are the whole tensors ZeRO-0 wrote,
    # in the final folder and in the mid-run checkpoint (step 3)
    from safetensors.torch import load_file

    from mttl.train.checkpoint import registered_checkpoints

    for pick in (lambda run: run / "final", lambda run: dict(registered_checkpoints(run))[3]):
        whole, grouped = (load_file(str(pick(run) / "adapters.safetensors")) for run in (zero0, zero3))
        assert whole.keys() == grouped.keys()
        gaps = {k: (whole[k] - grouped[k]).abs().max().item() for k in whole if whole[k].shape == grouped[k].shape}
        assert len(gaps) == len(whole), [k for k in whole if k not in gaps]
        assert max(gaps.values()) < ADAPTER_TOLERANCE, sorted(gaps.items(), key=lambda kv: -kv[1])[:3]
    # Resuming a partitioned ZeRO-3 run (bf16, damaged latest checkpoint) is the resume matrix's ZeRO-3
    # point (tests/test_resume_matrix.py), which builds through the same partitioned path.


@needs_glibc
def test_freed_heap_pages_go_back_to_the_system():
    """Small tensors freed between live ones leave pages glibc keeps (it trims only the heap's top); a
    ZeRO-3 engine's setup frees many such (adapter tensors built whole, then partitioned).
    `return_freed_heap` must hand them back: resident memory falls by most of what was freed."""
    import gc

    import psutil

    from mttl.train.zero_memory import return_freed_heap

    rss = lambda: psutil.Process().memory_info().rss  # noqa: E731
    chunks = [torch.ones(16 * 1024) for _ in range(4096)]  # 64 KB each, 256 MB, from the heap
    before = rss()
    del chunks[::2]  # every other one freed: 128 MB in holes between live chunks
    gc.collect()
    freed_by_glibc_alone = before - rss()
    return_freed_heap()
    returned = before - rss()
    del chunks
    assert freed_by_glibc_alone < 32e6, freed_by_glibc_alone  # the holes stayed resident
    assert returned > 96e6, returned  # most of the 128 MB came back


_GATHER_BETWEEN_ACTIVATIONS = """
import gc, torch
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
kept, gathered = [], []
for layer in range(96):  # per layer: a gathered skill inventory (512 KB) between kept activations
    kept.append(torch.ones(16 * 1024))
    gathered.append(torch.ones(128 * 1024))
    kept.append(torch.ones(16 * 1024))
before = rss()
del gathered  # ZeRO-3 releases what it gathered; the activations stay for the backward
gc.collect()
print(before - rss())
"""


@needs_glibc
@pytest.mark.parametrize("zero_stage", [0, 3])
def test_zero3_workers_return_released_gathers_at_once(zero_stage, monkeypatch):
    """ZeRO-3 gathers and frees each layer's parameters in every forward and backward, between the
    activations the backward keeps. Under the allocator settings a ZeRO-3 worker gets
    (`worker_env`), 48 MB of freed 512 KB gathers must leave the process at once; under the other
    stages' 1 MB threshold they are heap holes that stay resident (what made a T5-large-shaped
    ZeRO-3 worker's forward grow 0.96 GB instead of 0.46)."""
    import os
    import subprocess
    import sys

    from mttl.ray_utils import worker_env

    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    env = {**os.environ, **worker_env(_cfg(zero_stage=zero_stage))}
    returned = int(subprocess.run([sys.executable, "-c", _GATHER_BETWEEN_ACTIVATIONS], env=env, check=True,
                                  capture_output=True, text=True).stdout)
    if zero_stage == 3:
        assert returned > 40e6, returned
    else:
        assert returned < 8e6, returned  # the control: the same holes stay resident at 1 MB


def test_a_drivers_allocator_settings_reach_the_workers(monkeypatch):
    from mttl.ray_utils import worker_env

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    env = worker_env(_cfg(zero_stage=3))
    assert env["MALLOC_MMAP_THRESHOLD_"] == "65536"
    assert env["MALLOC_TRIM_THRESHOLD_"] == str(1 << 20)

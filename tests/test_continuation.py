"""Pre-training from a previous run (`checkpoint`), average-routing continuation
(`switch_to_avg_modules`) and annealing routing to uniform (`uniform_interp_steps`).

Expected values come from the saved safetensors and from REFERENCE.md §2.10's formula
α = cos(π/2 · n/N), n = N − (total_steps − step), never from the code under test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mttl.adapters import adapted_layers, save_adapters, selectors
from mttl.adapters.inject import adapter_tensors
from mttl.adapters.routing import AverageSelector, PolySelector
from mttl.config import Config, load_config
from mttl.errors import ConfigError
from mttl.models.run import build_routed_model
from mttl.models.tokenizer import load_tokenizer
from mttl.train.continuation import (check_checkpoint_tasks, continuation_config, start_from_checkpoint,
                                     uniform_alpha)
from train_support import TASKS, tiny_config, train_rows

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROWS = {task: row for row, task in enumerate(TASKS)}


def handmade_run(root: Path, data_dir: Path, name: str = "ckpt") -> Path:
    """A finished pre-training run folder with random (non-zero) adapters and routing, made without Ray."""
    cfg = tiny_config(data_dir, root, name, n_splits=2, num_workers=1)
    cfg.n_tasks = len(TASKS)
    model = build_routed_model(cfg, load_tokenizer("byte"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in adapter_tensors(model).values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator))
    run = root / name
    save_adapters(model, run / "final", meta={"tasks": ROWS, "run_name": name})
    cfg.save(run)
    (run / "tasks.json").write_text(json.dumps(ROWS))
    return run


def continuation(run: Path, **values) -> Config:
    cfg = Config().update({"checkpoint": str(run), "run_name": "next", "total_steps": 10, **values}, source="-k")
    return continuation_config(cfg)


def averaged_update(saved: dict, layer: str, x: torch.Tensor, scale: float) -> torch.Tensor:
    """x·A·B·scale with A, B the skill averages of the saved tensors, each head its own block of dims."""
    a = saved[f"{layer}.lora_a"].mean(dim=1)  # [S, d_in/S, r]
    b = saved[f"{layer}.lora_b"].mean(dim=1)  # [S, r, d_out/S]
    a_full = torch.cat(list(a), dim=0)  # head q owns input rows q·d_in/S …
    b_full = torch.cat(list(b), dim=1)  # … and output columns q·d_out/S …
    return x @ a_full @ b_full * scale


def test_uniform_alpha_follows_the_cosine_schedule():
    # total 100 steps, N = 40: α stays 1 until step 60, then cos(π/2 · (step − 60)/40)
    expected = {0: 1.0, 30: 1.0, 59: 1.0, 60: 1.0, 70: 0.9238795325112867, 80: 0.7071067811865476,
                90: 0.38268343236508984, 99: 0.03925981575906861, 100: 0.0}
    for step, alpha in expected.items():
        assert uniform_alpha(step, 100, 40) == pytest.approx(alpha, abs=1e-12), step
    assert uniform_alpha(5, 10, 0) == 1.0  # 0 = off
    assert uniform_alpha(0, 10, 10) == 1.0 and uniform_alpha(5, 10, 10) == pytest.approx(math.sqrt(0.5))


def test_average_continuation_starts_from_the_checkpoints_averaged_adapters(tmp_path):
    run = handmade_run(tmp_path, tmp_path / "data")
    saved = load_file(str(run / "final" / "adapters.safetensors"))
    cfg = continuation(run, switch_to_avg_modules=True)
    # the architecture comes from the checkpoint; this run may route another task table
    assert (cfg.model_modifier, cfg.n_skills, cfg.n_splits, cfg.lora_rank) == ("poly", 2, 2, 2)
    cfg.n_tasks = 3
    model = build_routed_model(cfg, load_tokenizer("byte"))
    start_from_checkpoint(model, cfg)
    model.eval()
    assert all(isinstance(s, AverageSelector) for s in selectors(model).values())
    assert not any("module_logits" in name for name, _ in model.named_parameters())
    generator = torch.Generator().manual_seed(1)
    for name, layer in adapted_layers(model).items():
        x = torch.randn(3, 5, layer.in_features, generator=generator)
        with torch.no_grad():
            update = layer(x) - layer.base_forward(x)
        torch.testing.assert_close(update, averaged_update(saved, name, x, cfg.lora_alpha / cfg.lora_rank),
                                   rtol=1e-5, atol=1e-6)


def test_learned_routing_continues_from_the_checkpoint(tmp_path):
    run = handmade_run(tmp_path, tmp_path / "data")
    saved = load_file(str(run / "final" / "adapters.safetensors"))
    cfg = continuation(run)
    check_checkpoint_tasks(cfg, ROWS)
    cfg.n_tasks = len(ROWS)
    model = build_routed_model(cfg, load_tokenizer("byte"))
    start_from_checkpoint(model, cfg)
    assert any(isinstance(s, PolySelector) for s in selectors(model).values())
    tensors = adapter_tensors(model)
    assert set(tensors) == set(saved)
    for name, tensor in saved.items():
        assert torch.equal(tensors[name], tensor), name


def test_continuation_refuses_what_cannot_run(tmp_path):
    run = handmade_run(tmp_path, tmp_path / "data")
    with pytest.raises(ConfigError, match="'n_skills' is 4 but the checkpoint .* was trained with 2"):
        continuation(run, n_skills=4)
    with pytest.raises(ConfigError, match="routed other tasks.*switch_to_avg_modules=True"):
        check_checkpoint_tasks(continuation(run), {"other": 0})
    check_checkpoint_tasks(continuation(run, switch_to_avg_modules=True), {"other": 0})  # routing is replaced
    with pytest.raises(ConfigError, match="uniform_interp_steps has nothing to anneal"):
        continuation(run, switch_to_avg_modules=True, uniform_interp_steps=5)
    with pytest.raises(ConfigError, match="choose N <= total_steps"):
        continuation(run, uniform_interp_steps=11)
    with pytest.raises(ConfigError, match="switch_to_avg_modules continues a pre-trained run"):
        continuation_config(Config().update({"switch_to_avg_modules": True, "total_steps": 10}))
    with pytest.raises(ConfigError, match="uniform_interp_steps anneals learned routing"):
        continuation_config(Config().update({"model_modifier": "lora", "uniform_interp_steps": 2, "total_steps": 10}))


def test_checkpoint_named_inside_checkpoint_dir(tmp_path):
    run = handmade_run(tmp_path / "ckpts", tmp_path / "data", name="mhr")
    cfg = Config().update({"checkpoint": "mhr", "checkpoint_dir": str(tmp_path / "ckpts")})
    assert Path(cfg.checkpoint_path()) == run
    assert Config().update({"checkpoint": str(run)}).checkpoint_path() == str(run)


@pytest.mark.slow
def test_pretrain_continues_the_average_of_a_checkpoint(tmp_path, default_synthetic, ray_cluster):
    """`mttl pretrain` with checkpoint + switch_to_avg_modules, adapters held fixed (learning rate 0):
    the run's final adapters are its starting point, the checkpoint's skills under average routing."""
    from mttl.models.run import load_run
    from mttl.train.loop import pretrain

    run = handmade_run(tmp_path, default_synthetic)
    saved = load_file(str(run / "final" / "adapters.safetensors"))
    cfg = Config().update({"checkpoint": str(run), "switch_to_avg_modules": True, "run_name": "avg",
                           "output_dir": str(tmp_path), "total_steps": 2, "adapters_learning_rate": 0.0,
                           "num_workers": 1, "eval_every": None, "save_every": None, "tensorboard": False,
                           "log_every": 1, "train_batch_size": 8, "cache_dir": str(tmp_path / "cache")})
    run_dir = pretrain(cfg)
    assert [r["step"] for r in train_rows(run_dir)] == [1, 2]
    final = load_file(str(run_dir / "final" / "adapters.safetensors"))
    assert not any("module_logits" in name for name in final)
    for name, tensor in saved.items():
        if "lora_" in name:
            assert torch.equal(final[name], tensor), name
    loaded = load_run(run_dir).model
    generator = torch.Generator().manual_seed(2)
    for name, layer in adapted_layers(loaded).items():
        x = torch.randn(2, 3, layer.in_features, generator=generator)
        with torch.no_grad():
            update = layer(x) - layer.base_forward(x)
        torch.testing.assert_close(update, averaged_update(saved, name, x, 1.0 / 2), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_pretrain_anneals_routing_to_uniform_over_the_last_steps(tmp_path, default_synthetic, ray_cluster):
    from mttl.train.loop import pretrain

    cfg = tiny_config(default_synthetic, tmp_path, "anneal", num_workers=1, total_steps=6, uniform_interp_steps=4,
                      eval_every=None, save_every=None)
    run_dir = pretrain(cfg)
    # after step s: n = 4 − (6 − s); α = 1 while n ≤ 0, then cos(π/2 · n/4)
    expected = [1.0, 1.0, 0.9238795325112867, 0.7071067811865476, 0.38268343236508984, 0.0]
    assert [r["uniform_alpha"] for r in train_rows(run_dir)] == pytest.approx(expected, abs=1e-12)


def test_default_two_phase_run_anneals_only_the_adapter_phase():
    from mttl.train.recipe import DEFAULTS, backbone_phase_config

    cfg = load_config(None, ["uniform_interp_steps=100"], base=DEFAULTS)
    phase_one = backbone_phase_config(cfg)
    assert phase_one.model_modifier is None and phase_one.uniform_interp_steps == 0
    continuation_config(phase_one)  # the backbone phase has no routing to anneal: no error
    assert continuation_config(cfg).uniform_interp_steps == 100


def test_checkpoint_without_adapters_gives_its_trained_backbone(tmp_path):
    """A full-model run (the default's backbone phase): the next run starts on its saved backbone."""
    cfg = tiny_config(tmp_path / "data", tmp_path, "backbone", model_modifier=None, trainable_param_names=".*")
    cfg.n_tasks = len(TASKS)
    model = build_routed_model(cfg, load_tokenizer("byte"))
    run = tmp_path / "backbone"
    model.hf_model.save_pretrained(run / "final" / "backbone")
    cfg.save(run)
    nxt = continuation(run, model_modifier="poly", n_skills=2)
    assert Path(nxt.model) == run / "final" / "backbone"
    nxt.n_tasks = 1
    adapted = build_routed_model(nxt, load_tokenizer("byte"))
    start_from_checkpoint(adapted, nxt)  # nothing to load: fresh adapters on the saved backbone
    # the saved backbone was built with seed 7, this run's tiny-t5 would be built with seed 42
    saved, now = dict(model.hf_model.named_parameters()), dict(adapted.hf_model.named_parameters())
    assert set(saved) <= set(now)
    for name, param in saved.items():
        assert torch.equal(now[name], param), name
    with pytest.raises(ConfigError, match="switch_to_avg_modules needs a checkpoint with routed adapters"):
        continuation(run, model_modifier="poly", switch_to_avg_modules=True)

"""Pre-training pieces that need no Ray cluster: batch arithmetic, DeepSpeed config, resume rules,
the default two-phase plan, metrics files, run loading errors, and init_ray's safe defaults."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mttl.config import Config, load_config
from mttl.errors import CheckpointError, ConfigError
from mttl.models.run import load_run
from mttl.run_folder import read_metrics
from mttl.tracking import MetricsLogger
from mttl.train.checkpoint import check_resume
from mttl.train.recipe import BACKBONE_STEP_FACTOR, BACKBONE_WARMUP_FACTOR, DEFAULTS, backbone_phase_config
from mttl.train.deepspeed_config import deepspeed_config, micro_batch_size

REPO = Path(__file__).resolve().parent.parent


def _cfg(**values) -> Config:
    return Config().update(values, source="test")


def test_batch_arithmetic_is_explicit():
    assert micro_batch_size(_cfg(train_batch_size=32, gradient_accumulation_steps=2), 4) == 4
    with pytest.raises(ConfigError, match=r"train_batch_size=30 .* multiple of 8"):
        micro_batch_size(_cfg(train_batch_size=30, gradient_accumulation_steps=2), 4)


def test_deepspeed_config_carries_stage_precision_and_clipping():
    ds = deepspeed_config(_cfg(train_batch_size=16, gradient_accumulation_steps=2, zero_stage=3, precision="bf16",
                               max_grad_norm=1.0), 2)
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2 == ds["train_batch_size"]
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"] == {"enabled": True}
    assert ds["gradient_clipping"] == 1.0 and ds["zero_allow_untested_optimizer"] is True
    assert "gradient_clipping" not in deepspeed_config(_cfg(max_grad_norm=0), 1)
    with pytest.raises(ConfigError, match="precision=16 needs GPUs"):
        deepspeed_config(_cfg(precision="16"), 1)


def test_zero3_bounds_the_gathered_parameters():
    """DeepSpeed's defaults (1e9 live parameters, 1e9 reuse distance) would keep a whole sub-billion
    backbone gathered beside its partition; mttl bounds it by `zero3_live_parameters`, by default
    twice the largest layer: for T5 the shared embedding, vocab x d_model."""
    import transformers

    from mttl.train.deepspeed_config import largest_layer_params, zero3_gather_limits

    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=1000, d_model=48, d_ff=96, num_layers=2, num_heads=2, d_kv=24))
    assert largest_layer_params(t5) == 1000 * 48
    assert zero3_gather_limits(_cfg(zero_stage=3), 48_000) == {
        "stage3_max_live_parameters": 96_000, "stage3_max_reuse_distance": 96_000,
        "stage3_prefetch_bucket_size": 48_000, "reduce_bucket_size": 96_000, "sub_group_size": 10**7}
    zero = deepspeed_config(_cfg(zero_stage=3, zero3_live_parameters=10**6), 1)["zero_optimization"]
    assert zero["stage3_max_live_parameters"] == zero["stage3_max_reuse_distance"] == 10**6
    assert "stage3_max_live_parameters" not in deepspeed_config(_cfg(zero_stage=2), 1)["zero_optimization"]


def test_resume_allows_only_a_larger_total():
    saved = _cfg(total_steps=100, learning_rate=1e-3)
    check_resume(saved, _cfg(total_steps=200, learning_rate=1e-3, log_every=5), Path("run/config.json"))
    with pytest.raises(CheckpointError, match="only be continued to a larger total"):
        check_resume(saved, _cfg(total_steps=50, learning_rate=1e-3), Path("run/config.json"))
    with pytest.raises(CheckpointError, match=r"learning_rate \(0.001 → 0.01\), lora_rank"):
        check_resume(saved, _cfg(total_steps=100, learning_rate=1e-2, lora_rank=2), Path("run/config.json"))


def test_default_runs_a_full_backbone_phase_before_the_adapters():
    cfg = load_config(None, [], base=DEFAULTS)
    assert cfg.model is None and cfg.model_modifier == "poly"
    cfg.run_name = "demo"
    phase_one = backbone_phase_config(cfg)
    assert phase_one.model == "tiny-t5" and phase_one.model_modifier is None
    assert phase_one.trainable_param_names == ".*" and phase_one.run_name == "demo-backbone"
    assert phase_one.total_steps == BACKBONE_STEP_FACTOR * cfg.total_steps
    # phase one warms up over more steps than phase two's adapters (each its own measured warm-up)
    assert phase_one.warmup_steps == BACKBONE_WARMUP_FACTOR * cfg.warmup_steps != cfg.warmup_steps
    # a user's key wins over the phase's default
    user = load_config(None, ["learning_rate=0.02", "total_steps=10"], base=DEFAULTS)
    user.run_name = "demo"
    assert backbone_phase_config(user).learning_rate == 0.02
    assert backbone_phase_config(user).total_steps == 10 * BACKBONE_STEP_FACTOR


def test_metrics_go_to_jsonl_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, _cfg(tensorboard=True)) as logger:
        logger.log({"step": 1, "loss": 2.5, "lr/adapters": 1e-3})
        logger.log({"step": 2, "loss": 2.0, "lr/adapters": 2e-3})
    assert [r["loss"] for r in read_metrics(tmp_path)] == [2.5, 2.0]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 2.5), (2, 2.0)]
    assert "lr/adapters" in events.Tags()["scalars"]


def test_load_run_names_what_is_missing(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_run(tmp_path / "absent")
    with pytest.raises(CheckpointError, match="is not a run folder"):
        load_run(tmp_path)
    _cfg().save(tmp_path)
    with pytest.raises(CheckpointError, match="has no final/"):
        load_run(tmp_path)


def test_pretrain_cli_reports_bad_batch_arithmetic_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "jobs" / "pretrain.py"), "-k", "model=tiny-t5",
                           "train_batch_size=7", "num_workers=2", f"output_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "mttl: error: train_batch_size=7 is not divisible by gradient_accumulation_steps=1 × num_workers=2; "
        "set train_batch_size to a multiple of 2"]


def test_init_ray_starts_a_loopback_cluster_with_token_auth(tmp_path):
    script = ("import json, os\n"
              "from mttl.config import Config\n"
              "from mttl.ray_utils import init_ray\n"
              "import ray\n"
              "init_ray(Config())\n"
              "print(json.dumps({'ip': ray.nodes()[0]['NodeManagerAddress'], 'auth': os.environ['RAY_AUTH_MODE'],"
              " 'loopback': os.environ['RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER']}))\n")
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=env,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"ip": "127.0.0.1", "auth": "token", "loopback": "0"}

"""What `mttl pretrain` runs (`run_pretrain`), and its embedded two-phase recipe (`pretrain_default`),
which the quick start and the skills study (`benchmarks/study.py`) build on.

With a `model` in the config it runs one phase on the data's training tasks; with a `checkpoint`
(a finished run folder) it continues that run's adapters and routing in a new run. Without either
it runs the embedded default on the synthetic suite, in two phases through the same trainer: a
tiny T5 built from a config is trained whole on the warm-up tasks (`<run_name>-backbone`), then
frozen and given routed adapters (Poly) trained on the composition tasks (`<run_name>`).
"""

from __future__ import annotations

from pathlib import Path

from mttl.config import Config
from mttl.errors import ConfigError

DEFAULT_RUN_NAME = "synthetic_poly"
# The embedded default, sized for two CPU cores: about 100–130 ms per step (tiny T5 d_model 128, batch 32,
# benchmarks/train_overhead.py), so 2,400 + 1,200 steps take ≈ 6.5 minutes with start-up (389 s), leaving the
# quick start's fine-tuning room within 10 minutes. Phase one needs its 2,400 steps: the warm-up tasks'
# validation loss drops steeply between steps 1,200 and 2,200 (0.14 at 2,400; 1.16 after 1,800 steps even
# at lr 2e-3). Phase two is what limited the few-shot results: at 400 steps and adapters at 3e-3 its
# validation loss stayed at 0.91 and MHR reached 2.9 held-out exact match; 1,200 steps at 1e-2 reach 0.26
# and 36.8 (docs/results.md, "Recipe search").
DEFAULTS = {
    "model_modifier": "poly",
    "n_skills": 4,
    "lora_rank": 4,
    "n_splits": 1,
    "trainable_param_names": ".*lora_[ab].*|.*module_logits.*",
    "tokenizer": "byte",
    "max_input_length": 32,
    "max_output_length": 32,
    "train_batch_size": 32,
    "predict_batch_size": 64,
    "learning_rate": 1e-3,
    "adapters_learning_rate": 1e-2,
    "max_grad_norm": 1.0,
    "total_steps": 1200,
    "eval_every": 400,
    "save_every": 600,
    "log_every": 50,
    # phase two's: its validation loss ended at 0.26 after 30 warm-up steps, 0.28 after 90 (and MHR at 36.8
    # against 34.5); phase one scales it by BACKBONE_WARMUP_FACTOR
    "warmup_steps": 30,
}
# Phase one of the default: the whole tiny backbone on the warm-up tasks, no adapters.
BACKBONE_PHASE = {
    "model": "tiny-t5",
    "model_modifier": None,
    "trainable_param_names": ".*",
    "adapters_learning_rate": None,
}
# Phase one runs this many times phase two's steps (and evaluates/saves at the same fraction):
# the warm-up tasks teach the backbone from scratch (2,400 steps against phase two's 1,200).
BACKBONE_STEP_FACTOR = 2
# Phase one's warm-up is this many times phase two's: 180 steps, the warm-up its 2,400 steps were measured
# with (a learning rate reached too early could move the steep drop of its loss; not measured).
BACKBONE_WARMUP_FACTOR = 6
BACKBONE_SUFFIX = "-backbone"


def run_pretrain(cfg: Config) -> Path:
    """One run of `cfg` when it names a `model` or `checkpoint` (run_name default: <dataset>_<modifier>),
    else both phases of the embedded default; returns the (last) run folder."""
    from mttl.train.loop import pretrain

    if cfg.model or cfg.checkpoint:  # a checkpoint run names its own backbone
        if not cfg.run_name:
            cfg.run_name = f"{cfg.dataset}_{cfg.model_modifier or 'full'}"
        return pretrain(cfg)
    return pretrain_default(cfg)


def backbone_phase_config(cfg: Config) -> Config:
    """Phase one of the default: `cfg` with the backbone-phase settings the user did not set."""
    phase = cfg.copy()
    for key, value in BACKBONE_PHASE.items():
        if not cfg.was_overridden(key):
            setattr(phase, key, value)
    factors = {"total_steps": BACKBONE_STEP_FACTOR, "eval_every": BACKBONE_STEP_FACTOR,
               "save_every": BACKBONE_STEP_FACTOR, "warmup_steps": BACKBONE_WARMUP_FACTOR}
    for key, factor in factors.items():
        value = getattr(cfg, key)
        if value is not None and value > 0:
            setattr(phase, key, value * factor)
    phase.run_name = f"{cfg.run_name}{BACKBONE_SUFFIX}"
    phase.uniform_interp_steps = 0  # phase one has no routing; the annealing belongs to phase two
    return phase


def pretrain_default(cfg: Config) -> Path:
    """Both phases of the default; phase one's saved backbone is phase two's `model`."""
    from mttl import storage
    from mttl.run_folder import BACKBONE_DIR, FINAL_DIR, remote_run_for
    from mttl.train.loop import pretrain

    if cfg.dataset != "synthetic":
        raise ConfigError(f"dataset={cfg.dataset} needs a backbone: pass -k model=NAME_OR_PATH "
                          "(only the synthetic suite trains its own tiny backbone first)")
    if not cfg.model_modifier:
        raise ConfigError("the default run trains adapters on a frozen backbone; set model_modifier, "
                          "or -k model=tiny-t5 model_modifier=None to train a backbone alone")
    cfg.run_name = cfg.run_name or DEFAULT_RUN_NAME
    phase_one = backbone_phase_config(cfg)
    backbone_dir = pretrain(phase_one, roles=("warmup",))
    # phase two's `model` is phase one's final/backbone: in a bucket its URI, which every worker (and
    # every later reader of the run) copies down to its own cache_dir
    phase_one_uri = remote_run_for(phase_one, "pretrain")
    model = (storage.join(phase_one_uri.rstrip("/"), FINAL_DIR, BACKBONE_DIR) if phase_one_uri
             else str(backbone_dir / FINAL_DIR / BACKBONE_DIR))
    return pretrain(cfg.copy(model=model))

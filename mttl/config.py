"""Typed run configuration: defaults, `-c a.json+b.json -k key=value` merging, aliases, dumps.

One `Config` dataclass holds every key any command reads, as flat attributes; it inherits them from
one dataclass per section (`SECTIONS`: run, data, model, adapters, training, finetune, search,
cluster), the adapters section being built from `AdapterConfig`'s own fields. Each field carries
its help text in `metadata["help"]` (the configuration reference in docs/ is generated from it).
Config files may be flat or grouped by section; config.json in run folders is flat. Merge order:
defaults < config files (left to right) < `-k` overrides. Keys set by a file or `-k` are
remembered so fine-tuning can tell them from defaults (`was_overridden`).

The reference system's key names and old aliases are accepted (see `ALIASES`), and its keys that
never had an effect are accepted with a warning (see `NO_EFFECT_KEYS`) so its configs keep working.
Its keys that shaped the data are `mttl prepare` options here and refused in a run config, naming
the option (see `PREPARE_ONLY_KEYS`).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import json
import math
import os
import string
import warnings
from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from mttl.adapters.config import AdapterConfig
from mttl.errors import ConfigError
from mttl.finetune.type_table import FINETUNE_TYPE_CHOICES, finetune_type_help
from mttl.run_folder import atomic_write_text, read_json
from mttl.tracking import absolute_tracking_uri

PACKAGE_CONFIG_DIR = Path(__file__).parent / "configs"
REPO_ROOT = Path(__file__).resolve().parent.parent


def _env(name: str, default: str | None) -> str | None:
    return os.environ.get(name, default)


def _f(default: Any, help: str, *, env: str | None = None, path: bool = False, choices=None):
    """A config field with help text; `env` names the environment variable its default honours
    (`metadata["default"]` keeps the declared default, which the generated docs show)."""
    meta = {"help": help, "env": env, "path": path, "choices": choices, "default": default}
    if env is not None:
        return field(default_factory=lambda: _env(env, default), metadata=meta)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: json.loads(json.dumps(default)), metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------- sections
# Each section is a dataclass of its keys; `Config` inherits them all, so every key stays a flat
# attribute (`cfg.learning_rate`) and a flat key in config.json, while `Config.section(name)`,
# `to_dict(sectioned=True)`, `mttl configs --show` and docs/configuration.md group them.

@dataclass
class RunSection:
    """Where a run writes, what it is called, and where it reports its metrics."""

    output_dir: str = _f("./output", "Folder under which each run gets `<output_dir>/<run_name>/`; may be a bucket "
                         "URI (s3://bucket/runs, gs://…) for pretrain, evaluate and a single-task finetune, "
                         "credentials from the environment. Example: -k output_dir=/mnt/shared/runs",
                         env="OUTPUT_DIR", path=True)
    run_name: str | None = _f(None, "Name of the run folder; the same name resumes the same run. Default: derived from "
                              "the command and model modifier. Example: -k run_name=mhr_ni_s8")
    cache_dir: str = _f("./cache", "Cache for downloaded models, tokenized data and this machine's copies of what it "
                        "reads from buckets (storage/). Example: -k cache_dir=/mnt/cache",
                        env="CACHE_DIR", path=True)
    tensorboard: bool = _f(True, "Write TensorBoard event files into the run folder. Example: -k tensorboard=False")
    verbose: bool = _f(False, "Show Ray's, DeepSpeed's and Hugging Face's own log lines on the console; by default "
                       "they go to the run folder's logs/internal.log (or <output_dir>/logs/) and the console keeps "
                       "mttl's progress and results. Example: -k verbose=True")
    mlflow_tracking_uri: str | None = _f(None, "Log runs to MLflow at this URI (experiment `mttl`, one MLflow run per "
                                         "run folder); a relative local path is taken from the folder you run mttl in. "
                                         "Example: -k mlflow_tracking_uri=file:./mlruns")
    wandb_project: str | None = _f(None, "Log runs to this Weights & Biases project (needs `pip install 'mttl[wandb]'` "
                                   "and WANDB_API_KEY, or WANDB_MODE=offline). Example: -k wandb_project=mttl")


@dataclass
class DataSection:
    """The task collection, its prepared shards, the tasks used and how they are mixed and cut."""

    dataset: str = _f("synthetic", "Task collection: synthetic, ni, t0 or xfit. Example: -k dataset=ni",
                      choices=["synthetic", "ni", "t0", "xfit"])
    data_dir: str | None = _f(None, "Folder of prepared shards (`mttl prepare … --out DIR`), or its bucket URI "
                              "(s3://bucket/data/ni). Default: the dataset's *_DATA_DIR, else a fresh synthetic suite. "
                              "Example: -k data_dir=data/shards/ni",
                              path=True)
    t0_data_dir: str | None = _f(None, "Prepared T0 shards (default for dataset=t0). "
                                 "Example: -k t0_data_dir=data/shards/t0", env="T0_DATA_DIR", path=True)
    ni_data_dir: str | None = _f(None, "Prepared Super-NaturalInstructions shards (default for dataset=ni). "
                                 "Example: -k ni_data_dir=data/shards/ni", env="NI_DATA_DIR", path=True)
    xfit_data_dir: str | None = _f(None, "Prepared CrossFit shards (default for dataset=xfit). "
                                   "Example: -k xfit_data_dir=data/shards/xfit", env="XFIT_DATA_DIR", path=True)
    tasks: list | None = _f(None, "Task names to use (pre-training: training tasks; sweeps/evaluate/finetune: held-out "
                            "tasks, finetune running each task x seed as a Ray task; finetune and evaluate also take "
                            "held_out for every held-out task). Default: all tasks of the right role. "
                            "Example: -k tasks=['cb','rte']")
    custom_tasks_splits: str | None = _f(None, "Reference key: a file listing the task names to train on, one per "
                                         "line. Example: -k custom_tasks_splits=splits/my_tasks.txt", path=True)
    tokenizer: str | None = _f(None, "Tokenizer: a local folder, a hub name, or `byte` (ByT5 bytes, needs no files). "
                               "Default: the model's own, else `byte`. Example: -k tokenizer=../shared/tokenizers/t5",
                               path=True)
    task_mixing: str = _f("proportional", "How training tasks are mixed: proportional (examples-proportional with "
                          "`mixing_cap`), uniform, temperature. Example: -k task_mixing=temperature",
                          choices=["proportional", "uniform", "temperature"])
    mixing_cap: int = _f(500_000, "Examples-proportional mixing: at most this many examples per task per epoch. "
                         "Example: -k mixing_cap=1000")
    mixing_temperature: float = _f(2.0, "Temperature mixing: task rate ∝ size^(1/T). "
                                   "Example: -k mixing_temperature=3")
    max_input_length: int = _f(512, "Input tokens kept per example. Example: -k max_input_length=256")
    max_output_length: int = _f(64, "Target tokens kept per example; also the generation limit. "
                                "Example: -k max_output_length=128")


@dataclass
class ModelSection:
    """The frozen backbone, and the finished run a command starts from."""

    model: str | None = _f(None, "Backbone: a Hugging Face seq2seq hub name, a local folder, a run folder (its trained "
                           "backbone), or `tiny-t5` (a small T5 built from a config). "
                           "Example: -k model=google/t5-xl-lm-adapt", path=True)
    trust_remote_code: bool = _f(False, "Allow the Python code a backbone folder or hub model ships (`auto_map`) to "
                                 "run when loading it. Off by default; only your own -c/-k of the command set it, "
                                 "never a run folder's config.json. Example: -k trust_remote_code=True")
    tiny_d_model: int = _f(128, "tiny-t5 backbone: hidden size. Example: -k tiny_d_model=64")
    tiny_num_layers: int = _f(2, "tiny-t5 backbone: encoder (and decoder) blocks. Example: -k tiny_num_layers=4")
    freeze_embeds: bool = _f(False, "Keep the token (and learned position) embeddings frozen even when "
                             "`trainable_param_names` matches them (full-model training, finetune_type=F). "
                             "Example: -k freeze_embeds=True")
    checkpoint: str | None = _f(None, "A finished run folder (or its `final/` folder; a plain name is looked up in "
                                "`checkpoint_dir`) to start from. Fine-tuning and evaluation load it; `mttl pretrain` "
                                "continues its adapters and routing in a new run (fresh optimizer, schedule and step "
                                "count; the architecture and data keys you leave unset come from it). A bucket URI "
                                "(s3://bucket/runs/name) is copied into cache_dir first. "
                                "Example: -k checkpoint=output/mhr_synthetic", path=True)
    checkpoint_dir: str = _f("./checkpoints", "Where `checkpoint=NAME` is looked up when NAME is not an existing path. "
                             "Example: -k checkpoint_dir=/mnt/ckpts", env="CHECKPOINT_DIR", path=True)


@dataclass
class TrainingSection:
    """Optimizer, schedule, batches, precision, validation and checkpoints of a training run."""

    optimizer: str = _f("adamw", "adamw or adafactor (adam and sgd also accepted). Example: -k optimizer=adafactor",
                        choices=["adamw", "adam", "sgd", "adafactor"])
    learning_rate: float = _f(1e-3, "Learning rate of everything that is not routing logits or adapters. "
                              "Example: -k learning_rate=3e-4")
    adapters_learning_rate: float | None = _f(
        None, "Learning rate of adapter weights (default: learning_rate). Example: -k adapters_learning_rate=1e-3")
    module_logits_learning_rate: float = _f(0.1, "Learning rate of the routing logits. "
                                            "Example: -k module_logits_learning_rate=0.5")
    weight_decay: float = _f(0.01, "Weight decay (routing logits get none). Example: -k weight_decay=0")
    adapters_weight_decay: float | None = _f(
        None, "Weight decay of adapter weights (default: weight_decay). Example: -k adapters_weight_decay=0")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon. Example: -k adam_epsilon=1e-6")
    adafactor_scale_parameter: bool = _f(True, "Adafactor: scale the step by the parameter's RMS. "
                                         "Example: -k adafactor_scale_parameter=False")
    adafactor_relative_step: bool = _f(False, "Adafactor: time-dependent relative step (ignores learning rates). "
                                       "Example: -k adafactor_relative_step=True")
    adafactor_warmup_init: bool = _f(False, "Adafactor: warm-up initialisation of the relative step. "
                                     "Example: -k adafactor_warmup_init=True")
    scheduler: str = _f("linear_decay_with_warmup", "Learning-rate schedule: linear_decay_with_warmup or constant. "
                        "Example: -k scheduler=constant", choices=["linear_decay_with_warmup", "constant"])
    warmup_proportion: float = _f(0.06, "Warm-up steps as a fraction of total_steps (used when warmup_steps < 0). "
                                  "Example: -k warmup_proportion=0.1")
    warmup_steps: int = _f(-1, "Warm-up steps; -1 = warmup_proportion × total_steps. Example: -k warmup_steps=1500")
    total_steps: int = _f(-1, "Optimizer steps; -1 = from num_train_epochs and the data size. "
                          "Example: -k total_steps=20_000")
    num_train_epochs: int = _f(-1, "Epochs when total_steps < 0. Example: -k num_train_epochs=3")
    train_batch_size: int = _f(8, "Global batch = micro batch × gradient_accumulation_steps × num_workers. "
                               "Example: -k train_batch_size=32")
    predict_batch_size: int = _f(32, "Batch size for evaluation and generation. Example: -k predict_batch_size=8")
    gradient_accumulation_steps: int = _f(1, "Micro batches per optimizer step. "
                                          "Example: -k gradient_accumulation_steps=2")
    num_beams: int = _f(4, "Beam width for generation tasks. Example: -k num_beams=1")
    label_smoothing: float | None = _f(None, "Label smoothing ε of the training loss (pre-training and few-shot "
                                       "generation tasks): (1−ε)·NLL + ε·mean over the vocabulary of −log p. "
                                       "Default: NI 0.1 (the reference's), others 0 (T0 trains without). "
                                       "Example: -k label_smoothing=0")
    max_grad_norm: float = _f(0.1, "Gradient clipping norm (0 = off). Example: -k max_grad_norm=1.0")
    precision: str = _f("32", "Numeric precision of training and scoring: 32, bf16 or 16 (fp16 with a gradient scaler, "
                        "GPU only). Fine-tuning and evaluation compute under autocast, adapters and routing logits "
                        "stay fp32; pre-training uses DeepSpeed's bf16/fp16 modes. Example: -k precision=bf16",
                        choices=["32", "bf16", "16"])
    backbone_dtype: str = _f("auto", "dtype of the frozen backbone weights: auto (bf16 under precision=bf16, else 32), "
                             "32, bf16 or 16 (must match precision); trained weights stay fp32. Pre-training's "
                             "DeepSpeed bf16/fp16 modes hold the whole module in that dtype, so there 32 is refused "
                             "under half precision. Example: -k backbone_dtype=32",
                             choices=["auto", "32", "bf16", "16"])
    gradient_checkpointing: bool = _f(False, "Recompute each transformer block's activations in backward instead of "
                                      "keeping them (transformers' non-reentrant checkpointing; routed adapters get "
                                      "their task ids again), trading about a third more compute for activation "
                                      "memory. Example: -k gradient_checkpointing=True")
    eval_every: int | None = _f(None, "Validate every N optimizer steps (pre-training). Example: -k eval_every=500")
    save_every: int | None = _f(None, "Checkpoint every N optimizer steps (also at the end). "
                                "Example: -k save_every=1000")
    log_every: int = _f(10, "Log a metrics row every N optimizer steps. Example: -k log_every=50")
    num_to_keep: int = _f(2, "Checkpoints kept by Ray Train. Example: -k num_to_keep=3")
    seed: int = _f(42, "Random seed (data order, init, sampling). Example: -k seed=13")
    uniform_interp_steps: int = _f(0, "Pre-training: over the last N steps pull learned routing towards uniform, w ← "
                                   "α·w + (1−α)/K with α = cos(π/2·n/N), n = N − (total_steps − step) (1 "
                                   "until then, logged as `uniform_alpha`); 0 = off. Needs router_selector=poly, N ≤ "
                                   "total_steps. Example: -k uniform_interp_steps=1000")
    switch_to_avg_modules: bool = _f(False, "Pre-training from `checkpoint`: replace its learned routing by the "
                                     "uniform average 1/K and train the averaged adapters on the multi-task data "
                                     "(MHR-µ zero-shot); the run saves average routing, which fine-tuning uses with "
                                     "finetune_type=MuZ. Example: -k switch_to_avg_modules=True")


@dataclass
class FinetuneSection:
    """Few-shot adaptation of a finished run to held-out tasks (`mttl finetune`)."""

    finetune_type: str | None = _f(None, finetune_type_help() + ". Example: -k finetune_type=Z",
                                   choices=FINETUNE_TYPE_CHOICES)
    finetune_task_name: str | list | None = _f(
        None, "Held-out task(s) to adapt to. One name runs its seeds in this process; a list runs every task x seed as "
        "its own Ray task (resources_per_run), as does tasks=[...] or tasks=held_out (every held-out task of the data) "
        "with this key unset. Example: -k finetune_task_name=\"['cb','rte']\"")
    seeds: list | None = _f(None, "Fine-tuning seeds. Default: T0 [42, 1024, 0]; NI and others [13, 42, 58]. "
                            "Example: -k seeds=[13]")
    num_shots: int | None = _f(None, "k training examples per held-out task. Default: the dataset's (T0: per task; NI: "
                               "32; synthetic: 32). Example: -k num_shots=16")
    eval_every_epochs: int | None = _f(None, "Validate every N epochs during fine-tuning. Default: T0 50, others 10. "
                                       "Example: -k eval_every_epochs=5")
    finetune_skip_es: bool = _f(False, "Test the last weights instead of the best validation checkpoint. "
                                "Example: -k finetune_skip_es=True")
    do_zs: bool = _f(True, "Score the task zero-shot before fine-tuning. Example: -k do_zs=False")
    mc_loss: float = _f(0.0, "Weight of the multiple-choice cross-entropy (T-Few). Example: -k mc_loss=1")
    unlikely_loss: float = _f(0.0, "Weight of the unlikelihood loss on wrong choices (T-Few). "
                              "Example: -k unlikely_loss=1")
    length_norm: float = _f(0.0, "Choice score = NLL / length^length_norm. Example: -k length_norm=1")


@dataclass
class SearchSection:
    """Hyper-parameter sweeps over fine-tuning (`mttl sweep`)."""

    tune_space: str | None = _f(None, "Search space: a module name in tune_spaces/ or a path to a .py file. Default: "
                                "from finetune_type and model_modifier. Example: -k tune_space=mhr_z")
    search: str = _f("optuna", "optuna (TPE + ASHA) or grid (the reference preset). Example: -k search=grid",
                     choices=["optuna", "grid"])
    num_samples: int = _f(8, "Trials per study (optuna search). Example: -k num_samples=16")
    search_starts_from_grid: bool = _f(True, "optuna search: the first trials are the space's preset grid points in "
                                       "order (full steps; ASHA stops the poor ones early), then TPE explores from "
                                       "what they scored. Example: -k search_starts_from_grid=False")
    start_race_validations: int = _f(1, "optuna search from the grid: the grid's points first race side by side "
                                     "(each task and seed), this many validations in the first lap; after each lap "
                                     "the worst third drop out on asha_metric and the rest run twice as long, the "
                                     "last two ranked on the score (4 points: laps of 1, 2, 4). The search starts "
                                     "from them best first, so ASHA measures later trials against the best point; "
                                     "their trials continue from these laps (start_race_continue); 0 keeps the "
                                     "grid's order. Example: -k start_race_validations=2")
    start_race_continue: bool = _f(True, "A raced grid point's trial continues from its lap (its weights, optimizer "
                                   "and data order, kept as the race trial's checkpoint: the trainable weights "
                                   "and optimizer states of every task and seed) instead of running it again; "
                                   "False keeps no lap state. Example: -k start_race_continue=False")
    max_concurrent_trials: int | None = _f(None, "Trials running at once. Default: as many as the Ray cluster's "
                                           "resources hold (trial_resources each). Example: -k max_concurrent_trials=2")
    trial_resources: dict | None = _f(None, "Ray resources per trial. Example: -k trial_resources=\"{'CPU': 1}\"")
    study_per_task: bool = _f(True, "One study per task (False: one study across all tasks). "
                              "Example: -k study_per_task=False")
    asha_grace_period: int = _f(1, "ASHA: validations before a trial can be stopped. Example: -k asha_grace_period=2")
    asha_reduction_factor: int = _f(2, "ASHA: reduction factor. Example: -k asha_reduction_factor=3")
    asha_metric: str = _f("loss", "What ASHA compares trials on: loss (the mean lowest validation loss, which moves "
                          "from the first steps) or score (the running mean of the best validation scores, often 0 "
                          "early in a few-shot run). TPE always models the final score. Example: -k asha_metric=score",
                          choices=["loss", "score"])
    trust_sweep_state: bool = _f(False, "Resume a sweep whose Ray Tune state files (pickles) this machine's mttl did "
                                 "not sign, e.g. one started on another machine or by another user: only for a sweep "
                                 "folder whose every file you trust, as loading it runs code. Set only by your own "
                                 "-c/-k, never read from a saved config.json. Example: -k trust_sweep_state=True")


@dataclass
class ClusterSection:
    """The Ray cluster, workers, devices, DeepSpeed ZeRO and failure handling."""

    ray_address: str | None = _f(None, "Existing Ray cluster to connect to (also read from RAY_ADDRESS). Default: "
                                 "start a local cluster on 127.0.0.1. Example: -k ray_address=auto")
    num_workers: int = _f(1, "Ray Train workers (one DeepSpeed rank each). Example: -k num_workers=8")
    use_gpu: bool | str = _f("auto", "auto (a GPU when the process has one: in Ray tasks and trials the GPUs Ray "
                             "assigned them, for pre-training the cluster's), True (fail at once when there is none) "
                             "or False. Pre-training: one GPU per worker, NCCL. Example: -k use_gpu=True",
                             choices=["auto", True, False])
    resources_per_worker: dict | None = _f(None, "Ray resources per train worker. Default: {'CPU': 1} on GPU, a "
                                           "fraction of the free CPUs on CPU. "
                                           "Example: -k resources_per_worker=\"{'CPU': 4}\"")
    resources_per_run: dict | None = _f(None, "Ray resources of one task x seed of a multi-task `mttl finetune`, "
                                        "and of one task of `mttl evaluate` (which runs each task as a Ray task "
                                        "when this is set or a cluster is joined). "
                                        "Default: 1 CPU, plus 1 GPU when use_gpu finds GPUs in the cluster. "
                                        "Example: -k resources_per_run=\"{'CPU': 2, 'GPU': 0.25}\"")
    zero_stage: int = _f(0, "DeepSpeed ZeRO stage 0–3. Example: -k zero_stage=3", choices=[0, 1, 2, 3])
    offload_optimizer: str = _f("none", "Pre-training, ZeRO stage 1–3: keep the optimizer states, fp32 master "
                                "weights and gradients on the CPU (DeepSpeed's `zero_optimization.offload_optimizer`), "
                                "leaving only the module's weights on the device. "
                                "Example: -k zero_stage=2 offload_optimizer=cpu", choices=["none", "cpu"])
    offload_params: str = _f("none", "Pre-training, ZeRO stage 3: keep the partitioned weights on the CPU too, "
                             "gathered to the device layer by layer (DeepSpeed's `zero_optimization.offload_param`). "
                             "Example: -k zero_stage=3 offload_params=cpu", choices=["none", "cpu"])
    zero3_live_parameters: int | None = _f(None, "ZeRO-3: the most parameters a worker holds gathered at once "
                                           "(DeepSpeed's `stage3_max_live_parameters` and "
                                           "`stage3_max_reuse_distance`; half of it is the prefetch bucket). Layers "
                                           "beyond it are released after use, so a worker holds its partition plus "
                                           "about this much of the frozen backbone. Default: twice the largest layer "
                                           "(DeepSpeed's own default, 1e9, keeps a whole sub-billion backbone "
                                           "gathered). Example: -k zero_stage=3 zero3_live_parameters=200000000")
    compute_strategy: str | None = _f(None, "Reference key mapped onto zero_stage: ddp → 0, deepspeed_stage_N → N. "
                                      "Example: -k compute_strategy=deepspeed_stage_2")
    device_memory_gb: float | None = _f(None, "Memory of one worker's device in GB (10^9 bytes) that `mttl plan` "
                                        "checks a run against (GPU memory with use_gpu, else the worker's share of "
                                        "RAM). Example: -k device_memory_gb=80")
    max_failures: int = _f(0, "Worker/node failures the run survives by restarting from its last checkpoint. "
                           "Example: -k max_failures=3")
    worker_start_timeout_s: float = _f(120.0, "Seconds Ray Train waits for its workers to get their resources before "
                                       "the run fails with a message (raise it for an autoscaling cluster that must "
                                       "add nodes first). Example: -k worker_start_timeout_s=900")
    data_timeout_s: float = _f(600.0, "Seconds a training worker waits for its next batch from Ray Data before the run "
                               "fails with a message (a node lost with its blocks, a stalled read) instead of hanging. "
                               "Example: -k data_timeout_s=1800")
    collective_timeout_s: float = _f(1800.0, "Seconds every worker waits for the others at a report or checkpoint "
                                     "before the run fails with a message instead of hanging. "
                                     "Example: -k collective_timeout_s=3600")


def _adapters_section() -> type:
    """The adapters section, built from `AdapterConfig`'s own fields: each field's `key` metadata
    is its run-config key, with the field's default, allowed values and help (`run_type` and
    `run_default` where the run config differs: `n_tasks` is unset until the data sets it)."""
    specs = []
    for f in fields(AdapterConfig):
        meta = f.metadata
        default = meta.get("run_default", f.default)
        specs.append((meta["key"], meta.get("run_type", f.type), _f(default, meta["help"], choices=meta["choices"])))
    section = make_dataclass("AdaptersSection", specs)
    section.__module__ = __name__  # pickles (Ray) find it here
    section.__doc__ = ("Adapter layers and routing: the settings of `mttl.adapters.config.AdapterConfig` "
                       "(`AdapterConfig.from_config` reads them).")
    return section


AdaptersSection = _adapters_section()

# Section name → its dataclass, in the order the docs and `to_dict(sectioned=True)` show them. A
# sectioned JSON file nests keys under these names; "model" and "search" are keys too, told apart
# by their value (a section is an object, those keys never are).
SECTIONS: dict[str, type] = {
    "run": RunSection, "data": DataSection, "model": ModelSection, "adapters": AdaptersSection,
    "training": TrainingSection, "finetune": FinetuneSection, "search": SearchSection, "cluster": ClusterSection,
}
KEY_SECTIONS = {f.name: name for name, section in SECTIONS.items() for f in fields(section)}


# Dataclass fields come from the last base first: this order lists them as SECTIONS does.
@dataclass
class Config(ClusterSection, SearchSection, FinetuneSection, TrainingSection, AdaptersSection, ModelSection,
             DataSection, RunSection):
    """Every key any command reads (see the sections above), with the merge bookkeeping."""

    _overridden: set = field(default_factory=set, repr=False, compare=False, metadata={"help": "internal"})

    # ------------------------------------------------------------------------------------ API
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if not f.name.startswith("_")]

    @classmethod
    def help_for(cls, key: str) -> str:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}[key]

    @staticmethod
    def section_of(key: str) -> str:
        """The section a key (or alias) belongs to, e.g. 'training' for learning_rate."""
        return KEY_SECTIONS[canonical_key(key)]

    def section(self, name: str):
        """The section `name` of SECTIONS as its own dataclass, holding this config's values."""
        if name not in SECTIONS:
            raise ConfigError(f"config section '{name}' does not exist; use one of {list(SECTIONS)}")
        section = SECTIONS[name]
        return section(**{f.name: getattr(self, f.name) for f in fields(section)})

    def was_overridden(self, key: str) -> bool:
        """True when `key` was set by a config file or `-k`, not left at its default."""
        return canonical_key(key) in self._overridden

    def was_default(self, key: str) -> bool:
        return not self.was_overridden(key)

    def update(self, values: dict, source: str = "-k", *, expand_env: bool = True) -> "Config":
        """Apply `values` (aliases resolved, paths expanded); unknown keys raise naming the closest.

        `expand_env=False` keeps `$VAR` and `~` in path keys as written (values read back from a
        saved config.json were expanded when they were first set)."""
        known = {f.name: f for f in fields(self) if not f.name.startswith("_")}
        for raw_key, value in flatten_sections(values, source).items():
            if raw_key in PREPARE_ONLY_KEYS:
                raise ConfigError(f"config key '{raw_key}' (from {source}) shapes the prepared data, so it is an "
                                  f"option of `mttl prepare` only: drop the key and prepare with "
                                  f"`{PREPARE_ONLY_KEYS[raw_key]}`")
            key, value = _resolve_alias(raw_key, value)
            if key is None:
                warnings.warn(f"config key '{raw_key}' (from {source}) has no effect in mttl, as in the reference; "
                              "ignored")
                continue
            if key not in known:
                raise ConfigError(_unknown_key_message(raw_key, source, known))
            if expand_env and known[key].metadata.get("path") and isinstance(value, str):
                value = _expand(value, raw_key, source)
            if key == "mlflow_tracking_uri" and isinstance(value, str):
                value = absolute_tracking_uri(value)  # Ray workers run in other folders
            value = _coerce(key, value, known[key], source)
            setattr(self, key, value)
            self._overridden.add(key)
        self._derive()
        return self

    def _derive(self) -> None:
        if self.model_modifier == "skilled" and self.router_selector == "poly":
            self.router_selector = "private"
        if self.compute_strategy:
            strategy = str(self.compute_strategy)
            if strategy.startswith("deepspeed_stage_"):
                self.zero_stage = int(strategy.split("_")[2])
            elif strategy not in ("ddp", "ddp_find_unused_parameters_false", "auto"):
                raise ConfigError(f"compute_strategy={strategy!r} is not understood; use zero_stage=0..3 instead")

    def resolved_data_dir(self) -> str | None:
        """data_dir, else the dataset's own *_DATA_DIR default."""
        if self.data_dir:
            return self.data_dir
        return {"t0": self.t0_data_dir, "ni": self.ni_data_dir, "xfit": self.xfit_data_dir}.get(self.dataset)

    def checkpoint_path(self) -> str | None:
        """`checkpoint` as given when that path exists, else the same name inside `checkpoint_dir`; a URI
        (`s3://bucket/runs/name`): this machine's copy of that run folder (files and a whole final/) in cache_dir."""
        from mttl import storage

        if self.checkpoint and storage.is_uri(self.checkpoint):
            uri = self.checkpoint.rstrip("/")
            uri = uri[:-len("/final")] if uri.endswith("/final") else uri
            return str(storage.local_run_copy(uri, self.cache_dir, folders=("final",)))
        if not self.checkpoint or os.path.exists(self.checkpoint):
            return self.checkpoint
        in_dir = os.path.join(self.checkpoint_dir, self.checkpoint)
        return in_dir if os.path.exists(in_dir) else self.checkpoint

    def resolved_label_smoothing(self) -> float:
        """label_smoothing, else the dataset's: NI 0.1 as the reference's NI loss, 0 for the rest."""
        if self.label_smoothing is not None:
            return self.label_smoothing
        return 0.1 if self.dataset == "ni" else 0.0

    def to_dict(self, sectioned: bool = False) -> dict:
        """{key: value}, or with `sectioned` {section: {key: value}} in SECTIONS order."""
        if sectioned:
            return {name: {f.name: getattr(self, f.name) for f in fields(section)}
                    for name, section in SECTIONS.items()}
        return {k: getattr(self, k) for k in self.field_names()}

    def overridden_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.field_names() if k in self._overridden}

    def save(self, folder: str | os.PathLike, name: str = "config.json") -> Path:
        """Write the merged config as JSON, atomically (temp file, then rename)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        payload = self.to_dict()
        payload["_overridden"] = sorted(self._overridden)
        return atomic_write_text(folder / name, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Config":
        """Read a `config.json` written by `save` (overridden-key bookkeeping included).

        The file may come from a folder someone else wrote, so its `SECURITY_KEYS` are dropped
        (they stay at their defaults) and its paths are not expanded: a `$VAR` in it would
        otherwise copy this shell's environment, credentials included, into the configs saved
        from it."""
        data = flatten_sections(_read_json(Path(path)), str(path))
        overridden = set(data.pop("_overridden", []))
        # run folders of earlier versions saved the data-shaping keys with the rest
        for key in (*SECURITY_KEYS, *PREPARE_ONLY_KEYS):
            data.pop(key, None)
        cfg = cls()
        cfg.update(data, source=str(path), expand_env=False)
        cfg._overridden = overridden - set(SECURITY_KEYS)
        return cfg

    def copy(self, **changes) -> "Config":
        new = dataclasses.replace(self)
        new._overridden = set(self._overridden)
        if changes:
            new.update(changes, source="code")
        return new

    def diff(self, other: "Config", ignore: Iterable[str] = ()) -> dict:
        """Keys whose values differ: {key: (self value, other value)}."""
        skip = set(ignore)
        return {k: (getattr(self, k), getattr(other, k)) for k in self.field_names()
                if k not in skip and getattr(self, k) != getattr(other, k)}


# Keys that let code from outside mttl run (a backbone's own Python, Ray Tune's pickled sweep
# state). They come only from the user's -c files and -k of the command being run, never from a
# run or sweep folder's saved config.json, which anyone who can write that folder can change.
SECURITY_KEYS = ("trust_remote_code", "trust_sweep_state")

# Old names → current names. A value of None marks a key handled specially in _resolve_alias.
ALIASES = {
    "lora_modules": "modify_modules",
    "lora_layers": "modify_layers",
    "patch_modules": "modify_modules",
    "patch_layers": "modify_layers",
    "poly_selector": "router_selector",
    "poly_granularity": "router_granularity",
    "exp_name": "run_name",
    "train_dir": "data_dir",
    "finegrained": None,
}

MODIFIER_ALIASES = {"poly_lora": "poly", "none": None, "None": None}

# Keys the reference's configs carry that never did anything there either.
# Keys the reference read while building its datasets. Here the data is prepared once into shards,
# so they are `mttl prepare` options, and a run config that sets one is refused with the flag to use.
PREPARE_ONLY_KEYS = {
    "use_task_descriptions": "mttl prepare ni --use-task-descriptions (the default; --no-use-task-descriptions "
                             "leaves them out) or mttl prepare xfit --use-task-descriptions",
    "num_pos_examples": "mttl prepare ni --num-pos-examples N",
    "max_instances_per_task": "mttl prepare ni --max-instances-per-task N",
    "use_t0_templates_as_tasks": "mttl prepare t0 --use-t0-templates-as-tasks",
    "use_t0_few_shot_training_set": "mttl prepare t0 --max-train-per-task 1000",
    "storycloze_dir": "mttl prepare t0 --storycloze-dir DIR (or STORYCLOZE_DIR)",
}

NO_EFFECT_KEYS = {
    "lora_init_scale", "lora_scaling_rank", "append_another_bos", "do_lowercase", "num_tasks_per_batch",
    "monitor_grad_alignment_on", "checkpoint_step", "backbone_checkpoint", "poly_selector_cluster_temp",
    "ortho_loss", "task_loss", "l1_loss", "mi_loss", "poly_unlikely_loss", "free_up_space",
    "example_to_ids_path", "embeddings_path", "use_precomputed_task_embeddings", "ni_online_eval",
    "t0_online_eval", "early_stop_on_zero_shot", "finetune_use_last_checkpoint", "task_prefix",
}


def canonical_key(key: str) -> str:
    if key == "finegrained":
        return "router_granularity"
    return ALIASES.get(key) or key


def _resolve_alias(key: str, value: Any) -> tuple[str | None, Any]:
    if key == "finegrained":
        return "router_granularity", ("finegrained" if _truthy(value) else "coarsegrained")
    if key in NO_EFFECT_KEYS:
        return None, value
    key = ALIASES.get(key, key)
    if key == "model_modifier" and isinstance(value, str) and value in MODIFIER_ALIASES:
        value = MODIFIER_ALIASES[value]
    return key, value


def flatten_sections(values: dict, source: str) -> dict:
    """Flat {key: value} from a mapping whose keys may be grouped by section ({"training": {...}}),
    as config files may be written; a key under another section than its own is refused."""
    flat: dict = {}
    for key, value in values.items():
        if key not in SECTIONS or not isinstance(value, dict):
            if key in SECTIONS and key not in KEY_SECTIONS:
                raise ConfigError(f"config section '{key}' (from {source}) must be an object of key: value pairs, "
                                  f"got {value!r}")
            if key in flat:
                raise ConfigError(f"config key '{key}' (from {source}) is given twice (flat and in its section); "
                                  "keep one")
            flat[key] = value
            continue
        for inner, inner_value in value.items():
            owner = KEY_SECTIONS.get(canonical_key(inner))
            if owner is not None and owner != key:
                raise ConfigError(f"config key '{inner}' (from {source}) belongs to section '{owner}', not '{key}'; "
                                  f"move it to \"{owner}\" (or write it flat)")
            if inner in flat:
                raise ConfigError(f"config key '{inner}' (from {source}) is given twice (flat and in its section); "
                                  "keep one")
            flat[inner] = inner_value
    return flat


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _unknown_key_message(key: str, source: str, known: dict) -> str:
    candidates = list(known) + list(ALIASES)
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else "; see `mttl <command> --help` or docs/configuration.md"
    return f"unknown config key '{key}' (from {source}){hint}"


def _expand(value: str, key: str, source: str) -> str:
    try:
        return os.path.expanduser(string.Template(value).substitute(os.environ))
    except KeyError as err:
        raise ConfigError(f"config key '{key}' (from {source}) uses ${err.args[0]}, which is not set in the "
                          "environment; export it or write the path out") from None
    except ValueError as err:
        raise ConfigError(f"config key '{key}' (from {source}) has a bad $-expression in {value!r}: {err}") from None


@dataclass(frozen=True)
class _Rule:
    """A value check: `ok(value)` must hold; `must_be` completes "config key 'k' must be …"."""

    ok: Callable[[Any], bool]
    must_be: str


def _at_least(low: float, *, or_value: float | None = None, meaning: str = "") -> _Rule:
    also = f" (or {or_value}: {meaning})" if or_value is not None else ""
    return _Rule(lambda v: v >= low or v == or_value, f"at least {low}{also}")


def _above(low: float) -> _Rule:
    return _Rule(lambda v: v > low, f"greater than {low}")


def _plain_name(value: str) -> bool:
    return value.strip() not in ("", ".", "..") and not any(c in value for c in ("/", "\\", "\0"))


_DROPOUT = _Rule(lambda v: 0 <= v < 1, "in [0, 1)")
_PROPORTION = _Rule(lambda v: 0 <= v <= 1, "in [0, 1]")
_PLAIN_NAME = _Rule(_plain_name, "a plain folder name inside output_dir (no '/', not '.', '..' or empty)")
_STR_LIST = _Rule(lambda v: all(isinstance(x, str) for x in v), "a list of names")
_INT_LIST = _Rule(lambda v: len(v) > 0 and all(isinstance(x, int) and not isinstance(x, bool) for x in v),
                  "a non-empty list of integers")

# Values a key may take beyond its type, checked whenever a value is set (-k, config files, code),
# so a bad value fails before anything starts instead of inside a Ray worker. None (an optional
# key left unset) is never checked. Learning rates: `learning_rate` (the default of every group)
# must be > 0; the adapters' and routing logits' own rates may be 0, which holds that group fixed.
VALUE_RULES: dict[str, _Rule] = {
    "run_name": _PLAIN_NAME,
    "tasks": _STR_LIST,
    "seeds": _INT_LIST,
    "num_workers": _at_least(1), "train_batch_size": _at_least(1), "predict_batch_size": _at_least(1),
    "gradient_accumulation_steps": _at_least(1), "num_beams": _at_least(1), "num_samples": _at_least(1),
    "lora_rank": _at_least(1), "n_skills": _at_least(1), "n_splits": _at_least(1), "n_tasks": _at_least(1),
    "tiny_d_model": _at_least(1), "tiny_num_layers": _at_least(1),
    "max_input_length": _at_least(1), "max_output_length": _at_least(1),
    "mixing_cap": _at_least(1), "mixing_temperature": _above(0),
    "total_steps": _at_least(1, or_value=-1, meaning="from num_train_epochs"),
    "num_train_epochs": _at_least(1, or_value=-1, meaning="unset"),
    "warmup_steps": _at_least(0, or_value=-1, meaning="from warmup_proportion"),
    "warmup_proportion": _PROPORTION,
    "learning_rate": _above(0), "adapters_learning_rate": _at_least(0), "module_logits_learning_rate": _at_least(0),
    "weight_decay": _at_least(0), "adapters_weight_decay": _at_least(0), "adam_epsilon": _above(0),
    "max_grad_norm": _at_least(0), "lora_dropout": _DROPOUT, "module_logits_dropout": _DROPOUT,
    "label_smoothing": _DROPOUT,
    "eval_every": _at_least(0), "save_every": _at_least(0), "log_every": _at_least(1), "num_to_keep": _at_least(1),
    "max_failures": _at_least(0, or_value=-1, meaning="retry without limit"), "uniform_interp_steps": _at_least(0),
    "num_shots": _at_least(1), "eval_every_epochs": _at_least(1), "max_concurrent_trials": _at_least(1),
    "asha_grace_period": _at_least(1), "asha_reduction_factor": _at_least(2),
    "start_race_validations": _at_least(0),
    "device_memory_gb": _above(0), "worker_start_timeout_s": _above(0), "collective_timeout_s": _above(0),
    "data_timeout_s": _above(0),
    "mc_loss": _at_least(0), "unlikely_loss": _at_least(0), "length_norm": _at_least(0),
}


def _coerce(key: str, value: Any, f: dataclasses.Field, source: str) -> Any:
    """Type and value checks so a wrong value fails at parse time with the key named."""
    if key == "precision":
        value = {"bf16-mixed": "bf16", "16-mixed": "16", "32-true": "32"}.get(str(value), str(value))
    if key == "backbone_dtype":
        value = {"float32": "32", "fp32": "32", "bfloat16": "bf16", "float16": "16", "fp16": "16"}.get(str(value),
                                                                                                      str(value))
    if key == "use_gpu":
        return _coerce_use_gpu(value, f, source)
    if key == "finetune_task_name" and isinstance(value, (list, tuple)):
        # several tasks: each task x seed becomes its own Ray task (mttl.finetune.fanout)
        if not all(isinstance(x, str) and x for x in value):
            raise ConfigError(f"config key 'finetune_task_name' (from {source}) must be a task name or a list of "
                              f"names, got {value!r}{_example_hint(f)}")
        return list(value)
    type_name = str(f.type)
    if value is None:
        return value
    try:
        if type_name.startswith(("int", "float")) and isinstance(value, bool):
            raise ValueError  # True is an int to Python, never a count or a rate to a user
        if type_name.startswith("int"):
            if isinstance(value, float) and value != int(value):
                raise ValueError
            value = int(value)
        elif type_name.startswith("float"):
            value = float(value)
            if not math.isfinite(value):
                raise ValueError
        elif type_name.startswith("bool"):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                value = value.lower() in ("true", "1", "yes")
            else:
                value = bool(value)
        elif type_name.startswith("str"):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = str(value)  # `-k run_name=2024` parses as a number
            elif not isinstance(value, str):
                raise ValueError
        elif type_name.startswith("list"):
            # one name stands for a one-element list (-k tasks=cb); a bare number is a mistake (seeds=5)
            if isinstance(value, str):
                value = [value]
            elif isinstance(value, tuple):
                value = list(value)
            elif not isinstance(value, list):
                raise ValueError
        elif type_name.startswith("dict") and not isinstance(value, dict):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        expected = {"bool": "True or False", "float": "a finite number", "list": "a list"}.get(
            type_name.split(" ")[0], type_name.split(" ")[0])
        raise ConfigError(f"config key '{key}' (from {source}) must be {expected}, got "
                          f"{value!r}{_example_hint(f)}") from None
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        allowed = [c for c in choices if c is not None]
        close = difflib.get_close_matches(str(value), [str(c) for c in allowed], n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else _example_hint(f)
        raise ConfigError(f"config key '{key}' (from {source}) must be one of {allowed}, got {value!r}{hint}")
    rule = VALUE_RULES.get(key)
    if rule is not None and not rule.ok(value):
        raise ConfigError(f"config key '{key}' (from {source}) must be {rule.must_be}, got {value!r}{_example_hint(f)}")
    return value


def _coerce_use_gpu(value: Any, f: dataclasses.Field, source: str) -> bool | str:
    """`use_gpu`: auto, or a boolean written as True/False/1/0/yes/no."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        if text in ("true", "false", "1", "0", "yes", "no"):
            return text in ("true", "1", "yes")
    raise ConfigError(f"config key 'use_gpu' (from {source}) must be auto, True or False, got "
                      f"{value!r}{_example_hint(f)}")


def _example_hint(f: dataclasses.Field) -> str:
    """'; example: -k key=value' from the field's help text (every field's help ends with one)."""
    text = f.metadata.get("help", "")
    return "; example: " + text.split("Example: ", 1)[1] if "Example: " in text else ""


def parse_literal(text: str) -> Any:
    """`-k` values: Python literals (1e-3, True, 20_000, [1,2]); anything unparsable stays a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def parse_kwargs(pairs: Iterable[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"-k expects key=value, got {pair!r}; example: -k learning_rate=1e-3")
        key, text = pair.split("=", 1)
        out[key.strip()] = parse_literal(text)
    return out


def config_search_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("CONFIG_PATH"):
        dirs.append(Path(os.environ["CONFIG_PATH"]))
    dirs += [Path.cwd() / "configs", PACKAGE_CONFIG_DIR]
    return dirs


def find_config_file(name: str) -> Path:
    """A config name is used as given when it exists, else looked up in the config folders."""
    candidate = Path(os.path.expanduser(name))
    if candidate.is_file():
        return candidate
    names = [name] if name.endswith(".json") else [name, name + ".json"]
    for folder in config_search_dirs():
        for n in names:
            if (folder / n).is_file():
                return folder / n
    searched = ", ".join(str(d) for d in config_search_dirs())
    raise ConfigError(f"config file '{name}' not found (looked in the current folder and {searched}); give a "
                      "path or a name from `mttl configs`")


def _read_json(path: Path) -> dict:
    return read_json(path, error=ConfigError, name=f"config file '{path}'",
                     fix="fix the file or give another JSON config file of key: value pairs")


def load_config(config_files: str | None = None, kwargs: Iterable[str] | dict | None = None,
                base: dict | None = None) -> Config:
    """defaults < `base` < files in `a.json+b.json` order < `kwargs` (`-k` pairs or a dict)."""
    cfg = Config()
    if base:
        cfg.update(base, source="defaults of this command")
        cfg._overridden.clear()
    if config_files:
        for name in [n for n in config_files.split("+") if n]:
            path = find_config_file(name)
            cfg.update(_read_json(path), source=str(path))
    if kwargs:
        cfg.update(kwargs if isinstance(kwargs, dict) else parse_kwargs(kwargs), source="-k")
    return cfg

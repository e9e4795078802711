"""The GPU check: every command's device path measured at real model shapes, in one command.

On random weights of published T5 v1.1 / LM-adapt shapes (built from a config: no download), on
the first CUDA device, everything in bf16 as `mttl.device` runs it (frozen backbone in bf16,
adapters and routing logits fp32, autocast):
- `step`: one training step (forward + backward, backbone frozen) of MHR (K=8, S=4, r=16 on q, k,
  v, o, wi_0, wi_1, wo), LoRA (r=16) and PEFT's poly tuner (K=8, S=1, r=16), interleaved, at T5-XL
  shape; MHR ÷ LoRA, PEFT poly ÷ ours (Poly, K=8, S=1), and the MHR step's model FLOPs utilization;
- `pretrain`: `mttl pretrain` through Ray Train + DeepSpeed (1 GPU worker, ZeRO-2, bf16) with the
  same MHR on a T5-XL-shaped backbone: tokens/s from its metrics.jsonl and MFU;
- `finetune`: `mttl finetune` (bf16, on the GPU) of a multiple-choice task, and rank-classification
  evaluation of its rows: steps/s and examples/s;
- `sweep`: `mttl sweep` of 8 trials with `trial_resources={'CPU': 1, 'GPU': 0.25}`: trials running
  at once and the GPU's busy fraction (nvidia-smi, sampled every 0.5 s).

Model FLOPs (`train_flops`, written out below): the frozen backbone costs its forward plus the
input-gradient half of backward (2 × forward: no weight gradients); the adapters cost forward +
input gradients + weight gradients (3 × their forward). MFU = model FLOPs per second ÷ the card's
dense bf16 peak (`PEAK_BF16_TFLOPS`, or --peak-tflops).

    python benchmarks/gpu.py                 # every section, T5-XL shape (a GPU with >= 40 GB)
    python benchmarks/gpu.py --quick         # XL width, 4+4 layers, fewer steps: a few minutes
    python benchmarks/gpu.py --quick --dry   # without a GPU: toy shapes on the CPU, checks the plumbing

A section whose packages are missing (ray, deepspeed, optuna, peft) or that needs a GPU where
there is none is skipped and named, with the reason, in the output. `--dry` numbers are not
measurements. Writes `benchmarks/out/gpu.json` and `benchmarks/out/gpu.md` and prints the table.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import platform
import random
import shutil
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

DS_ACCELERATOR_GIVEN = "DS_ACCELERATOR" in os.environ
import _env  # noqa: E402  (repository on sys.path, Ray/DeepSpeed environment)

import torch  # noqa: E402

if torch.cuda.is_available() and not DS_ACCELERATOR_GIVEN and "--dry" not in sys.argv:
    # _env picks DeepSpeed's CPU accelerator for the CPU benchmarks; here DeepSpeed must find the GPU
    os.environ.pop("DS_ACCELERATOR", None)

from mttl.run_folder import atomic_write_text  # noqa: E402
from mttl.plan import T5_V1_1_SHAPES, T5_VOCAB as VOCAB  # noqa: E402

OUT = _env.OUT
# Published T5 v1.1 / LM-adapt dimensions, as `mttl plan` knows them; `toy` is for --dry.
SHAPES = {f"t5-{size}": T5_V1_1_SHAPES[size] for size in ("xl", "large", "base")}
SHAPES["toy"] = dict(d_model=64, d_ff=128, num_heads=4, d_kv=16, num_layers=2)
# Dense bf16 tensor-core peaks from the vendors' data sheets (TFLOP/s, without sparsity).
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.0,
                    "H100 NVL": 835.0, "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10G": 70.0}
MODULES = ".*SelfAttention|.*EncDecAttention|.*DenseReluDense"
LAYERS = "q|k|v|o|wi_0|wi_1|wo"
TRAINABLE = ".*lora_[ab].*|.*module_logits.*"
MHR = dict(n_skills=8, n_splits=4, lora_rank=16)
TARGETS = {"MFU, MHR pre-training step": ("≥", 0.35), "MHR ÷ LoRA": ("≤", 1.10), "PEFT poly ÷ ours": ("≥", 1.5)}


# ----------------------------------------------------------------------------------- FLOPs
def adapted_linears(shape: dict) -> list[tuple[int, int, int]]:
    """(d_in, d_out, which tokens: 0 encoder, 1 decoder, 2 cross-attention k/v on encoder tokens)
    of every q, k, v, o, wi_0, wi_1, wo of the encoder and decoder."""
    d, ff, inner = shape["d_model"], shape["d_ff"], shape["num_heads"] * shape["d_kv"]
    attn = [(d, inner), (d, inner), (d, inner), (inner, d)]
    ffn = [(d, ff), (d, ff), (ff, d)]
    out = []
    for _ in range(shape["num_layers"]):
        out += [(i, o, 0) for i, o in attn + ffn]
        out += [(i, o, 1) for i, o in attn + ffn]  # decoder self-attention and FFN
        out += [(d, inner, 1), (d, inner, 2), (d, inner, 2), (inner, d, 1)]  # cross-attention q, k, v, o
    return out


def train_flops(shape: dict, batch: int, len_in: int, len_out: int, rank: int, n_skills: int) -> dict:
    """Model FLOPs of one training step (2 FLOPs per multiply-add), frozen backbone + adapters."""
    tokens = {0: batch * len_in, 1: batch * len_out, 2: batch * len_in}
    inner, layers = shape["num_heads"] * shape["d_kv"], shape["num_layers"]
    linears = adapted_linears(shape)
    forward = sum(2 * i * o * tokens[which] for i, o, which in linears)
    # attention scores and weighted values: QK^T and AV, 2 × L_q × L_k × inner MACs per layer
    forward += 2 * 2 * inner * batch * layers * (len_in * len_in + len_out * len_out + len_out * len_in)
    forward += 2 * shape["d_model"] * VOCAB * batch * len_out  # LM head
    backbone = 2 * forward  # forward + input gradients; a frozen weight gets no gradient
    # LoRA / MHR per token: x A (d_in·r) then (·) B (r·d_out); the skill mixing per row is K× the factors
    adapter_forward = sum(2 * rank * (i + o) * tokens[which] for i, o, which in linears)
    adapter_forward += sum(2 * n_skills * rank * (i + o) * batch for i, o, _ in linears)
    adapters = 3 * adapter_forward  # forward + input gradients + weight gradients
    return {"backbone": backbone, "adapters": adapters, "total": backbone + adapters}


# ------------------------------------------------------------------------------------ helpers
def have(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def card() -> dict:
    if not torch.cuda.is_available():
        return {"name": None, "peak_bf16_tflops": None}
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in sorted(PEAK_BF16_TFLOPS.items(), key=lambda kv: -len(kv[0])) if k in name), None)
    memory_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
    return {"name": name, "peak_bf16_tflops": peak, "memory_gb": memory_gb}


def t5_config(shape: dict):
    import transformers

    return transformers.T5Config(vocab_size=VOCAB, d_model=shape["d_model"], d_ff=shape["d_ff"],
                                 num_heads=shape["num_heads"], d_kv=shape["d_kv"], num_layers=shape["num_layers"],
                                 num_decoder_layers=shape["num_layers"], feed_forward_proj="gated-gelu",
                                 tie_word_embeddings=False, dropout_rate=0.0, decoder_start_token_id=0,
                                 pad_token_id=0, eos_token_id=1)


def random_backbone(shape: dict, device: torch.device):
    """A T5 of `shape` with random weights, initialised on `device` (seconds on a GPU, not minutes)."""
    import transformers

    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        return transformers.T5ForConditionalGeneration(t5_config(shape))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_times(steps: dict, warmup: int, repeats: int, device: torch.device) -> dict:
    """Median seconds per step function; every repeat runs each once, in a rotated order."""
    times, names = {n: [] for n in steps}, list(steps)
    for repeat in range(warmup + repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start = time.perf_counter()
            steps[name]()
            synchronize(device)
            if repeat >= warmup:
                times[name].append(time.perf_counter() - start)
    return {n: statistics.median(v) for n, v in times.items()}


# ------------------------------------------------------------------------------------ sections
def section_step(args, device: torch.device, shape: dict) -> dict:
    """MHR, LoRA, Poly and PEFT poly train steps under the device policy, interleaved."""
    missing = have("peft")
    from mttl.adapters import AdapterConfig, modify_model
    from mttl.device import Precision, cast_frozen_backbone, place_model
    from mttl.models.routed import RoutedModel

    precision = Precision(device, "bf16" if device.type == "cuda" or args.dry else "32")
    variants = {"MHR": ("poly", 8, MHR["n_splits"]), "LoRA": ("lora", 1, 1), "Poly": ("poly", 8, 1)}
    if not missing:
        variants["PEFT poly"] = ("peft", 8, 1)
    n_tasks, batch, len_in, len_out = 64, args.batch, args.len_in, args.len_out
    models = {}
    for name, (modifier, skills, splits) in variants.items():
        backbone = random_backbone(shape, torch.device("cpu") if args.dry else device)
        if modifier == "peft":
            import peft

            model = peft.get_peft_model(backbone, peft.PolyConfig(
                task_type="SEQ_2_SEQ_LM", r=MHR["lora_rank"], n_tasks=n_tasks, n_skills=skills, n_splits=splits,
                target_modules=rf"({MODULES})\.({LAYERS})"))
        else:
            model = RoutedModel(modify_model(backbone, AdapterConfig(
                modifier=modifier, rank=MHR["lora_rank"], n_skills=skills, n_splits=splits, n_tasks=n_tasks,
                modify_modules=MODULES, modify_layers=LAYERS, trainable_param_names=TRAINABLE)))
        frozen_dtype = torch.bfloat16 if precision.precision == "bf16" else torch.float32
        if modifier == "peft":
            with torch.no_grad():  # PEFT's poly tensors train, the backbone is frozen: the policy's cast
                for p in model.parameters():
                    if not p.requires_grad:
                        p.data = p.data.to(frozen_dtype)
        else:
            cast_frozen_backbone(model, frozen_dtype)
        models[name] = place_model(model, device).train()
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randint(2, VOCAB, (batch, len_in), generator=gen).to(device)
    labels = torch.randint(2, VOCAB, (batch, len_out), generator=gen).to(device)
    task_ids = torch.randint(0, n_tasks, (batch,), generator=gen).to(device)  # mixed tasks: the pre-training shape

    def step(model):
        def run():
            model.zero_grad(set_to_none=True)
            with precision.autocast():
                loss = model(task_ids=task_ids, input_ids=inputs, attention_mask=torch.ones_like(inputs),
                             labels=labels).loss
            loss.backward()
        return run

    times = median_times({n: step(m) for n, m in models.items()}, args.warmup, args.repeats, device)
    flops = train_flops(shape, batch, len_in, len_out, MHR["lora_rank"], MHR["n_skills"])
    # an independent count of the same step: torch's FLOP counter over the ops autograd really ran
    # (on CPU it came to 0.95-0.96 of the formula: no input gradient below the frozen embeddings)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(models["MHR"])()
    out = {"step_s": times, "batch": batch, "len_in": len_in, "len_out": len_out, "flops_per_step": flops,
           "flops_counted_by_torch": counter.get_total_flops(),
           "formula_over_counted": flops["total"] / max(counter.get_total_flops(), 1),
           "ratios": {"MHR ÷ LoRA": times["MHR"] / times["LoRA"]}}
    if "PEFT poly" in times:
        out["ratios"]["PEFT poly ÷ ours"] = times["PEFT poly"] / times["Poly"]
    else:
        out["skipped"] = [f"PEFT poly: {', '.join(missing)} not installed"]
    out["model_tflops_per_s"] = flops["total"] / times["MHR"] / 1e12
    return out


def write_data(folder: Path, len_in: int, len_out: int, rows_per_task: int, n_train_tasks: int = 4) -> Path:
    """Prepared shards of random letters: `n_train_tasks` training tasks whose rows fill len_in / len_out
    byte tokens exactly, and one held-out multiple-choice task (3 choices) for fine-tuning and scoring."""
    from mttl.data import shards

    rng = random.Random(0)
    text = lambda n: "".join(rng.choice(string.ascii_lowercase) for _ in range(n))  # noqa: E731
    rows = []
    for t in range(n_train_tasks):
        for split, n in (("train", rows_per_task), ("validation", 8)):
            rows += [{"task_name": f"t{t}", "task_id": t, "split": split, "source": text(len_in + 16),
                      "target": text(len_out + 16), "references": [], "instance_id": f"t{t}/{split}/{i}"}
                     for i in range(n)]
    choices = ["yes", "no", "maybe"]
    for split, n in (("train", 64), ("validation", 32), ("test", args_rows_test(rows_per_task))):
        for i in range(n):
            label = rng.randrange(3)
            rows.append({"task_name": "mc", "task_id": n_train_tasks, "split": split, "source": text(len_in // 2),
                         "target": choices[label], "references": [choices[label]], "answer_choices": choices,
                         "label": label, "instance_id": f"mc/{split}/{i}"})
    tasks = {f"t{t}": {"role": "train", "metric": "rouge"} for t in range(n_train_tasks)}
    tasks["mc"] = {"role": "test", "metric": "accuracy"}
    shards.write_prepared(folder, rows, tasks, source="benchmarks/gpu.py", args={})
    return folder


def args_rows_test(rows_per_task: int) -> int:
    return max(64, min(rows_per_task, 512))


def parse_keys(text: str) -> dict:
    """'zero_stage=3,gradient_checkpointing=True' -> {'zero_stage': 3, 'gradient_checkpointing': True}"""
    keys = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        try:
            keys[name.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            keys[name.strip()] = value.strip()
    return keys


def section_pretrain(args, device: torch.device, shape: dict, work: Path, data: Path, keys: dict | None = None,
                     run_name: str = "pretrain") -> dict:
    """`mttl pretrain` (Ray Train + DeepSpeed, 1 worker, ZeRO-2, bf16) on the saved random backbone; `keys`
    override the run's configuration (another ZeRO stage, gradient checkpointing)."""
    from mttl.config import load_config
    from mttl.train.loop import pretrain

    backbone = save_backbone(work / "backbone-pretrain", shape, device, args.dry)
    cfg = load_config(None, {
        "model": str(backbone), "tokenizer": "byte", "model_modifier": "poly", **MHR,
        "modify_modules": MODULES, "modify_layers": LAYERS, "trainable_param_names": TRAINABLE,
        "data_dir": str(data), "output_dir": str(work / "runs"), "run_name": run_name,
        "cache_dir": str(work / "cache"),
        "max_input_length": args.len_in, "max_output_length": args.len_out, "train_batch_size": args.batch,
        "total_steps": args.pretrain_steps, "log_every": max(args.pretrain_steps // 4, 1), "warmup_steps": 0,
        "precision": "bf16", "zero_stage": 2, "num_workers": 1, "use_gpu": not args.dry, "tensorboard": False,
        "optimizer": "adamw", **(keys or {})})
    start = time.perf_counter()
    run_dir = pretrain(cfg)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    windows = [r for r in rows if "tokens_per_s" in r][1:] or [r for r in rows if "tokens_per_s" in r]
    step_s = statistics.median(r["step_time_s"] for r in windows)
    flops = train_flops(shape, args.batch, args.len_in, args.len_out, MHR["lora_rank"], MHR["n_skills"])
    out = {"steps": args.pretrain_steps, "wall_s": wall, "step_s": step_s,
           "tokens_per_s": statistics.median(r["tokens_per_s"] for r in windows),
           "model_tflops_per_s": flops["total"] / step_s / 1e12, "flops_per_step": flops}
    # `mttl plan` of the same config against what the worker's GPU held: after deepspeed.initialize
    # (model states) and at its peak (model states + activations + temporaries)
    from mttl.plan import GB, plan

    planned = plan(cfg)["per_worker_bytes"]
    # weights and master copies are allocated by deepspeed.initialize; gradients and Adam's moments by the
    # first step (the H200 run of 2026-12-04 compared the plan with the former: 7.27 GB against 11.23)
    states = [r["gpu_states_after_first_step_gb"] for r in rows if "gpu_states_after_first_step_gb" in r]
    after_init = [r["gpu_model_states_gb"] for r in rows if "gpu_model_states_gb" in r]
    peaks = [r["peak_gpu_gb"] for r in rows if "peak_gpu_gb" in r]
    out.update(plan_model_states_gb=planned["model_states"] / GB, plan_total_gb=planned["total"] / GB,
               measured_model_states_gb=states[0] if states else None, measured_peak_gb=max(peaks, default=None),
               measured_after_initialize_gb=after_init[0] if after_init else None)
    if states:
        out["plan_over_measured_model_states"] = out["plan_model_states_gb"] / states[0]
    if peaks:
        out["plan_over_measured_peak"] = out["plan_total_gb"] / max(peaks)
    return out


def save_backbone(folder: Path, shape: dict, device: torch.device, dry: bool) -> Path:
    """A random backbone of `shape` saved as a model folder (what `model=` loads), once."""
    if not (folder / "config.json").is_file():
        model = random_backbone(shape, torch.device("cpu") if dry else device)
        if not dry:  # bf16 on disk: what the bf16 policy loads anyway, at half the write (5.6 GB for XL)
            model = model.to(torch.bfloat16)
        model.save_pretrained(folder)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return folder


def make_run_folder(work: Path, shape: dict, data: Path, device: torch.device, dry: bool) -> Path:
    """A finished pre-training run folder (random MHR adapters on the random backbone `model` names),
    as pretrain writes it for a backbone it did not train."""
    from mttl.adapters import save_adapters
    from mttl.config import load_config
    from mttl.models.run import build_routed_model
    from mttl.models.tokenizer import load_tokenizer

    run = work / "mhr_run"
    if (run / "final" / "adapters.json").is_file():
        return run
    backbone = save_backbone(work / "backbone-finetune", shape, device, dry)
    cfg = load_config(None, {"model": str(backbone), "tokenizer": "byte", "model_modifier": "poly", **MHR, "n_tasks": 4,
                             "modify_modules": MODULES, "modify_layers": LAYERS, "trainable_param_names": TRAINABLE,
                             "data_dir": str(data), "lora_randb_init": True})
    model = build_routed_model(cfg, load_tokenizer("byte"))
    (run / "final").mkdir(parents=True, exist_ok=True)
    cfg.save(run)
    (run / "tasks.json").write_text(json.dumps({f"t{i}": i for i in range(4)}))
    save_adapters(model, run / "final")
    return run


def section_finetune(args, device: torch.device, run: Path, work: Path, data: Path) -> dict:
    """`mttl finetune` in bf16 on the device, then rank classification of the test rows alone."""
    from mttl import device as policy
    from mttl.cli import main
    from mttl.config import load_config
    from mttl.data.fewshot import eval_rows
    from mttl.evaluation.predict import rank_classification
    from mttl.models.run import load_run

    steps, use_gpu = args.finetune_steps, str(not args.dry)
    common = [f"checkpoint={run}", "finetune_task_name=mc", "precision=bf16", f"use_gpu={use_gpu}",
              "max_input_length=256", "max_output_length=8", f"predict_batch_size={args.predict_batch}"]
    start = time.perf_counter()
    code = main(["finetune", "-k", *common, f"output_dir={work / 'ft'}", "run_name=ft", "seeds=[42]",
                 f"total_steps={steps}", "train_batch_size=8", "num_shots=64", "finetune_skip_es=True", "do_zs=False",
                 "tensorboard=False", f"log_every={steps}"])
    finetune_s = time.perf_counter() - start
    if code:
        raise RuntimeError(f"mttl finetune exited with {code}")
    cfg = load_config(None, {"precision": "bf16", "use_gpu": not args.dry})
    loaded = load_run(run, backbone_dtype=policy.backbone_dtype(cfg))
    policy.place_model(loaded.model, policy.resolve_device(cfg))
    rows = eval_rows(data, "mc", "test")
    kwargs = dict(length_norm=0.0, max_input_length=256, max_output_length=8, batch_size=args.predict_batch,
                  precision="bf16")
    rank_classification(loaded.model, loaded.tokenizer, rows[:args.predict_batch], 0, **kwargs)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    rank_classification(loaded.model, loaded.tokenizer, rows, 0, **kwargs)
    synchronize(device)
    eval_s = time.perf_counter() - start
    # the finetune run scored its validation and test rows once each (finetune_skip_es): about 2 passes
    val_rows = len(eval_rows(data, "mc", "validation"))
    train_s = max(finetune_s - eval_s * (len(rows) + val_rows) / len(rows), 1e-9)
    return {"finetune_steps": steps, "finetune_wall_s": finetune_s, "train_steps_per_s_estimate": steps / train_s,
            "eval_rows": len(rows), "eval_examples_per_s": len(rows) / eval_s}


class GpuSampler:
    """GPU utilization (nvidia-smi, %) every `period` seconds on a thread, while active."""

    def __init__(self, period: float = 0.5):
        self.period, self.samples, self._stop = period, [], threading.Event()
        self.available = shutil.which("nvidia-smi") is not None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                  "-i", "0"], capture_output=True, text=True, check=False)
            if out.returncode == 0 and out.stdout.strip():
                self.samples.append(float(out.stdout.split()[0]))
            self._stop.wait(self.period)

    def __enter__(self):
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()


def trial_spans(sweep_dir: Path) -> list[tuple[float, float]]:
    """(start, end) wall-clock seconds of every trial, from the last row of its Tune result.json."""
    spans = []
    for path in Path(sweep_dir).rglob("result.json"):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if lines and "timestamp" in lines[-1]:
            end = float(lines[-1]["timestamp"])
            spans.append((end - float(lines[-1].get("time_total_s", 0.0)), end))
    return spans


def section_sweep(args, device: torch.device, run: Path, work: Path) -> dict:
    """`mttl sweep`, 8 trials at a quarter GPU each (a tenth of a CPU each in --dry)."""
    from mttl.config import load_config
    from mttl.sweep import run_sweep

    resources = {"CPU": 0.1} if args.dry else {"CPU": 1, "GPU": 0.25}
    cfg = load_config(None, {"checkpoint": str(run), "finetune_task_name": "mc", "tasks": ["mc"], "precision": "bf16",
                             "use_gpu": not args.dry, "trial_resources": resources, "num_samples": 8,
                             "max_concurrent_trials": 8, "seeds": [42], "total_steps": args.sweep_steps,
                             "train_batch_size": 8, "num_shots": 16, "eval_every_epochs": 1,
                             "max_input_length": 256, "max_output_length": 8, "predict_batch_size": args.predict_batch,
                             "output_dir": str(work / "sweeps"), "run_name": "sweep", "tensorboard": False,
                             "finetune_type": "Z", "asha_grace_period": 100})
    start = time.perf_counter()
    with GpuSampler() as sampler:
        sweep_dir, rows = run_sweep(cfg)
    wall = time.perf_counter() - start
    spans = trial_spans(sweep_dir)
    most = max((sum(a <= t < b for a, b in spans) for t, _ in spans), default=None)
    busy = statistics.fmean(s > 0 for s in sampler.samples) if sampler.samples else None
    return {"trials": len(rows), "wall_s": wall, "most_trials_at_once": most, "trial_resources": resources,
            "gpu_busy_fraction": busy,
            "gpu_util_mean_pct": statistics.fmean(sampler.samples) if sampler.samples else None,
            **({} if sampler.available else {"note": "nvidia-smi not found: no GPU busy fraction"})}


# ------------------------------------------------------------------------------------- report
def markdown(result: dict) -> str:
    c = result["card"]
    title = "dry run on CPU, not a measurement" if result["dry"] else (c["name"] or "no CUDA GPU: nothing measured")
    lines = [f"# GPU check ({title})", "",
             f"shape {result['shape']} ({json.dumps(SHAPES[result['shape']] if result['shape'] in SHAPES else {})}), "
             f"{result['layers']} layers per stack (step, pretrain); finetune and sweep: {result['finetune_shape']}; "
             f"torch {torch.__version__}", ""]
    lines += ["| measure | value | target |", "|---|---|---|"]
    for name, (value, fmt) in result["table"].items():
        op, goal = TARGETS.get(name, ("", None))
        shown = "n/a" if value is None else format(value, fmt)
        lines.append(f"| {name} | {shown} | {f'{op} {goal}' if goal is not None else ''} |")
    if result["skipped"]:
        lines += ["", "Skipped:"] + [f"- {s}" for s in result["skipped"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="XL width with 4+4 layers, fewer steps and repeats")
    parser.add_argument("--dry", action="store_true",
                        help="toy shapes on the CPU: checks the plumbing, measures nothing")
    parser.add_argument("--only", default="step,pretrain,finetune,sweep", help="comma-separated sections to run")
    parser.add_argument("--pretrain-variants", nargs="*", default=[],
                        help="further pretrain runs, each a comma-separated set of keys. "
                             "Example: --pretrain-variants zero_stage=3,gradient_checkpointing=True")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the card's dense bf16 peak, if not in the table")
    args = parser.parse_args()
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    has_cuda = torch.cuda.is_available()
    shape_name = "toy" if args.dry else "t5-xl"
    shape = dict(SHAPES[shape_name])
    if args.quick and not args.dry:
        shape["num_layers"] = 4
    # fine-tuning and the sweep: 8 trials at once each hold a backbone (T5-large: 3 GB in fp32 on the host
    # while loading, 1.5 GB in bf16 on the GPU), so eight XL copies do not crowd out the measurement
    ft_shape_name = "toy" if args.dry else ("t5-base" if args.quick else "t5-large")
    ft_shape = SHAPES[ft_shape_name]
    args.batch, args.len_in, args.len_out = (4, 64, 16) if args.dry else (8, 512, 64)
    args.warmup, args.repeats = (1, 2) if args.dry else ((2, 5) if args.quick else (3, 10))
    args.pretrain_steps = 4 if args.dry else (20 if args.quick else 60)
    args.finetune_steps = 4 if args.dry else (50 if args.quick else 200)
    args.sweep_steps = 2 if args.dry else (20 if args.quick else 100)
    args.predict_batch = 8 if args.dry else 32
    device = torch.device("cuda" if has_cuda and not args.dry else "cpu")
    info = card()
    peak = args.peak_tflops or info["peak_bf16_tflops"]
    result = {"dry": args.dry, "quick": args.quick, "shape": shape_name, "layers": shape["num_layers"],
              "finetune_shape": ft_shape_name, "card": info,
              "platform": f"{platform.machine()}, {os.cpu_count()} CPUs", "sections": {}, "skipped": [], "table": {}}
    needs = {"step": [], "pretrain": ["ray", "deepspeed"], "finetune": [], "sweep": ["ray", "optuna"]}
    work = Path(tempfile.mkdtemp(prefix="mttl-gpu-"))
    try:
        data = None
        for name in sections:
            if name not in needs:
                result["skipped"].append(f"{name}: unknown section (choose from {', '.join(needs)})")
                continue
            if not has_cuda and not args.dry:
                result["skipped"].append(f"{name}: no CUDA GPU (torch.cuda.is_available() is False); --dry runs it "
                                         "on the CPU at toy shapes")
                continue
            missing = have(*needs[name])
            if missing:
                result["skipped"].append(f"{name}: {', '.join(missing)} not installed "
                                         "(../shared/device-kit/README.md brings them to a GPU machine)")
                continue
            print(f"[gpu] {name} …", flush=True)
            if data is None and name != "step":
                data = write_data(work / "data", args.len_in, args.len_out, rows_per_task=64 if args.dry else 512)
            started = time.perf_counter()
            try:
                if name == "step":
                    out = section_step(args, device, shape)
                elif name == "pretrain":
                    out = section_pretrain(args, device, shape, work, data)
                    for i, variant in enumerate(args.pretrain_variants, 1):
                        begun = time.perf_counter()
                        try:
                            extra = section_pretrain(args, device, shape, work, data, parse_keys(variant),
                                                     run_name=f"pretrain-{i}")
                            extra["section_s"] = time.perf_counter() - begun
                            result["sections"][f"pretrain {variant}"] = extra
                        except Exception as exc:
                            traceback.print_exc()
                            result["skipped"].append(f"pretrain {variant}: failed: {type(exc).__name__}: "
                                                     f"{str(exc).splitlines()[0] if str(exc) else ''}")
                        finally:
                            if device.type == "cuda":
                                torch.cuda.empty_cache()
                elif name == "finetune":
                    run = make_run_folder(work, ft_shape, data, device, args.dry)
                    out = section_finetune(args, device, run, work, data)
                else:
                    out = section_sweep(args, device, make_run_folder(work, ft_shape, data, device, args.dry), work)
            except Exception as exc:  # one failed section must not cost the others' measurements
                traceback.print_exc()
                result["skipped"].append(f"{name}: failed after {time.perf_counter() - started:.0f} s: "
                                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                continue
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            out["section_s"] = time.perf_counter() - started
            result["sections"][name] = out
            result["skipped"] += [f"{name}: {s}" for s in out.pop("skipped", [])]
    finally:
        # the runs' own logs (Ray's, DeepSpeed's) outlive the scratch folder: a failed section's cause
        for log in work.glob("**/logs/*.log"):
            kept = OUT / "gpu-logs" / "-".join(log.relative_to(work).parts)
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(log, kept)
        shutil.rmtree(work, ignore_errors=True)
    s = result["sections"]
    table = result["table"]
    if "step" in s:
        table["MHR train step (s)"] = (s["step"]["step_s"]["MHR"], ".4f")
        table["LoRA train step (s)"] = (s["step"]["step_s"]["LoRA"], ".4f")
        for name, value in s["step"]["ratios"].items():
            table[name] = (value, ".2f")
        table["MFU, MHR plain-torch step"] = (s["step"]["model_tflops_per_s"] / peak if peak else None, ".1%")
    for section in sorted((name for name in s if name.split(" ")[0] == "pretrain"), key=lambda name: name != "pretrain"):
        variant = f" [{section.split(' ', 1)[1]}]" if " " in section else ""
        table[f"pre-training tokens/s (Ray Train + DeepSpeed){variant}"] = (s[section]["tokens_per_s"], ",.0f")
        table[f"MFU, MHR pre-training step{variant}"] = (s[section]["model_tflops_per_s"] / peak if peak else None,
                                                         ".1%")
        for key, label in (("measured_after_initialize_gb", "pre-training GPU memory after initialize (GB)"),
                           ("measured_model_states_gb", "pre-training GPU memory after the first step (GB)"),
                           ("plan_over_measured_model_states", "mttl plan ÷ measured, model states"),
                           ("measured_peak_gb", "pre-training GPU peak, max_memory_allocated (GB)"),
                           ("plan_over_measured_peak", "mttl plan ÷ measured, total at peak")):
            table[label + variant] = (s[section].get(key), ".2f")
    if "finetune" in s:
        table["finetune steps/s (estimate)"] = (s["finetune"]["train_steps_per_s_estimate"], ".2f")
        table["rank classification examples/s"] = (s["finetune"]["eval_examples_per_s"], ".1f")
    if "sweep" in s:
        table["sweep: most trials at once"] = (s["sweep"]["most_trials_at_once"], "")
        table["sweep: GPU busy fraction"] = (s["sweep"]["gpu_busy_fraction"], ".0%")
    if (s.get("step") or s.get("pretrain")) and not peak:
        result["skipped"].append("MFU: the card's bf16 peak is unknown; pass --peak-tflops")
    OUT.mkdir(parents=True, exist_ok=True)
    text = markdown(result)
    result["table"] = {k: v[0] for k, v in table.items()}
    atomic_write_text(OUT / "gpu.json", json.dumps(result, indent=2, default=str) + "\n")
    atomic_write_text(OUT / "gpu.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

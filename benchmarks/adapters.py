"""Adapter step time: LoRA, Poly and MHR (`mttl.adapters`) against PEFT's poly tuner, and choice scoring.

Measures in one run, on one machine, interleaved (each repeat times every variant once, in a
rotated order; warm-up steps left out; medians reported):
- forward + backward step time (adapters and routing trainable, backbone frozen, training mode) of
  LoRA (K=1), Poly (K=8, S=1), MHR (K=8, S=16), MHR with deterministic sigmoid routing
  (`module_logits_relaxed_bernoulli=False`), and PEFT's `poly` tuner with the same r, K, S and
  target modules, on identical shapes;
- two backbones built from a config (no hub): the tiny T5 of `mttl.models.backbone.tiny_t5_config`
  (d_model 128, 2+2 layers, byte vocabulary) and a T5-base-sized stack (d_model 768, d_ff 2048,
  12 heads, T5 vocabulary; 12+12 layers, fewer with `--base-layers` / `--quick`);
- single-task batches (every row one task id: the fine-tuning shape) and mixed-task batches
  (distinct task ids: the pre-training shape);
- scoring C answer choices with MHR in evaluation mode: `mttl.evaluation.metrics.choice_token_logprobs`
  (encoder once, all choices in one decoder batch) against re-running encoder + decoder per choice.

Training-mode Poly / MHR routing samples a relaxed Bernoulli per row (as PEFT and the reference
do), so even a single-task batch mixes its skills per row; only deterministic routing (the sigmoid
variant, average routing) lets a single-task batch mix once.

    python benchmarks/adapters.py --quick --clock cpu          # CPU, 1 thread: a few minutes on 2 cores
    python benchmarks/adapters.py                              # CPU, T5-base-sized stack with 12+12 layers
    python benchmarks/adapters.py --device cuda --dtype bf16   # GPU

`--clock cpu` times this process's CPU time instead of wall time: on a machine shared with other
jobs it keeps their load out of the ratios (one thread, so CPU time is the work done).

Writes `benchmarks/out/adapters.json` and `benchmarks/out/adapters.md` (atomically) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from mttl.adapters import AdapterConfig, modify_model  # noqa: E402
from mttl.run_folder import atomic_write_text  # noqa: E402
from mttl.models.backbone import tiny_t5_config  # noqa: E402
from mttl.models.routed import RoutedModel  # noqa: E402

OUT = REPO / "benchmarks" / "out"
MODULES = ".*SelfAttention|.*EncDecAttention|.*DenseReluDense"
LAYERS = "q|k|v|o|wi_0|wi_1|wo"
TRAINABLE = ".*lora_[ab].*|.*module_logits.*"
BYTE_VOCAB, T5_VOCAB = 384, 32128
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# name -> (implementation, modifier, K, S, sampled routing)
VARIANTS = {
    "LoRA": ("ours", "lora", 1, 1, True),
    "Poly": ("ours", "poly", 8, 1, True),
    "MHR": ("ours", "poly", 8, 16, True),
    "MHR sigmoid": ("ours", "poly", 8, 16, False),
    "PEFT Poly": ("peft", "poly", 8, 1, True),
    "PEFT MHR": ("peft", "poly", 8, 16, True),
}
TARGETS = {"MHR ÷ LoRA": ("≤", 1.05), "PEFT ÷ ours, single-task": ("≥", 1.5),
           "PEFT ÷ ours, mixed-task": ("≥", 1.1), "per-choice recompute ÷ ours": ("≥", 2.0)}


def backbone_config(name: str, base_layers: int) -> transformers.T5Config:
    if name == "tiny":
        return tiny_t5_config(BYTE_VOCAB)
    # T5 v1.1-base widths (gated-GELU FFN, untied head); depth as asked.
    return transformers.T5Config(vocab_size=T5_VOCAB, d_model=768, d_ff=2048, d_kv=64, num_heads=12,
                                 num_layers=base_layers, num_decoder_layers=base_layers,
                                 feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def fresh_backbone(config: transformers.T5Config) -> transformers.PreTrainedModel:
    """The same initial weights on every call, so every variant wraps an identical backbone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformers.T5ForConditionalGeneration(config)


def build_variant(name: str, config, n_tasks: int, rank: int, device: str, dtype: torch.dtype):
    implementation, modifier, n_skills, n_splits, sampled = VARIANTS[name]
    backbone = fresh_backbone(config)
    if implementation == "peft":
        model = peft.get_peft_model(backbone, peft.PolyConfig(
            task_type="SEQ_2_SEQ_LM", r=rank, n_tasks=n_tasks, n_skills=n_skills, n_splits=n_splits,
            target_modules=rf"({MODULES})\.({LAYERS})"))
    else:
        acfg = AdapterConfig(modifier=modifier, rank=rank, n_skills=n_skills, n_splits=n_splits, n_tasks=n_tasks,
                             relaxed_bernoulli=sampled, modify_modules=MODULES, modify_layers=LAYERS,
                             trainable_param_names=TRAINABLE)
        model = RoutedModel(modify_model(backbone, acfg))
    # Adapters and base weights cast alike, so both implementations compute in the same dtype.
    return model.to(device=device, dtype=dtype).train()


def call(model, task_ids: torch.Tensor, **batch):
    """Both implementations take task ids as a keyword of the call."""
    return model(task_ids=task_ids, **batch)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def interleaved_medians(steps: dict, args) -> dict:
    """Median seconds of each step function; every repeat runs all of them, in a rotated order."""
    clock = CLOCKS[args.clock]
    times = {name: [] for name in steps}
    names = list(steps)
    for repeat in range(args.warmup + args.repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(args.device)
            start = clock()
            steps[name]()
            synchronize(args.device)
            if repeat >= args.warmup:
                times[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def train_step(model, batch: dict, task_ids: torch.Tensor):
    def step():
        model.zero_grad(set_to_none=True)
        call(model, task_ids, **batch).loss.backward()
    return step


def make_batch(vocab: int, batch_size: int, source_len: int, target_len: int, device: str) -> dict:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(2, vocab, (batch_size, source_len), generator=generator)
    labels = torch.randint(2, vocab, (batch_size, target_len), generator=generator)
    return {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device),
            "labels": labels.to(device)}


def per_choice_logprobs(model, task_ids, input_ids, attention_mask, choice_labels) -> torch.Tensor:
    """The baseline: encoder and decoder run again for every choice."""
    from mttl.evaluation.predict import IGNORE_INDEX

    columns = []
    for c in range(choice_labels.shape[1]):
        labels = choice_labels[:, c].contiguous()
        logits = model(task_ids=task_ids, input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        mask = labels != IGNORE_INDEX
        columns.append(logprobs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask)
    return torch.stack(columns, dim=1)


def bench_backbone(name: str, args, device: str, dtype: torch.dtype) -> dict:
    config = backbone_config(name, args.base_layers)
    n_tasks = args.batch
    models = {variant: build_variant(variant, config, n_tasks, args.rank, device, dtype) for variant in VARIANTS}
    batch = make_batch(config.vocab_size, args.batch, args.source_len, args.target_len, device)
    shapes = {"single-task": torch.full((args.batch,), 1, dtype=torch.long),
              "mixed-task": torch.arange(args.batch, dtype=torch.long) % n_tasks}
    step_ms = {}
    for shape, task_ids in shapes.items():
        steps = {variant: train_step(model, batch, task_ids.to(device)) for variant, model in models.items()}
        step_ms[shape] = {v: 1000 * s for v, s in interleaved_medians(steps, args).items()}
        print(f"[{name}] {shape}: " + ", ".join(f"{v} {ms:.1f} ms" for v, ms in step_ms[shape].items()), flush=True)
    mhr = models["MHR"].eval()
    del models
    layers = config.num_layers
    description = (f"tiny T5 (d_model 128, d_ff 512, 4 heads, {layers}+{layers} layers, vocab {BYTE_VOCAB})"
                   if name == "tiny" else
                   f"T5-base-sized (d_model 768, d_ff 2048, 12 heads, {layers}+{layers} layers, vocab {T5_VOCAB})")
    result = {"backbone": description, "step_ms": step_ms}
    if args.choices:
        result["choice_scoring_ms"] = bench_choice_scoring(mhr, config, batch, args, dtype)
    return result


def bench_choice_scoring(mhr, config, batch: dict, args, dtype: torch.dtype) -> dict:
    """Evaluation mode, no gradients, one single-task batch: encoder once vs per-choice recompute."""
    from mttl.evaluation.predict import choice_token_logprobs

    device = args.device
    generator = torch.Generator().manual_seed(2)
    choice_labels = torch.randint(2, config.vocab_size, (args.batch, args.choices, args.choice_len),
                                  generator=generator).to(device)
    task_ids = torch.full((args.batch,), 1, dtype=torch.long, device=device)
    inputs = (task_ids, batch["input_ids"], batch["attention_mask"], choice_labels)
    with torch.no_grad():
        ours, recompute = choice_token_logprobs(mhr, *inputs), per_choice_logprobs(mhr, *inputs)
        tolerance = 1e-3 if dtype == torch.float32 else 0.25
        if not torch.allclose(ours, recompute, atol=tolerance):
            raise RuntimeError(f"choice scores disagree: max |diff| {(ours - recompute).abs().max().item():.2e}")
        scoring = interleaved_medians({"ours: encoder once": lambda: choice_token_logprobs(mhr, *inputs),
                                       "per-choice recompute": lambda: per_choice_logprobs(mhr, *inputs)},
                                      args)
    return {k: 1000 * v for k, v in scoring.items()}


def ratios(result: dict) -> dict:
    single, mixed = result["step_ms"]["single-task"], result["step_ms"]["mixed-task"]
    out = {
        "MHR ÷ LoRA, single-task": single["MHR"] / single["LoRA"],
        "MHR ÷ LoRA, mixed-task": mixed["MHR"] / mixed["LoRA"],
        "MHR sigmoid ÷ LoRA, single-task": single["MHR sigmoid"] / single["LoRA"],
        "PEFT ÷ ours, single-task, Poly": single["PEFT Poly"] / single["Poly"],
        "PEFT ÷ ours, single-task, MHR": single["PEFT MHR"] / single["MHR"],
        "PEFT ÷ ours, mixed-task, Poly": mixed["PEFT Poly"] / mixed["Poly"],
        "PEFT ÷ ours, mixed-task, MHR": mixed["PEFT MHR"] / mixed["MHR"],
        # PEFT samples its routing in training, so this compares different routing, not like for like.
        "PEFT MHR ÷ MHR sigmoid, single-task": single["PEFT MHR"] / single["MHR sigmoid"],
    }
    scoring = result.get("choice_scoring_ms")
    if scoring:
        out["per-choice recompute ÷ ours"] = scoring["per-choice recompute"] / scoring["ours: encoder once"]
    return out


def verdict(ratio_name: str, value: float) -> str:
    for prefix, (sense, bound) in TARGETS.items():
        if ratio_name.startswith(prefix):
            met = value <= bound if sense == "≤" else value >= bound
            return f"{sense} {bound} {'met' if met else 'missed'}"
    return "–"


def machine(device: str, threads: int) -> str:
    cpu = f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {threads}"
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} ({cpu})"
    return f"CPU only ({cpu})"


def markdown(report: dict) -> str:
    a = report["args"]
    lines = [f"# Adapter step time ({report['machine']}, {report['dtype']})", "",
             f"Forward + backward, training mode, batch {a['batch']}, source {a['source_len']} tokens, target "
             f"{a['target_len']} tokens, r={a['rank']}; median of {a['repeats']} interleaved repeats after "
             f"{a['warmup']} warm-up; {a['clock']} clock. Load average before/after: {report['load_before']} / "
             f"{report['load_after']}.",
             f"Command: `{report['command']}`", ""]
    variants = list(VARIANTS)
    lines += ["| backbone | batch | " + " | ".join(f"{v} ms" for v in variants) + " |",
              "|---|---|" + "---|" * len(variants)]
    for result in report["results"].values():
        for shape, row in result["step_ms"].items():
            lines.append(f"| {result['backbone']} | {shape} | " + " | ".join(f"{row[v]:.1f}" for v in variants) + " |")
    if a["choices"]:
        lines += ["", f"Choice scoring (MHR, evaluation mode, {a['choices']} choices of {a['choice_len']} tokens, "
                      "single-task batch):", "",
                  "| backbone | ours: encoder once ms | per-choice recompute ms |", "|---|---|---|"]
        for result in report["results"].values():
            s = result["choice_scoring_ms"]
            lines.append(f"| {result['backbone']} | {s['ours: encoder once']:.1f} | {s['per-choice recompute']:.1f} |")
    names = list(report["results"])
    lines += ["", "| ratio | " + " | ".join(names) + " | target |", "|---|" + "---|" * (len(names) + 1)]
    for ratio_name in next(iter(report["ratios"].values())):
        values = [report["ratios"][n][ratio_name] for n in names]
        verdicts = {verdict(ratio_name, v) for v in values}
        target = verdicts.pop() if len(verdicts) == 1 else " / ".join(verdict(ratio_name, v) for v in values)
        lines.append(f"| {ratio_name} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {target} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="short run: T5-base-sized stack with 2+2 layers, batch 8, source 64, target 16, "
                             "5 repeats")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="model and adapter dtype")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--backbones", default="tiny,base", help="comma-separated subset of tiny,base")
    parser.add_argument("--base-layers", type=int, default=None, help="encoder (= decoder) layers of the "
                        "T5-base-sized stack (default 12; 2 with --quick)")
    parser.add_argument("--batch", type=int, default=None, help="rows per batch (default 16; 8 with --quick)")
    parser.add_argument("--source-len", type=int, default=None, help="input tokens (default 128; 64 with --quick)")
    parser.add_argument("--target-len", type=int, default=None, help="label tokens (default 32; 16 with --quick)")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank r of every variant (default 4)")
    parser.add_argument("--choices", type=int, default=4, help="answer choices C per input (default 4; 0 skips "
                        "choice scoring)")
    parser.add_argument("--choice-len", type=int, default=4, help="tokens per answer choice (default 4)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 15; 5 with --quick)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repeats first (default 2)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall (default) or cpu: this process's CPU time, steadier than wall time on a "
                             "shared machine; CPU device with --threads 1 only")
    parser.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT.relative_to(REPO)})")
    args = parser.parse_args()
    quick = {"base_layers": (12, 2), "batch": (16, 8), "source_len": (128, 64), "target_len": (32, 16),
             "repeats": (15, 5)}
    for key, (full, short) in quick.items():
        if getattr(args, key) is None:
            setattr(args, key, short if args.quick else full)
    backbones = [b for b in args.backbones.split(",") if b]
    if not set(backbones) <= {"tiny", "base"}:
        parser.error(f"--backbones takes tiny and/or base, got {args.backbones!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    if args.clock == "cpu" and (args.device != "cpu" or args.threads != 1):
        parser.error("--clock cpu measures one CPU thread's work: use it with --device cpu --threads 1")
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    report = {"command": "python benchmarks/adapters.py " + " ".join(sys.argv[1:]),
              "machine": machine(args.device, args.threads), "dtype": args.dtype,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "peft": peft.__version__, "python": platform.python_version()},
              "load_before": round(os.getloadavg()[0], 2),
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "results": {}, "ratios": {}}
    for name in backbones:
        # Written after each backbone, so a run cut short still leaves what it measured.
        report["results"][name] = result = bench_backbone(name, args, args.device, dtype)
        report["ratios"][name] = ratios(result)
        report["load_after"] = round(os.getloadavg()[0], 2)
        atomic_write_text(args.out / "adapters.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        table = markdown(report)
        atomic_write_text(args.out / "adapters.md", table)
    print(table)


if __name__ == "__main__":
    main()

"""Peak resident memory per pre-training worker: ZeRO-0 against ZeRO-3 with the partitioned build,
and gradient checkpointing's activation saving; each against `mttl plan`'s model-state figure.

Runs `mttl.train.loop.pretrain` with 2 CPU workers on the synthetic suite, fp32, MHR (poly,
8 skills, 4 splits, rank 16), a random backbone built from a config: `tiny-t5` widened to the
T5-large shape (d_model 1024, 24 encoder + 24 decoder layers; d_ff 4096 and 4 heads of 256, so
~0.9 B parameters instead of T5-large's 0.78 B). Each run logs `peak_rss_gb`, the largest resident
set of any worker process (`getrusage`), in metrics.jsonl. A process's own overhead (Python, torch,
Ray, DeepSpeed) is measured by the same runs on a 32-wide, 1-layer backbone and subtracted before
the comparison with the plan.

    python benchmarks/memory.py --quick       # the small backbone only (a few minutes on 2 cores)
    python benchmarks/memory.py               # + the T5-large-shaped runs (~8 GB RAM, run alone)
    python benchmarks/memory.py --activations # + checkpointing at batch 8 x 512 tokens (slow on CPU)
    python benchmarks/memory.py --quick --activations --activations-workers 1 --activations-layers 6
                                              # batch 8 x 512 at T5-large width on a 24 GB machine
Writes benchmarks/out/memory.json and .md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from _env import OUT  # first: the repo on sys.path, the Ray/DeepSpeed environment

from mttl.config import Config  # noqa: E402

SMALL = dict(tiny_d_model=32, tiny_num_layers=1)
LARGE = dict(tiny_d_model=1024, tiny_num_layers=24)


def config(work: Path, name: str, shape: dict, **overrides) -> Config:
    values = dict(model="tiny-t5", tokenizer="byte", model_modifier="poly", n_skills=8, n_splits=4, lora_rank=16,
                  trainable_param_names=".*lora_[ab].*|.*module_logits.*", dataset="synthetic",
                  cache_dir=str(work / "cache"), output_dir=str(work / "runs"), run_name=name,
                  num_workers=2, train_batch_size=2, max_input_length=32, max_output_length=32,
                  total_steps=2, log_every=1, save_every=None, eval_every=None, tensorboard=False, seed=0,
                  **shape)
    values.update(overrides)
    return Config().update(values, source="benchmark")


def long_row_data(folder: Path, tokens: int) -> Path:
    """Prepared shards of 4 training tasks whose rows are `tokens` byte tokens in and out."""
    import random
    import string

    from mttl.data import shards

    rng = random.Random(0)
    text = lambda: "".join(rng.choice(string.ascii_lowercase) for _ in range(tokens + 8))  # noqa: E731
    rows = [{"task_name": f"t{t}", "task_id": t, "split": "train", "source": text(), "target": text(),
             "references": [], "instance_id": f"t{t}/{i}"} for t in range(4) for i in range(32)]
    shards.write_prepared(folder, rows, {f"t{t}": {"role": "train", "metric": "rouge"} for t in range(4)},
                          source="benchmarks/memory.py", args={"tokens": tokens})
    return folder


def measure(cfg: Config) -> dict:
    from mttl.plan import plan
    from mttl.train.loop import pretrain

    run_dir = pretrain(cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    peak = max(r.get("peak_rss_final_gb", r.get("peak_rss_gb", 0.0)) for r in rows)  # with writing final/
    # resident memory by stage (the worker's first rows): where the peak comes from
    stages = {k: v for r in rows for k, v in r.items() if k.startswith(("rss_after_", "peak_rss_after_"))}
    steps = [r for r in rows if "loss" in r]
    p = plan(cfg.copy(n_tasks=cfg.n_tasks or 8))
    return {"run": cfg.run_name, "zero_stage": cfg.zero_stage, "gradient_checkpointing": cfg.gradient_checkpointing,
            "micro_batch": cfg.train_batch_size // cfg.num_workers, "input_len": cfg.max_input_length,
            "peak_rss_gb": peak, "peak_rss_steps_gb": max(r.get("peak_rss_gb", 0.0) for r in rows), **stages, "plan_model_states_gb": p["per_worker_bytes"]["model_states"] / 1e9,
            "plan_activations_gb": p["per_worker_bytes"]["activations"] / 1e9,
            "params_m": p["params"]["total"] / 1e6,
            "first_loss": steps[0]["loss"] if steps else None,
            "step_time_s": steps[-1]["step_time_s"] if steps else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small backbone only")
    parser.add_argument("--activations", action="store_true", help="also batch 8 x 512 with/without checkpointing")
    parser.add_argument("--activations-batch", type=int, default=8, help="micro batch of the --activations runs")
    parser.add_argument("--activations-workers", type=int, default=2,
                        help="workers of the --activations runs (1: ZeRO-0 in one process, for small machines)")
    parser.add_argument("--activations-layers", type=int, default=LARGE["tiny_num_layers"],
                        help="encoder (= decoder) layers of the --activations runs: fewer measure batch 8 x 512 "
                             "per layer where the whole depth does not fit without checkpointing")
    parser.add_argument("--stages", default="0,3",
                        help="ZeRO stages of the main runs, e.g. --stages 3 to re-measure ZeRO-3 alone")
    args = parser.parse_args()
    # the runs' checkpoints and final folders of a 1 B-parameter model: ~7 GB each, removed at the end
    work = Path(tempfile.mkdtemp(prefix="mttl-memory-"))
    try:
        results = measure_all(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(results)


def measure_all(args, work: Path) -> list[dict]:
    results = []
    shapes = {"small": SMALL} if args.quick else {"small": SMALL, "t5-large-shaped": LARGE}
    for shape_name, shape in shapes.items():
        for stage in [int(x) for x in args.stages.split(",")]:
            results.append({"shape": shape_name, **measure(config(work, f"{shape_name}-z{stage}", shape,
                                                                  zero_stage=stage))})
            print(json.dumps(results[-1]), flush=True)
    if args.activations:
        # rows of exactly 512 byte tokens each way: the synthetic suite's rows are ~20 tokens, and
        # batches pad to their longest row, so its max lengths alone would measure almost nothing
        long_rows = long_row_data(work / "long-rows", 512)
        workers = args.activations_workers
        for ckpt in (True, False):  # the smaller first: a run that does not fit still leaves a figure
            cfg = config(work, f"act-ckpt{int(ckpt)}", {**LARGE, "tiny_num_layers": args.activations_layers},
                         zero_stage=0 if workers == 1 else 3,
                         num_workers=workers, gradient_checkpointing=ckpt, data_dir=str(long_rows),
                         train_batch_size=args.activations_batch * workers, max_input_length=512,
                         max_output_length=512, total_steps=1)
            shape_name = "t5-large-shaped" if args.activations_layers == LARGE["tiny_num_layers"] else (
                f"t5-large-wide, {args.activations_layers}+{args.activations_layers} layers")
            results.append({"shape": shape_name, **measure(cfg)})
            print(json.dumps(results[-1]), flush=True)
    return results


def report(results: list[dict]) -> None:
    overhead = {r["zero_stage"]: r["peak_rss_gb"] for r in results if r["shape"] == "small"}
    for r in results:
        r["above_process_overhead_gb"] = r["peak_rss_gb"] - overhead[r["zero_stage"]]
        r["plan_vs_measured"] = (r["plan_model_states_gb"] / r["above_process_overhead_gb"]
                                 if r["above_process_overhead_gb"] > 0 else None)
    large = {r["zero_stage"]: r["peak_rss_gb"] for r in results if r["shape"] != "small" and r["input_len"] == 32}
    summary = {"zero3_over_zero0": large[3] / large[0] if len(large) == 2 else None}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "memory.json").write_text(json.dumps({"results": results, "summary": summary}, indent=2) + "\n")
    lines = ["| backbone | ZeRO | ckpt | micro batch × tokens | resident after build / initialize / first step GB | "
             "peak RSS/worker GB | above overhead GB | plan model states GB | plan ÷ measured |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = "" if r["plan_vs_measured"] is None else f"{r['plan_vs_measured']:.2f}"
        by_stage = " / ".join(f"{r[k]:.2f}" if k in r else "–" for k in
                              ("rss_after_build_gb", "rss_after_initialize_gb", "rss_after_first_step_gb"))
        lines.append(f"| {r['shape']} ({r['params_m']:.0f} M) | {r['zero_stage']} | {r['gradient_checkpointing']} | "
                     f"{r['micro_batch']} × {r['input_len']} | {by_stage} | {r['peak_rss_gb']:.2f} | "
                     f"{r['above_process_overhead_gb']:.2f} | {r['plan_model_states_gb']:.3f} | {ratio} |")
    if summary["zero3_over_zero0"] is not None:
        lines.append(f"\nZeRO-3 (partitioned build) ÷ ZeRO-0 peak RSS: {summary['zero3_over_zero0']:.2f}")
    (OUT / "memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Step time of pre-training: a plain single-process torch loop vs Ray Train + DeepSpeed ZeRO 0/2/3.

Same model (tiny T5 with Poly adapters, adapters and routing trained), same synthetic data, same
global batch. The plain loop reads the tokenized rows in-process; the Ray runs go through
`mttl.train.loop.pretrain` (Ray Data → workers) and their `metrics.jsonl` gives the per-step time
and the data wait, the first logged window (warm-up, op loading) left out.

    python benchmarks/train_overhead.py --quick      # ~ a few minutes on 2 CPU cores
Writes benchmarks/out/train_overhead.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from _env import OUT  # first: the repo on sys.path, the Ray/DeepSpeed environment

import torch  # noqa: E402

from mttl.config import Config  # noqa: E402
from mttl.run_folder import read_metrics  # noqa: E402

TASKS = ["caesar>reverse", "double>rotate", "novowel>upper", "reverse>swapfirst", "rotate>double", "upper>swapfirst"]


def base_config(data_dir: Path, out: Path, steps: int, log_every: int) -> Config:
    cfg = Config()
    cfg.update(dict(model="tiny-t5", tiny_d_model=128, tiny_num_layers=2, tokenizer="byte", model_modifier="poly",
                    n_skills=4, lora_rank=4, trainable_param_names=".*lora_[ab].*|.*module_logits.*",
                    data_dir=str(data_dir), tasks=TASKS, output_dir=str(out), cache_dir=str(out / "cache"),
                    max_input_length=32, max_output_length=32, train_batch_size=32, total_steps=steps,
                    warmup_steps=10, log_every=log_every, eval_every=None, save_every=None, tensorboard=False,
                    max_grad_norm=1.0, n_tasks=len(TASKS)), source="benchmark")
    return cfg


def plain_loop(cfg: Config, steps: int, skip: int) -> dict:
    """Single process, no Ray, no DeepSpeed: the same model, optimizer groups, schedule and batches."""
    from mttl.data.shards import read_rows
    from mttl.data.stream import collate, tokenize_rows
    from mttl.models.run import build_routed_model
    from mttl.models.tokenizer import load_tokenizer
    from mttl.train.optim import build_optimizer, build_scheduler, optimizer_groups

    # one intra-op thread, as Ray gives a worker holding at most one CPU (OMP_NUM_THREADS=1)
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer("byte")
    table = read_rows(cfg.data_dir, tasks=TASKS, splits=["train"], columns=["task_name", "source", "target"])
    inputs, labels = tokenize_rows(tokenizer, table["source"].to_pylist(), table["target"].to_pylist(),
                                   max_input_length=cfg.max_input_length, max_output_length=cfg.max_output_length)
    rows = {name: i for i, name in enumerate(TASKS)}
    task_ids = [rows[n] for n in table["task_name"].to_pylist()]
    order = torch.randperm(len(inputs)).tolist()
    model = build_routed_model(cfg, tokenizer)
    optimizer = build_optimizer(optimizer_groups(model, cfg), cfg)
    scheduler = build_scheduler(optimizer, cfg, steps, cfg.warmup_steps)
    model.train()
    step_times, waits = [], []
    b = cfg.train_batch_size
    for step in range(steps):
        started = time.perf_counter()
        index = [order[(step * b + i) % len(order)] for i in range(b)]
        batch = collate({"input_ids": [inputs[i] for i in index], "labels": [labels[i] for i in index],
                         "task_ids": [task_ids[i] for i in index]}, tokenizer.pad_token_id)
        got_batch = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= skip:
            step_times.append(time.perf_counter() - started)
            waits.append(got_batch - started)
    return {"step_time_s": sum(step_times) / len(step_times), "data_wait_s": sum(waits) / len(waits)}


def ray_run(cfg: Config, name: str, **changes) -> dict:
    from mttl.train.loop import pretrain

    run_cfg = cfg.copy(run_name=name, **changes)
    started = time.perf_counter()
    run_dir = pretrain(run_cfg)
    wall = time.perf_counter() - started
    rows = [r for r in read_metrics(run_dir) if "loss" in r][1:]  # first window: warm-up
    step = sum(r["step_time_s"] for r in rows) / len(rows)
    wait = sum(r["data_wait_s"] for r in rows) / len(rows)
    return {"step_time_s": step, "data_wait_s": wait, "run_wall_s": wall,
            "tokens_per_s": sum(r["tokens_per_s"] for r in rows) / len(rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps (60 instead of 300)")
    args = parser.parse_args()
    steps, log_every = (60, 20) if args.quick else (300, 50)
    from mttl.data.synthetic import prepare_synthetic
    from mttl.ray_utils import init_ray

    with tempfile.TemporaryDirectory(prefix="mttl-bench-") as tmp:
        tmp = Path(tmp)
        prepare_synthetic(tmp / "synthetic", seed=0)
        cfg = base_config(tmp / "synthetic", tmp / "runs", steps, log_every)
        before = plain_loop(cfg, steps, skip=log_every)
        results = {"plain torch loop (1 process)": before}
        init_ray(cfg)
        for stage in (0, 2):  # one worker: the framework's own cost against the plain loop (target ZeRO-2 ≤ 1.10×)
            results[f"Ray Train + ZeRO-{stage}, 1 worker"] = ray_run(cfg, f"z{stage}w1", zero_stage=stage,
                                                                     num_workers=1)
        for stage in (0, 2, 3):
            results[f"Ray Train + ZeRO-{stage}, 2 workers"] = ray_run(cfg, f"z{stage}w2", zero_stage=stage,
                                                                      num_workers=2)
        # the plain loop again after the Ray runs: on a shared machine the load drifts, so the
        # baseline is the mean of a measurement before and one after
        after = plain_loop(cfg, steps, skip=log_every)
        results["plain torch loop (1 process)"] = {k: (before[k] + after[k]) / 2 for k in before}
    plain = results["plain torch loop (1 process)"]["step_time_s"]
    for row in results.values():
        row["data_wait_fraction"] = row["data_wait_s"] / row["step_time_s"]
        row["vs_plain"] = row["step_time_s"] / plain
    report = {"steps": steps, "model": "tiny-t5 d_model=128, 2+2 layers, poly K=4 r=4",
              "global_batch": cfg.train_batch_size, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "torch": torch.__version__, "results": results}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "train_overhead.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Pre-training step time ({report['model']}, global batch {report['global_batch']}, "
             f"{steps} steps, {report['machine']})", "",
             "| setup | ms/step | × plain loop | data wait ms/step | data wait fraction | whole run s |",
             "|---|---|---|---|---|---|"]
    for name, row in results.items():
        wall = f"{row['run_wall_s']:.1f}" if "run_wall_s" in row else "–"
        lines.append(f"| {name} | {1000 * row['step_time_s']:.1f} | {row['vs_plain']:.2f} "
                     f"| {1000 * row['data_wait_s']:.2f} | {row['data_wait_fraction']:.1%} | {wall} |")
    (OUT / "train_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

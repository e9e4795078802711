"""The quick start's pipeline (`mttl quickstart`): everything on the embedded default, in one call.

1. prepare the synthetic skills suite into Parquet shards (reused when already there);
2. pre-train on a local Ray cluster with DeepSpeed engines: phase one warms the tiny T5 up on the
   suite's warm-up tasks, phase two trains MHR adapters (K skills, S heads) on the frozen result;
3. adapt to every held-out composition with the default finetune type (adapters + a fresh
   routing row), `Z` (routing only: MHR-z), `MuZ` (average routing, adapters trained: MHR-µ) and,
   as the baseline, a fresh LoRA on the warmed-up backbone (`A`): one Ray task per method;
4. print the results table (test exact match: median over seeds per task, mean over tasks);
5. write the report (tables, learning curves, routing heatmaps) to `<output_dir>/<run_name>-report`.

Every step resumes: running the command again keeps finished pre-training runs and fine-tuning
seeds. `-k` keys set the pre-training (as `mttl pretrain`); `--finetune KEY=VALUE …` the few-shot runs.
"""

from __future__ import annotations

import time
from pathlib import Path

from mttl.config import Config, load_config

RUN_NAME = "quickstart_mhr"
# Pre-training on top of `mttl pretrain`'s embedded default: MHR, K = 8 skills (one or more per
# primitive string skill of the suite), S = 4 heads of the 128-wide tiny T5.
PRETRAIN = {"n_skills": 8, "n_splits": 4, "run_name": RUN_NAME}
# Few-shot settings shared by every method: 32 shots, 2 seeds, 100 steps validated every 10 epochs
# (4 steps an epoch), no zero-shot pass: about 6 s a seed on one core, which keeps the 48 runs
# within the ten minutes.
FINETUNE = {"num_shots": 32, "seeds": [13, 42], "train_batch_size": 8, "total_steps": 100,
            "eval_every_epochs": 10, "learning_rate": 1e-3, "adapters_learning_rate": 3e-3,
            "module_logits_learning_rate": 0.1, "predict_batch_size": 200, "log_every": 25, "do_zs": False}
DEVICE_KEYS = ("use_gpu", "precision", "backbone_dtype")
# method label → (finetune_type, checkpoint phase, extra keys); "backbone" is phase one's run.
METHODS = {
    "mhr": (None, "adapters", {}),
    "mhr-z": ("Z", "adapters", {}),
    "mhr-mu": ("MuZ", "adapters", {}),
    "lora": ("A", "backbone", {"model_modifier": "lora", "lora_rank": 4}),  # type A trains the adapters only
}


def run_quickstart(cfg: Config, methods: list[str], finetune_keys: dict, started: float) -> Path:
    """The pipeline for `cfg` (pre-training keys over DEFAULTS and PRETRAIN): pre-train both phases, adapt
    with each of `methods` (finetune_keys over FINETUNE), print the table, write the report; returns it."""
    from mttl.report import build_report
    from mttl.run_folder import local_output_only
    from mttl.train.recipe import BACKBONE_SUFFIX, pretrain_default

    local_output_only(cfg, "mttl quickstart")
    _say(started, "pre-training (phase one: backbone on the warm-up tasks; phase two: adapters)")
    adapters_run = Path(pretrain_default(cfg))
    backbone_run = adapters_run.with_name(adapters_run.name + BACKBONE_SUFFIX)

    _say(started, f"adapting to the held-out tasks with {', '.join(methods)}")
    configs = {m: method_config(cfg, m, adapters_run, backbone_run, finetune_keys) for m in methods}
    runs = adapt_all(configs, held_out(adapters_run), started)
    print(results_table(runs))
    print(what_the_table_shows(runs))

    report = build_report([backbone_run, adapters_run, *runs.values()], Path(cfg.output_dir) / f"{cfg.run_name}-report")
    _say(started, f"report: {report}")
    return report


def _say(started: float, message: str) -> None:
    print(f"[quickstart {time.monotonic() - started:5.0f}s] {message}", flush=True)


def method_config(cfg: Config, method: str, adapters_run: Path, backbone_run: Path, finetune_keys: dict) -> Config:
    """The few-shot config of one method (its own run folder next to the pre-training runs)."""
    finetune_type, phase, extra = METHODS[method]
    checkpoint = adapters_run if phase == "adapters" else backbone_run
    # the device and precision keys of the command apply to the few-shot runs too, unless --finetune sets them
    device_keys = {k: getattr(cfg, k) for k in DEVICE_KEYS if cfg.was_overridden(k)}
    keys = {**device_keys, **finetune_keys, **extra, "finetune_type": finetune_type, "checkpoint": str(checkpoint),
            "output_dir": cfg.output_dir, "run_name": f"{cfg.run_name}-ft-{method}", "seed": cfg.seed}
    return load_config(None, keys)


def held_out(adapters_run: Path) -> list[str]:
    from mttl.data.locate import resolve_data_dir
    from mttl.evaluation.zeroshot import held_out_tasks

    return held_out_tasks(resolve_data_dir(Config.load(adapters_run / "config.json")))


def adapt_method(cfg: Config, tasks: list[str]) -> str:
    """Every held-out task with one method, sequentially into one run folder (rows are shared by tasks)."""
    import torch

    from mttl.finetune.loop import run_finetune

    torch.set_num_threads(1)  # one core per Ray task: the tiny model gains nothing from more
    run_dir = None
    for task in tasks:  # no line per task: the driver prints one per method
        run_dir = run_finetune(cfg.copy(finetune_task_name=task))
    return str(run_dir)


def adapt_all(configs: dict[str, Config], tasks: list[str], started: float) -> dict[str, Path]:
    """One Ray task (one CPU) per method config, on the running (or a new local) cluster; method → run folder.

    When the tasks use GPUs (`use_gpu`, resolved against the cluster) the methods share them: each
    task asks for an equal share of the cluster's GPUs, at most one, and computes on the GPU Ray gives it."""
    import ray

    from mttl.device import cluster_gpus, cluster_uses_gpu
    from mttl.ray_utils import init_ray

    first = next(iter(configs.values()))
    init_ray(first)
    num_gpus = min(1.0, cluster_gpus() / len(configs)) if cluster_uses_gpu(first) else 0
    remote = ray.remote(num_cpus=1, num_gpus=num_gpus)(adapt_method)
    pending = {remote.remote(cfg, tasks): method for method, cfg in configs.items()}
    runs = {}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        method = pending.pop(done[0])
        runs[method] = Path(ray.get(done[0]))
        _say(started, f"{method}: {len(tasks)} tasks adapted ({len(runs)}/{len(configs)} methods)")
    return {m: runs[m] for m in configs}


ROUTED_LABELS = {"mhr": "MHR (adapters + a fresh routing row)", "mhr-z": "MHR-z (routing only)",
                 "mhr-mu": "MHR-mu (average routing, adapters trained)"}


def what_the_table_shows(runs: dict[str, Path]) -> str:
    """One sentence under the table: the best routed method against the fresh LoRA baseline."""
    from mttl.run_folder import aggregate, read_results

    means = {m: aggregate(read_results(path), "test")["mean"] for m, path in runs.items()}
    routed = {m: v for m, v in means.items() if m in ROUTED_LABELS}
    if not routed:
        return f"Only the fresh LoRA baseline ran: {means['lora']:.3f} test exact match on the held-out compositions."
    best = max(routed, key=routed.get)
    sentence = (f"On compositions never seen in training, the best routed method, {ROUTED_LABELS[best]}, reaches "
                f"{routed[best]:.3f} test exact match")
    if "lora" not in means:
        return sentence + "."
    verdict = "recombining the pre-trained skills helps" if routed[best] > means["lora"] else \
        "here recombining the pre-trained skills did not help"
    return f"{sentence}, against {means['lora']:.3f} for a fresh LoRA on the same backbone: {verdict}."


def results_table(runs: dict[str, Path]) -> str:
    """Test exact match per held-out task (median over seeds) and the mean over tasks, per method."""
    from mttl.run_folder import aggregate, read_results

    summaries = {m: aggregate(read_results(path), "test") for m, path in runs.items()}
    tasks = sorted({t for s in summaries.values() for t in s["per_task"]})
    header = "| task | " + " | ".join(summaries) + " |"
    lines = ["", "Held-out compositions, test exact match (median over seeds):", "", header,
             "|---" * (len(summaries) + 1) + "|"]
    lines += [f"| {task} | "
              + " | ".join(f"{s['per_task'].get(task, float('nan')):.3f}" for s in summaries.values()) + " |"
              for task in tasks]
    lines.append("| **mean** | " + " | ".join(f"**{s['mean']:.3f}**" for s in summaries.values()) + " |")
    return "\n".join(lines) + "\n"

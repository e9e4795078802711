"""`mttl evaluate`: score a pre-trained run on tasks without training (MHR-µ zero-shot for unseen tasks)."""

from __future__ import annotations

from mttl.cli import add_config_arguments, flat_kwargs
from mttl.config import load_config

HELP = "score a pre-trained run on tasks without training (average routing for unseen tasks)"
DESCRIPTION = HELP + """

Tasks default to the dataset's held-out tasks; tasks the run was not trained on are scored with
average routing (MHR-mu); with router_selector=arrow every task is routed per token by Arrow
over the run's trained LoRA skills (arrow_top_k, arrow_temperature). Results go to
$output_dir/$run_name/results.csv, each task as soon as it is scored: the same command run again
scores only the tasks not there yet. With resources_per_run, or on a joined Ray cluster
(ray_address / RAY_ADDRESS), every task runs as its own Ray task with those resources (default 1 CPU,
plus 1 GPU when the cluster has GPUs), with a progress line per finished task; otherwise the model is
loaded once in this process. On T0 data, keys
you do not set take the reference's T0 values (mttl/configs/t0/finetune.json and the per-task
files): rank classification length-normalised (length_norm=1), predict_batch_size 16.

Examples:
  mttl evaluate -k checkpoint=output/synthetic_poly
  mttl evaluate -k checkpoint=output/t0_mhr tasks="['rte', 'cb']" run_name=t0_mhr_zero_shot
  mttl evaluate -k checkpoint=output/synthetic_poly router_selector=arrow arrow_top_k=2
  mttl evaluate -k checkpoint=output/t0_mhr tasks=held_out resources_per_run="{'GPU': 0.25, 'CPU': 2}"
"""


def add_arguments(parser) -> None:
    add_config_arguments(parser)


def run(args) -> int:
    from mttl.evaluation.zeroshot import evaluate_checkpoint

    run_dir, summary = evaluate_checkpoint(load_config(args.config_files, flat_kwargs(args)))
    for task, value in summary["per_task"].items():
        print(f"{task}\t{value:.2f}")
    for category, value in summary["per_category"].items():
        print(f"[{category}]\t{value:.2f}")
    print(f"mean over {len(summary['per_task'])} tasks\t{summary['mean']:.2f}")
    print(f"results: {run_dir / 'results.csv'}")
    return 0

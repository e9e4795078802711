"""`mttl finetune`: adapt a pre-trained run to held-out tasks, every seed (several tasks: as Ray tasks)."""

from __future__ import annotations

from mttl.cli import add_config_arguments, flat_kwargs
from mttl.config import load_config
from mttl.finetune.type_table import FINETUNE_TYPES

HELP = f"few-shot adaptation of a pre-trained run to held-out tasks (types {', '.join(FINETUNE_TYPES)})"
TYPES = "\n".join(f"  {t.name:<9}trains {t.trains}; starts from {t.starting_point}" for t in FINETUNE_TYPES.values())
DESCRIPTION = HELP + """

Every seed of `seeds` is trained on num_shots examples of the task, validated every
eval_every_epochs, and its best validation weights are tested. Architecture and data keys come
from the checkpoint's config unless given here. Writes results.jsonl and results.csv (zero_shot,
best_val, test per seed) into $output_dir/$run_name/ (default run_name: finetune_<task>_<type>);
running the same command again skips the seeds already done.

Several tasks (finetune_task_name as a list, or tasks=held_out for every held-out task of the
data): every task x seed runs as its own Ray task with resources_per_run (default 1 CPU, plus
1 GPU when the cluster has GPUs; {'GPU': 0.25, 'CPU': 2} packs four on a GPU), on the device Ray
gave it. Each finished pair is written to results.jsonl at once and a line with the counts and
the ETA is printed; a rerun skips the pairs already there. The table at the end: median over
seeds per task, then the mean over tasks (run_name default: finetune_<N>tasks_<type>).

On T0 data, keys you do not set take the reference's T0 few-shot values (those of
mttl/configs/t0/finetune.json and t0/<task>.json): Adafactor at lr 3e-3, 1,000 steps, batch 8,
length-normalised rank classification (length_norm=1) and the T-Few losses (mc_loss=1,
unlikely_loss=1); ANLI tasks default to 32 shots. NI trains with label_smoothing 0.1.

Finetune types (finetune_type; unset = Poly):
""" + TYPES + """

Examples:
  mttl finetune -k checkpoint=output/t0_mhr finetune_task_name=rte finetune_type=Z
  mttl finetune -c t0/finetune.json+t0/cb.json -k checkpoint=output/t0_mhr finetune_type=MuZ
  mttl finetune -k checkpoint=output/t0_mhr tasks=held_out finetune_type=Z resources_per_run="{'GPU': 0.25, 'CPU': 2}"
  mttl finetune -k checkpoint=output/ni_mhr finetune_task_name=task1356_xlsum_title_generation seeds="[13]"
"""


def add_arguments(parser) -> None:
    add_config_arguments(parser)


def run(args) -> int:
    from mttl.finetune.loop import run_finetune
    from mttl.run_folder import aggregate, read_results

    cfg = load_config(args.config_files, flat_kwargs(args))
    run_dir = run_finetune(cfg)
    rows = read_results(run_dir)
    for evaluation in ("zero_shot", "best_val", "test"):
        summary = aggregate(rows, evaluation)
        for task, value in summary["per_task"].items():
            print(f"{task}\t{evaluation}\tmedian over seeds {value:.2f}")
        if len(summary["per_task"]) > 1:
            print(f"mean over {len(summary['per_task'])} tasks\t{evaluation}\t{summary['mean']:.2f}")
    print(f"results: {run_dir / 'results.csv'}")
    return 0

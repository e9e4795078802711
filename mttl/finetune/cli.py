"""`mttl finetune`: adapt a pre-trained run to one held-out task, every seed, in this process."""

from __future__ import annotations

from mttl.cli import add_config_arguments, flat_kwargs
from mttl.config import load_config

HELP = "few-shot adaptation of a pre-trained run to one held-out task (types F, A, Z, MuZ, PolyRand, Poly)"
DESCRIPTION = HELP + """

Example:
  mttl finetune -c t0/finetune.json -k checkpoint=output/mhr_t0 finetune_task_name=cb finetune_type=Z

Architecture keys come from the checkpoint's config unless given here. Writes results.jsonl and
results.csv (zero_shot, best_val, test per seed) into $output_dir/$run_name/."""


def add_arguments(parser) -> None:
    add_config_arguments(parser)


def run(args) -> int:
    from mttl.evaluation.metrics import aggregate
    from mttl.finetune.loop import run_finetune, read_results

    cfg = load_config(args.config_files, flat_kwargs(args))
    run_dir = run_finetune(cfg)
    rows = read_results(run_dir)
    for evaluation in ("zero_shot", "best_val", "test"):
        summary = aggregate(rows, evaluation)
        for task, value in summary["per_task"].items():
            print(f"{task}\t{evaluation}\tmedian over seeds {value:.2f}")
    print(f"results: {run_dir / 'results.csv'}")
    return 0

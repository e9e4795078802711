"""`mttl sweep`: per-task hyper-parameter search of few-shot fine-tuning (Ray Tune + Optuna + ASHA)."""

from __future__ import annotations

from mttl.cli import add_config_arguments, flat_kwargs
from mttl.config import load_config

HELP = "search fine-tuning hyper-parameters per held-out task with Ray Tune, Optuna (TPE) and ASHA"
DESCRIPTION = HELP + """

Example:
  mttl sweep -k checkpoint=output/mhr_synthetic tune_space=mhr_z num_samples=8 run_name=sweep_z

The space is a tune_spaces/ module (or a .py file); search=grid runs its preset grid instead.
Running the same run_name again resumes the sweep. Writes results.csv, <study>/best.json and
summary.md into $output_dir/$run_name/."""


def add_arguments(parser) -> None:
    add_config_arguments(parser)


def run(args) -> int:
    from mttl.sweep import run_sweep

    sweep_dir, _ = run_sweep(load_config(args.config_files, flat_kwargs(args)))
    print(f"results: {sweep_dir / 'results.csv'}")
    return 0

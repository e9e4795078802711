"""`mttl sweep`: per-task hyper-parameter search of few-shot fine-tuning (Ray Tune + Optuna + ASHA)."""

from __future__ import annotations

from mttl.cli import add_config_arguments, flat_kwargs
from mttl.config import load_config

HELP = "search fine-tuning hyper-parameters per held-out task with Ray Tune, Optuna (TPE) and ASHA"
DESCRIPTION = HELP + """

The space is a tune_spaces/ module (full, ia3, lora, mhr, mhr_mu, mhr_z, poly, poly_z) or a .py
file; search=grid runs its preset grid instead. Running the same run_name again resumes the
sweep. Writes results.csv, <study>/best.json and summary.md into $output_dir/$run_name/.

Examples:
  mttl sweep -k checkpoint=output/synthetic_poly tune_space=poly num_samples=8
  mttl sweep -k checkpoint=output/t0_mhr tune_space=mhr_z tasks="['rte', 'cb']" run_name=sweep_t0_z
  mttl sweep -k checkpoint=output/ni_mhr finetune_type=Z search=grid run_name=sweep_ni_mhr_z
"""


def add_arguments(parser) -> None:
    add_config_arguments(parser)


def run(args) -> int:
    from mttl import storage
    from mttl.sweep import run_sweep

    cfg = load_config(args.config_files, flat_kwargs(args))
    sweep_dir, _ = run_sweep(cfg)
    if storage.is_uri(str(cfg.output_dir)):  # sweep_dir is the local mirror; the sweep is in the bucket
        print(f"results: {storage.join(str(cfg.output_dir), cfg.run_name or sweep_dir.name, 'results.csv')}")
    else:
        print(f"results: {sweep_dir / 'results.csv'}")
    return 0

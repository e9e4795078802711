"""`mttl pretrain`: multi-task pre-training of routed adapters on Ray Train + DeepSpeed.

With a `model` in the config (or `-k model=…`) it runs one phase on the data's training tasks; with a
`checkpoint` (a finished run folder) it continues that run's adapters and routing in a new run,
`switch_to_avg_modules=True` training their average (MHR-µ).
Without one it runs the embedded default on the synthetic suite, in two phases through the same
trainer: a tiny T5 built from a config is trained whole on the warm-up tasks (`<run_name>-backbone`),
then frozen and given routed adapters (Poly) trained on the composition tasks (`<run_name>`).
"""

from __future__ import annotations

import argparse

from mttl.cli import add_config_arguments, flat_kwargs
from mttl.config import load_config

HELP = "pre-train routed adapters on many tasks (Ray Train workers, DeepSpeed ZeRO 0-3)"
DESCRIPTION = __doc__ + """
Phase one runs six times phase two's total_steps. The run folder $output_dir/$run_name holds config.json,
tasks.json, metrics.jsonl, TensorBoard events, Ray Train checkpoints and final/. Running the same
command again resumes from the last checkpoint; a larger total_steps continues a finished run; any
other changed key is refused.

examples:
  mttl pretrain                                     # synthetic suite, tiny T5, two phases
  mttl pretrain -k num_workers=2 zero_stage=3 train_batch_size=16
  mttl pretrain -c ni/pretrain.json+ni/mhr.json -k data_dir=data/shards/ni
  mttl pretrain -k checkpoint=output/synthetic_poly run_name=synthetic_mu switch_to_avg_modules=True total_steps=200
  python jobs/pretrain.py -c synthetic/pretrain.json   # same code, for `ray job submit`
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from mttl.train.recipe import DEFAULTS, run_pretrain

    run_dir = run_pretrain(load_config(args.config_files, flat_kwargs(args), base=DEFAULTS))
    print(f"[mttl] run folder: {run_dir}")
    return 0

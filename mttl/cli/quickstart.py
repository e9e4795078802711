"""`mttl quickstart`: the whole pipeline on the embedded default, in one command.

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

import argparse
import time

from mttl.cli import add_config_arguments, flat_kwargs
from mttl.config import load_config, parse_kwargs
from mttl.quickstart import FINETUNE, METHODS

HELP = "the whole pipeline on the synthetic suite: prepare, pre-train MHR, adapt (default, Z, MuZ, LoRA), report"
DESCRIPTION = __doc__ + """
examples:
  mttl quickstart                                   # about 10 minutes on 2 CPU cores
  mttl quickstart -k output_dir=runs total_steps=1000 --finetune seeds="[13, 42, 58]"
  mttl quickstart -k n_splits=1 run_name=quickstart_poly   # Poly (one head) instead of MHR
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--finetune", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config keys for the few-shot runs (after the quick start's own: 32 shots, seeds 13 "
                             "and 42, 100 steps). Example: --finetune seeds=\"[13, 42, 58]\" total_steps=400")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated methods to adapt with, of {', '.join(METHODS)}. "
                             "Example: --methods mhr,lora")


def run(args: argparse.Namespace) -> int:
    from mttl.errors import ConfigError
    from mttl.quickstart import PRETRAIN, run_quickstart
    from mttl.train.recipe import DEFAULTS

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"--methods {args.methods!r}: unknown {unknown or 'empty'}; choose from {', '.join(METHODS)}")
    started = time.monotonic()
    cfg = load_config(args.config_files, flat_kwargs(args), base={**DEFAULTS, **PRETRAIN})
    finetune_keys = {**FINETUNE, **parse_kwargs(args.finetune)}
    load_config(None, finetune_keys)  # refuse unknown keys or bad values before pre-training starts

    run_quickstart(cfg, methods, finetune_keys, started)
    return 0

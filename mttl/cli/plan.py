"""`mttl plan`: will a pre-training run fit in each worker's memory, and the cheapest setting that does
(the estimate is `mttl.plan`'s)."""

from __future__ import annotations

import json

from mttl.cli import add_config_arguments, flat_kwargs
from mttl.config import load_config

HELP = "estimate per-worker memory of a pre-training run and the cheapest ZeRO setting that fits"
DESCRIPTION = HELP + """

Builds the configured model on the meta device (no weights, no GPU, works offline for the named
T5 v1.1 shapes) and prints per worker: backbone weights, adapter and routing weights, gradients,
optimizer states, an activation estimate and the total against device_memory_gb; then the
cheapest setting that fits (least offload, lowest ZeRO stage, fewest accumulation steps).

Examples:
  mttl plan -c ni/pretrain.json+ni/mhr.json -k model=t5-v1_1-xl num_workers=8 use_gpu=True device_memory_gb=80
  mttl plan -k model=google/t5-xl-lm-adapt model_modifier=poly n_splits=4 precision=bf16 device_memory_gb=80 --json
"""


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON object. Example: --json")


def run(args) -> int:
    cfg = load_config(args.config_files, flat_kwargs(args))
    from mttl.plan import format_plan, plan

    result = plan(cfg)
    print(json.dumps(result) if args.json else format_plan(result))
    return 0

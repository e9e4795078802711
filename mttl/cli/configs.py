"""`mttl configs`: list the ready-made config files and show a merged configuration."""

from __future__ import annotations

import json

from mttl.cli import add_config_arguments, flat_kwargs
from mttl.config import config_search_dirs, load_config

HELP = "list ready-made configs, or print the merged config for -c/-k"
DESCRIPTION = HELP + """

Without options, lists the config files that -c finds by name. With -c and/or -k, prints the
configuration a training command would use (defaults < files left to right < -k), grouped by
section (a config file may be written the same way, or flat).

Examples:
  mttl configs
  mttl configs -c t0/pretrain.json+t0/mhr.json --show
  mttl configs -c ni/pretrain.json+ni/mhr.json -k n_splits=16 learning_rate=1e-4
"""


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--show", action="store_true",
                        help="print the merged config as JSON (also implied by -c or -k); without them, the defaults. "
                             "Example: mttl configs -c ni/mhr.json --show")


def run(args) -> int:
    if args.show or args.config_files or flat_kwargs(args):
        cfg = load_config(args.config_files, flat_kwargs(args))
        print(json.dumps(cfg.to_dict(sectioned=True), indent=2, default=str))
        return 0
    for folder in config_search_dirs():
        if folder.is_dir():
            for path in sorted(folder.rglob("*.json")):
                print(path.relative_to(folder))
    return 0

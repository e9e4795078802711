"""`mttl export`: the command line of `mttl.export` (help, arguments), light enough for `--help`."""

from __future__ import annotations

import argparse

HELP = "export a run's adapters as a PEFT poly or LoRA adapter, or as a merged backbone"
DESCRIPTION = """\
Export a finished run (a RUN_DIR written by `mttl pretrain` or its final/ folder).

  --format peft       the Poly/MHR skills and routing as a PEFT `poly` adapter; load it with
                      PeftModel.from_pretrained(base, DIR) and call it with task_ids=...
  --format peft-lora  task T's routed adapter collapsed into a plain PEFT LoRA adapter (--task T)
  --format merged     the backbone with task T's adapter merged into its weights, in
                      save_pretrained layout with the tokenizer (--task T)

T is a task name from the run's tasks.json or a routing row number. DIR must not exist yet.
PEFT adapters record the run's backbone as base_model_name_or_path; for a `tiny-t5` backbone
rebuild it with mttl.models.backbone.load_backbone (same vocab size and seed).

Examples:
  mttl export output/mhr_ni --format peft --out exports/mhr_ni_peft
  mttl export output/mhr_ni --format peft-lora --task task1356_xlsum_title_generation --out exports/xlsum_lora
  mttl export output/mhr_ni/final --format merged --task 0 --out exports/task0_merged
"""

FORMATS = ("peft", "peft-lora", "merged")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run folder (or its final/). Example: output/mhr_synthetic")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="what to write: peft (poly adapter), peft-lora (one task's LoRA), merged (backbone). "
                             "Example: --format peft-lora")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder to create (must not exist). Example: --out exports/mhr_peft")
    parser.add_argument("--task", default=None, metavar="T",
                        help="task name from the run's tasks.json, or a routing row; needed by peft-lora and "
                             "merged for routed runs. Example: --task cb")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let the backbone's own Python code (`auto_map` in its config.json) run while loading "
                             "it; off by default, and never taken from the run folder's config.json. "
                             "Example: --trust-remote-code")


def run(args: argparse.Namespace) -> int:
    from mttl.adapters.inject import adapter_config
    from mttl.export import (check_export_out, export_merged, export_peft_lora, export_peft_poly, local_run,
                             resolve_task)
    from mttl.models.run import backbone_source, load_run

    # before the run is loaded: a bad --out should not cost a model load, nor fail after one
    check_export_out(args.out)
    # RUN_DIR or --out may be URIs (s3://bucket/runs/name): the run is read from this machine's copy
    loaded = load_run(local_run(args.run_dir), trust_remote_code=args.trust_remote_code)
    model = loaded.model
    acfg = adapter_config(model)
    backbone = backbone_source(loaded.cfg, loaded.run_dir)
    if args.format == "peft":
        export_peft_poly(model, args.out, base_model_name=backbone, tasks=loaded.tasks)
    else:
        routed = acfg is not None and acfg.routed and acfg.selector != "average"
        task_id = resolve_task(args.task, loaded.tasks, routed=routed, n_tasks=acfg.n_tasks if acfg else 1)
        if args.format == "peft-lora":
            export_peft_lora(model, task_id, args.out, base_model_name=backbone)
        else:
            export_merged(model, task_id, args.out, tokenizer=loaded.tokenizer)
    print(f"wrote {args.format} export to {args.out}")
    return 0

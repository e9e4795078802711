"""`mttl report RUN_DIR… --out DIR`: tables and pictures from pre-training, fine-tuning and sweep runs.

Reads finished run folders (never a model): `metrics.jsonl` (learning curves),
`final/adapters.safetensors` + `adapters.json` + `tasks.json` (routing heatmaps, read straight
from the routing logits), `results.jsonl` (fine-tuning: median over seeds per task, then mean over
tasks) and a sweep's `results.csv` (best complete trial per study). Writes `report.md`, CSV tables and PNG
figures (matplotlib, headless) into a temporary folder that is renamed onto `--out` at the end
(`mttl.report`).
"""

from __future__ import annotations

from mttl.errors import MttlError

HELP = "write Markdown/CSV tables and PNG figures (routing heatmaps, learning curves) for runs"
DESCRIPTION = """\
Summarise finished runs into one folder: report.md, CSV tables and PNG figures.

A RUN_DIR is recognised by what it holds:
  pre-training  metrics.jsonl and/or final/adapters.safetensors (+ tasks.json, config.json)
  fine-tuning   results.jsonl (rows: task, seed, finetune_type, evaluation, metric, value)
  sweep         results.csv with a trial_id column (one row per trial)
A folder holding none of these but whose sub-folders are runs stands for those runs.

Fine-tuning scores: median over seeds per task, then mean (and std) over tasks, per method
(a method is a run and its finetune_type). Routing heatmaps show eval-mode weights
(for Poly/MHR: sigmoid of the logits, normalised over skills) averaged within each layer group
(encoder/decoder x self-attention/cross-attention/FFN), one panel per head when S > 1.

Example:
  mttl report output/mhr_synthetic output/mhr_synthetic_ft output/sweep_z --out report
"""


def add_arguments(parser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run folders (pre-training, fine-tuning or sweep), or a folder of runs. "
                             "Example: output/mhr_synthetic output/mhr_synthetic_ft")
    parser.add_argument("--out", default="report", metavar="DIR",
                        help="folder for report.md, the CSV tables and figures/: new, empty, or an earlier "
                             "report (whose files are replaced; other files are left alone). Default: report. "
                             "Example: --out reports/ni_s8")
    parser.add_argument("--max-heads", type=int, default=8, metavar="N",
                        help="routing heatmaps show at most N heads per layer group (evenly spaced) when S > N. "
                             "Default: 8. Example: --max-heads 16")


def run(args) -> int:
    if args.max_heads < 1:
        raise MttlError(f"--max-heads must be at least 1, got {args.max_heads}; example: --max-heads 8")
    from mttl.report import build_report

    path = build_report([path for raw in args.run_dirs for path in _local_runs(raw)], args.out,
                        max_heads=args.max_heads)
    print(f"report written to {path}")
    return 0


def _local_runs(raw: str) -> list[str]:
    """A run folder URI (or an output_dir URI: each run under it) as this machine's copies under
    CACHE_DIR/storage/; a local path as given."""
    from mttl import storage
    from mttl.config import Config
    from mttl.run_folder import CONFIG_FILE, FINAL_DIR

    if not storage.is_uri(raw):
        return [raw]
    uri, cache_dir = raw.rstrip("/"), Config().cache_dir
    storage.check_reachable(uri)
    files = storage.list_files(uri)
    runs = [uri] if CONFIG_FILE in files else sorted(storage.join(uri, rel.split("/")[0]) for rel in files
                                                     if rel.count("/") == 1 and rel.endswith(f"/{CONFIG_FILE}"))
    if not runs:
        raise MttlError(f"{uri} holds no run folder (no config.json in it or in a folder under it); "
                        "give $output_dir/$run_name or an output_dir")
    return [str(storage.local_run_copy(run, cache_dir, folders=(FINAL_DIR,))) for run in runs]

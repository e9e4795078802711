"""`mttl prepare SOURCE … --out DIR` and `mttl prepare check DIR`.

Dispatches to the data-source modules (each exposes `SOURCE_HELP`, `add_cli_arguments(parser)`
and `prepare_from_args(args) -> manifest`), adds the flags every source shares, and prints a
short summary of what was written (or that the output was already up to date).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections import Counter

HELP = "prepare a task collection (ni, t0, xfit, synthetic) into Parquet shards, or check a prepared folder"
DESCRIPTION = """Prepare a task collection into DIR/manifest.json + DIR/<split>/part-*.parquet.

Examples:
  mttl prepare ni --source ../shared/data/natural-instructions --split available --out data/shards/ni
  mttl prepare xfit --source data/crossfit --partition random.json --out data/shards/xfit
  mttl prepare check data/shards/ni

The output appears atomically; running the same command on an unchanged source is a no-op."""

# sub-command -> module implementing the source
SOURCES = {
    "ni": "mttl.data.ni",
    "t0": "mttl.data.t0",
    "xfit": "mttl.data.xfit",
    "synthetic": "mttl.data.synthetic",
}
# sub-command -> the examples block of its --help
EXAMPLES = {
    "ni": ["mttl prepare ni --source ../shared/data/natural-instructions --split available --out data/shards/ni",
           "mttl prepare ni --source natural-instructions --num-pos-examples 2 --tokenizer ../shared/tokenizers/t5 "
           "--out data/shards/ni_pos2"],
    "t0": ["mttl prepare t0 --source ../shared/data/t0 --out data/shards/t0",
           "mttl prepare t0 --source ../shared/data/t0 --tasks cb rte --storycloze-dir ~/storycloze "
           "--out data/shards/t0"],
    "xfit": ["mttl prepare xfit --source data/crossfit --partition random.json --out data/shards/xfit"],
    "synthetic": ["mttl prepare synthetic --out data/shards/synthetic",
                  "mttl prepare synthetic --seed 1 --n-heldout 4 --out data/shards/synthetic_seed1"],
    "check": ["mttl prepare check data/shards/ni"],
}


def _description(text: str, source: str) -> str:
    return text + "\n\nExamples:\n" + "\n".join(f"  {line}" for line in EXAMPLES[source])


def _source_modules() -> dict:
    """The source modules that exist; a source whose own module is absent is simply not listed."""
    modules = {}
    for name, module_name in SOURCES.items():
        try:
            modules[name] = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise  # the module exists but one of its imports is broken: show it
    return modules


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="source", metavar="SOURCE", required=True)
    for name, module in _source_modules().items():
        # "resolve": the shared --out/--debug below win over a source that also defines them
        p = sub.add_parser(name, help=module.SOURCE_HELP, description=_description(module.SOURCE_HELP, name),
                           formatter_class=argparse.RawDescriptionHelpFormatter, conflict_handler="resolve")
        module.add_cli_arguments(p)
        p.add_argument("--out", required=True, metavar="DIR",
                       help=f"output folder (created or atomically replaced). Example: --out data/shards/{name}")
        p.add_argument("--debug", action="store_true",
                       help="show the full traceback of an error instead of its one-line message. Example: --debug")
        p.set_defaults(_prepare=module.prepare_from_args)
    p = sub.add_parser("check", help="verify a prepared folder against its manifest (exit 1 on problems)",
                       description=_description("Verify files, sha256, row counts and Parquet readability against "
                                                "manifest.json; prints one line per problem and exits 1.", "check"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", metavar="DIR", help="a folder written by `mttl prepare SOURCE --out DIR`. "
                                              "Example: mttl prepare check data/shards/ni")
    p.add_argument("--debug", action="store_true",
                   help="show the full traceback of an error instead of its one-line message. Example: --debug")


def run(args: argparse.Namespace) -> int:
    if args.source == "check":
        return _check(args.dir)
    from mttl.data.shards import check_replaceable

    check_replaceable(args.out)  # before any source file is read
    manifest = args._prepare(args)
    print(summary(manifest, args.out))
    return 0


def _check(data_dir: str) -> int:
    from mttl import storage

    if storage.is_uri(data_dir):  # every object downloaded afresh (a temporary folder), then checked
        import tempfile

        from mttl.data.locate import local_data_copy

        with tempfile.TemporaryDirectory(prefix="mttl-check-") as tmp:
            copy = str(local_data_copy(data_dir, tmp))
            return _check_folder(copy, name=data_dir.rstrip("/"))
    return _check_folder(data_dir, name=data_dir)


def _check_folder(data_dir: str, name: str) -> int:
    from mttl.data.shards import check, read_manifest

    problems = [problem.replace(data_dir, name) for problem in check(data_dir)]
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 1
    manifest = read_manifest(data_dir)
    print(f"ok: {name}: {len(manifest['tasks'])} tasks, {len(manifest['files'])} files, "
          f"{sum(f['rows'] for f in manifest['files'])} rows")
    return 0


def summary(manifest: dict, out: str) -> str:
    """A few lines: output folder (and whether it was unchanged), tasks per role, rows per split."""
    roles = Counter(meta.get("role", "train") for meta in manifest["tasks"].values())
    rows = Counter()
    for meta in manifest["tasks"].values():
        rows.update(meta.get("rows", {}))
    state = "unchanged (same source and arguments)" if manifest.get("unchanged") else "written"
    lines = [f"{out}: {state}",
             f"tasks: {len(manifest['tasks'])} (" + ", ".join(f"{r} {n}" for r, n in sorted(roles.items())) + ")",
             "rows: " + ", ".join(f"{split} {n}" for split, n in sorted(rows.items()))]
    skipped = {k: (len(v) if isinstance(v, (list, dict)) else v) for k, v in (manifest.get("skipped") or {}).items()}
    if any(skipped.values()):
        lines.append("skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(skipped.items()) if v))
    return "\n".join(lines)

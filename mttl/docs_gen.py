"""Generates docs/configuration.md from `mttl/config.py`: every key's type, default, environment
variable, help text and example, grouped by the sections of `Config` (`SECTIONS`), plus the
accepted aliases, the reference's no-effect keys and its data keys that are `mttl prepare` options.

    python -m mttl.docs_gen            # rewrite docs/configuration.md
    python -m mttl.docs_gen --check    # exit 1 when the committed file is out of date

Defaults are the declared ones (`metadata["default"]`), not those of a `Config()` instance, so keys
whose default honours an environment variable document the default, not this shell.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from mttl.config import ALIASES, MODIFIER_ALIASES, NO_EFFECT_KEYS, PREPARE_ONLY_KEYS, REPO_ROOT, SECTIONS
from mttl.run_folder import atomic_write_text

OUTPUT = REPO_ROOT / "docs" / "configuration.md"

INTRO = """\
# Configuration reference

Generated from the help texts in `mttl/config.py` by `python -m mttl.docs_gen`; do not edit by
hand (a test checks that this file matches the code).

Every training command (`mttl pretrain`, `finetune`, `evaluate`, `sweep`, and the `jobs/*.py`
entry points) reads one configuration, merged in this order:

1. the defaults below;
2. config files given with `-c a.json+b.json`, left to right (a name is looked up in the current
   folder's `configs/`, then the package's configs (`mttl/configs/`); `$CONFIG_PATH` first);
3. `-k key=value …` overrides, parsed as Python literals (`1e-3`, `True`, `20_000`, `"['cb','rte']"`).

`mttl configs` lists the ready-made files; `mttl configs -c FILE -k … --show` prints the merged
result. Path keys expand `~` and `$VARIABLES`. A key set by a file or `-k` counts as overridden:
fine-tuning takes architecture keys from the checkpoint's config unless you override them.
Unknown keys are an error that names the closest known key.

Keys are grouped in sections below. A config file may be flat (`{"learning_rate": 1e-3}`) or nest
keys under their section (`{"training": {"learning_rate": 1e-3}}`); `mttl configs --show` prints
the sectioned form, while run folders save config.json flat.
"""


def _code(value) -> str:
    return f"`{value!r}`" if not isinstance(value, str) else f"`{value}`"


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def _row(f, default) -> str:
    help_text = f.metadata.get("help", "")
    description, _, example = help_text.partition("Example: ")
    extras = []
    if f.metadata.get("choices"):
        extras.append("One of " + ", ".join(_code(c) for c in f.metadata["choices"]) + ".")
    if f.metadata.get("path"):
        extras.append("Path: `~` and `$VARS` expanded.")
    cells = [
        f"`{f.name}`",
        f"`{f.type}`",
        _code(default),
        f"`{f.metadata['env']}`" if f.metadata.get("env") else "",
        " ".join([description.strip(), *extras]),
        f"`{example.strip()}`" if example else "",
    ]
    # GitHub tables split on any unescaped pipe, even inside code spans (regexes, `str | None`).
    return "| " + " | ".join(_escape(cell) for cell in cells) + " |"


def render() -> str:
    out = [INTRO]
    out.append("## Sections\n")
    out += [f"- [{name}](#{name}): {(section.__doc__ or '').strip()}" for name, section in SECTIONS.items()]
    out.append("")
    for name, section in SECTIONS.items():
        out.append(f"## {name}\n")
        out.append(f"{(section.__doc__ or '').strip()}\n")
        out.append("| key | type | default | env var | meaning | example |")
        out.append("|---|---|---|---|---|---|")
        out += [_row(f, f.metadata["default"]) for f in fields(section)]
        out.append("")
    out.append("## Accepted aliases\n")
    out.append("The reference system's key names keep working; each is read as the current key.\n")
    out.append("| alias | read as |")
    out.append("|---|---|")
    for alias, target in sorted(ALIASES.items()):
        meaning = (f"`{target}`" if target
                   else "`router_granularity`: `True` → `finegrained`, `False` → `coarsegrained`")
        out.append(f"| `{alias}` | {meaning} |")
    out.append("")
    out.append("Values of `model_modifier`: " + ", ".join(
        f"`{name}` → {_code(value)}" for name, value in sorted(MODIFIER_ALIASES.items())) + ".\n")
    out.append("## Keys with no effect\n")
    out.append("Keys the reference's configs carry that never did anything there either. They are accepted "
               "with a warning and ignored, so the reference's config files load unchanged:\n")
    out.append(", ".join(f"`{key}`" for key in sorted(NO_EFFECT_KEYS)) + ".\n")
    out.append("## Keys of `mttl prepare`\n")
    out.append("Keys the reference read while it built its datasets. Here the data is prepared once into shards, "
               "so they are options of `mttl prepare` (the prompt format, the T0 task granularity and caps are "
               "then fixed in the shards); a config that sets one is refused with the option to use:\n")
    out.append("| key | `mttl prepare` option |")
    out.append("|---|---|")
    out += [f"| `{key}` | {_escape(option)} |" for key, option in sorted(PREPARE_ONLY_KEYS.items())]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mttl.docs_gen", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help=f"compare with {OUTPUT.relative_to(REPO_ROOT)} instead of writing it; "
                             "exit 1 when they differ")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.is_file() else ""
        if current != text:
            print(f"{OUTPUT.relative_to(REPO_ROOT)} is out of date; run `python -m mttl.docs_gen`", file=sys.stderr)
            return 1
        return 0
    atomic_write_text(OUTPUT, text)
    print(f"wrote {OUTPUT.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

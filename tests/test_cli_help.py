"""Every command's `--help` describes each option with an example, its examples name config files and
keys that exist and parse; mistakes a new user makes end in one line on stderr that names the
file/key and the fix, through the installed `mttl` console script."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mttl.cli import COMMANDS, build_parser, main
from mttl.config import ALIASES, Config, find_config_file

REPO = Path(__file__).resolve().parent.parent
# quickstart is written separately; its help is checked once the module exists
VERBS = [verb for verb, module in COMMANDS.items() if importlib.util.find_spec(module) is not None]


def _command_parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    """("mttl", top parser), ("mttl VERB", its parser) and ("mttl VERB SUB", nested ones, e.g. prepare ni)."""
    parsers = [("mttl", build_parser(only="__none__"))]
    for verb in VERBS:
        top = build_parser(only=verb)
        [verbs] = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)]
        todo = [(f"mttl {verb}", verbs.choices[verb])]
        while todo:
            name, parser = todo.pop()
            parsers.append((name, parser))
            for action in parser._actions:
                if isinstance(action, argparse._SubParsersAction):
                    todo += [(f"{name} {sub}", p) for sub, p in action.choices.items()]
    return parsers


PARSERS = _command_parsers()


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def _help_texts() -> list[str]:
    """Every description, epilog and option help of every command, and every config key's help."""
    texts = [t for _, p in PARSERS for t in (p.description, p.epilog) if t]
    texts += [a.help for _, p in PARSERS for a in _options(p) if a.help]
    texts += [f.metadata["help"] for f in dataclasses.fields(Config) if not f.name.startswith("_")]
    return texts


def _example_commands() -> list[list[str]]:
    """`mttl …` lines of the help texts, split as the shell would (comments dropped)."""
    commands = []
    for text in _help_texts():
        for match in re.finditer(r"(?:^\s*|Example: )(mttl [^\n]*)", text, re.MULTILINE):
            commands.append(shlex.split(match.group(1), comments=True))
    return commands


@pytest.mark.parametrize("name,parser", PARSERS, ids=[name for name, _ in PARSERS])
def test_every_option_says_what_it_does_with_an_example(name, parser):
    for action in _options(parser):
        label = "/".join(action.option_strings) or action.dest
        assert action.help and "Example" in action.help, f"`{name} --help`: {label} has no 'Example'"
        assert len(action.help.split("Example")[0].strip()) > 10, \
            f"`{name} --help`: {label} says nothing before its example"


@pytest.mark.parametrize("name,parser", PARSERS, ids=[name for name, _ in PARSERS])
def test_every_command_help_has_an_examples_block(name, parser, capsys):
    text = "\n".join(t for t in (parser.description, parser.epilog) if t)
    assert re.search(r"^Examples?:\n  mttl ", text, re.MULTILINE | re.IGNORECASE), f"`{name} --help` shows no examples"
    with pytest.raises(SystemExit) as done:
        main([*name.split()[1:], "--help"])
    assert done.value.code == 0
    assert "Example" in capsys.readouterr().out


def test_examples_name_config_files_and_keys_that_exist():
    config_keys = set(Config.field_names()) | set(ALIASES)
    spaces = {p.stem for p in (REPO / "tune_spaces").glob("*.py")}
    commands = _example_commands()
    assert len(commands) > 20
    option_examples = re.findall(r"Example: (-[ck] [^\n]*)", "\n".join(_help_texts()))
    for argv in commands + [shlex.split(line) for line in option_examples]:
        if "-c" in argv:
            for name in argv[argv.index("-c") + 1].split("+"):
                assert find_config_file(name).is_relative_to(REPO), f"-c {name} is not a shipped config"
        if "-k" not in argv:
            continue
        for pair in argv[argv.index("-k") + 1:]:
            if pair.startswith("-"):
                break
            key, _, value = pair.partition("=")
            assert key in config_keys, f"`{shlex.join(argv)}`: -k {key} is not a config key"
            if key == "tune_space":
                assert value in spaces, f"`{shlex.join(argv)}`: no tune_spaces/{value}.py"


def test_example_commands_parse():
    for argv in _example_commands():
        verb = next(a for a in argv[1:] if not a.startswith("-"))
        if verb not in VERBS:
            assert verb in COMMANDS, f"`{shlex.join(argv)}` names no command"
            continue
        try:
            build_parser(only=verb).parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"help example `{shlex.join(argv)}` does not parse")


# ------------------------------------------------------------------------- a new user's mistakes
MTTL = shutil.which("mttl", path=str(Path(sys.executable).parent)) or shutil.which("mttl")


def _mttl(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([MTTL, *args], cwd=cwd, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def newcomer(tmp_path_factory) -> Path:
    """A working folder with a malformed config, an empty folder and a folder that is not a run."""
    folder = tmp_path_factory.mktemp("newcomer")
    (folder / "mine.json").write_text('{"learning_rate": 1e-3,}\n')
    (folder / "empty").mkdir()
    (folder / "notes").mkdir()
    (folder / "notes" / "todo.txt").write_text("try MHR\n")
    return folder


MISTAKES = [
    (["configs", "-k", "learning_rat=1e-3"], ["learning_rat", "did you mean 'learning_rate'"]),
    (["configs", "-k", "n_skills=many"], ["n_skills", "must be int", "example: -k n_skills="]),
    (["configs", "-k", "model_modifier=polly"], ["model_modifier", "did you mean 'poly'"]),
    (["prepare", "nii", "--out", "shards"], ["invalid choice: 'nii'", "see `mttl prepare --help`"]),
    (["configs", "-c", "t0/finetune_xl.json"], ["t0/finetune_xl.json", "not found", "mttl configs"]),
    (["configs", "-c", "mine.json"], ["mine.json", "not valid JSON", "line 1", "fix the file"]),
    (["pretrain", "-k", "model=tiny-t5", "data_dir=shards/ni", "output_dir=out"],
     ["shards/ni", "manifest.json not found", "mttl prepare"]),
    (["finetune", "-k", "checkpoint=output/mhr_ni", "finetune_task_name=cb"],
     ["output/mhr_ni", "does not exist", "mttl pretrain"]),
    (["export", "notes", "--format", "peft", "--out", "exported"], ["notes", "not a run folder", "mttl pretrain"]),
    (["report", "empty", "--out", "report"], ["empty", "not a run folder", "metrics.jsonl"]),
    (["prepare", "ni", "--source", "/nonexistent/natural-instructions", "--out", "shards"],
     ["/nonexistent/natural-instructions", "--source", "natural-instructions checkout"]),
]


@pytest.mark.parametrize("args,names", MISTAKES, ids=[" ".join(a[:2]) for a, _ in MISTAKES])
def test_a_mistake_is_one_line_naming_it_and_the_fix(newcomer, args, names):
    assert MTTL, "the mttl console script is not installed (pip install -e .)"
    done = _mttl(args, newcomer)
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0
    assert len(lines) == 1 and re.match(r"mttl( \w+)*: error: ", lines[0]), done.stderr
    assert "Traceback" not in done.stderr
    for name in names:
        assert name in lines[0], f"`mttl {shlex.join(args)}`: {lines[0]!r} lacks {name!r}"

"""`mttl` command line: one sub-command per capability, each a thin module of this package
(`mttl.cli.<verb>`) that parses its arguments and calls the library.

This module is the dispatcher and the `mttl` console script (`main`). A command module exposes
`HELP` (one line), `add_arguments(parser)` and `run(args) -> int`.
Modules are imported lazily so `mttl --help` stays fast and a broken optional dependency only
affects its own command. User errors (`MttlError`) print as one line and exit 2; `--debug`
shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading

from mttl.errors import MttlError, interrupt_hint

# verb -> module implementing it
COMMANDS = {
    "prepare": "mttl.cli.prepare",
    "pretrain": "mttl.cli.pretrain",
    "finetune": "mttl.cli.finetune",
    "evaluate": "mttl.cli.evaluate",
    "sweep": "mttl.cli.sweep",
    "report": "mttl.cli.report",
    "export": "mttl.cli.export",
    "plan": "mttl.cli.plan",
    "quickstart": "mttl.cli.quickstart",
    "configs": "mttl.cli.configs",
}


EPILOG = """\
Run `mttl COMMAND --help` for the options and examples of a command.

Examples:
  mttl quickstart                                     # the whole pipeline on the synthetic suite
  mttl pretrain                                       # pre-train Poly adapters on the synthetic suite
  mttl evaluate -k checkpoint=output/synthetic_poly   # score it on the held-out tasks, no training
  mttl report output/synthetic_poly --out report
  mttl configs                                        # the ready-made config files for -c
"""


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The `-c a.json+b.json -k key=value …` pair shared by every training command."""
    parser.add_argument("-c", "--config", dest="config_files", default=None, metavar="A.json+B.json",
                        help="JSON config files merged left to right (later files win); a name that is not a "
                             "path is looked up in ./configs/ and the package's configs (mttl/configs/) "
                             "(`mttl configs` lists them). Example: -c ni/pretrain.json+ni/mhr.json")
    parser.add_argument("-k", "--kwargs", dest="kwargs", nargs="+", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="config keys to set, after the -c files; values are Python literals (quote lists "
                             "for the shell); every key is described in docs/configuration.md. "
                             "Example: -k learning_rate=1e-3 n_splits=16 seeds=\"[13, 42]\"")


def flat_kwargs(args: argparse.Namespace) -> list[str]:
    return [pair for group in (args.kwargs or []) for pair in group]


def _available_commands() -> dict[str, str]:
    out = {}
    for verb, module in COMMANDS.items():
        spec = importlib.util.find_spec(module)
        if spec is not None:
            out[verb] = module
    return out


class OneLineErrorParser(argparse.ArgumentParser):
    """Usage mistakes print as one line pointing at the command's --help, like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def build_parser(load_all: bool = True, only: str | None = None) -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="mttl",
        description="Multi-task transfer learning with routed adapters (LoRA, (IA)3, Poly, MHR) on Ray.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_debug(parser, "mttl --debug configs -c ni/mhr.json")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for verb, module_name in _available_commands().items():
        if only is not None and verb != only:
            # Cheap placeholder: still listed in --help, options loaded only when used.
            sub.add_parser(verb, help=_module_help(module_name), add_help=False)
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(verb, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        if "--debug" not in p._option_string_actions:
            _add_debug(p, "--debug")
        p.set_defaults(_run=module.run)
    return parser


def _add_debug(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of its one-line message "
                             f"(or set MTTL_DEBUG=1). Example: {example}")


def _module_help(module_name: str) -> str:
    import ast as _ast
    spec = importlib.util.find_spec(module_name)
    try:
        tree = _ast.parse(open(spec.origin).read())
        for node in tree.body:
            if isinstance(node, _ast.Assign) and any(getattr(t, "id", None) == "HELP" for t in node.targets):
                return _ast.literal_eval(node.value)
    except Exception:  # help text only; never fail the listing
        pass
    return ""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = next((a for a in argv if not a.startswith("-")), None)
    debug = "--debug" in argv or os.environ.get("MTTL_DEBUG") == "1"
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
    ray_was_connected = _ray_connected()  # a caller's own Ray session (a notebook, a test) is left alone
    try:
        parser = build_parser(only=verb if verb in COMMANDS else "__none__")
        args = parser.parse_args(argv)
        if not getattr(args, "command", None):
            parser.print_help()
            return 0
        return int(args._run(args) or 0)
    except MttlError as err:
        if debug:
            raise
        if not ray_was_connected:
            _disconnect_ray()
        print(f"mttl: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        left = ray_was_connected or _disconnect_ray()
        code = getattr(stop, "exit_code", 130)
        print(f"mttl: {getattr(stop, 'reason', 'interrupted')}; {interrupt_hint()}", file=sys.stderr)
        if not left:
            # Ray's shutdown is stuck (the run's thread inside a Ray call): its exit hooks would wait the
            # same way, and the run would go on training. End the process; Ray's local processes share
            # its fate, a joined cluster ends this driver's actors when its connection drops.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code


def _ray_connected() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


# How long an interrupted command waits for Ray's shutdown. It takes 1-3 s; once, under a loaded CI
# machine, it never returned and the interrupted run trained on for the 90 s the test waited.
RAY_SHUTDOWN_WAIT_S = 30.0


def _disconnect_ray(wait_s: float = RAY_SHUTDOWN_WAIT_S) -> bool:
    """Leave Ray before the closing line, so no worker log line streamed by the driver follows it.

    The shutdown runs on a thread and is waited for at most `wait_s`; returns whether it finished.
    A second Ctrl-C while disconnecting is ignored: the line still comes, and the exit code."""
    if not _ray_connected():
        return True
    finished = threading.Event()

    def shutdown():
        try:
            sys.modules["ray"].shutdown()
        except Exception:  # the command is ending either way
            pass
        finally:
            finished.set()

    threading.Thread(target=shutdown, name="mttl-ray-shutdown", daemon=True).start()
    try:
        return finished.wait(wait_s)
    except KeyboardInterrupt:
        return finished.wait(wait_s)


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C (a batch scheduler or `kill` stopping the command)."""

    reason = "terminated"
    exit_code = 143


def _raise_terminated(signum, frame):
    raise Terminated()


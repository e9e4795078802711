"""What reaches the terminal: mttl's own `[mttl]` progress lines, warnings and results.

Ray (its driver-side loggers and every line its workers, actors and Ray Data print), DeepSpeed
and Hugging Face write a great deal that matters only when something goes wrong. Unless
`verbose=True`, those lines go to one log file of the run (`<run folder>/logs/internal.log`, or
`<output_dir>/logs/internal-<pid>.log` for a command without a run folder yet) and the console
keeps the lines mttl prints itself. Worker lines that carry `[mttl]` (a training worker's
progress) are shown without Ray's `(RayTrainWorker pid=…)` prefix.

Ray forwards worker output to the driver through a dispatcher whose handler writes to
`sys.stdout` / `sys.stderr`; `route_worker_output` swaps that handler after `ray.init` (Ray 2.60
keeps it in `ray._private.ray_logging.global_worker_stdstream_dispatcher` under the name
`ray_print_logs`; where that name is missing the console is simply left as Ray made it).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import threading
from pathlib import Path

from mttl.run_folder import LOGS_DIR

# where a worker's line starts to be ours (the quick start's Ray tasks report with their own tag)
MARKS = ("[mttl]", "[quickstart")
# driver-side loggers whose console handlers move to the log file
LIBRARY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "DeepSpeed", "transformers", "datasets")
_RAY_HANDLER = "ray_print_logs"
_state: dict = {"path": None, "file": None, "lock": threading.Lock()}


def log_path() -> Path | None:
    """The file internal logs go to in this process, None while they still go to the console."""
    return _state["path"]


def default_log_path(output_dir: str | os.PathLike, run_dir: str | os.PathLike | None = None) -> Path:
    if run_dir is not None:
        return Path(run_dir) / LOGS_DIR / "internal.log"
    return Path(output_dir) / LOGS_DIR / f"internal-{os.getpid()}.log"


def send_internal_logs_to(path: str | os.PathLike, *, verbose: bool = False) -> Path | None:
    """Route library loggers (now) and Ray worker output (after `ray.init`) to `path`.

    Returns the file, or None when `verbose` keeps everything on the console. Calling it again with
    another path (a command that learns its run folder later) moves the routing there.
    """
    if verbose:
        return None
    path = Path(path)
    with _state["lock"]:
        if _state["path"] != path:
            path.parent.mkdir(parents=True, exist_ok=True)
            if _state["file"] is not None:
                _state["file"].close()
            _state["file"] = open(path, "a", encoding="utf-8", buffering=1)
            _state["path"] = path
    _quiet_library_loggers()
    _quiet_hugging_face_bars()
    route_worker_output()
    return path


@contextlib.contextmanager
def library_prints_to_log():
    """Inside, what libraries `print` to stdout goes to the log file: Ray Tune prints its experiment
    box, result paths and TensorBoard hint whatever its `verbose`. mttl's own lines use `ours()`.
    With `verbose=True` (no log file) nothing moves."""
    if _state["file"] is None:
        yield
        return
    _state["console"] = sys.stdout
    try:
        with contextlib.redirect_stdout(_LogStream()):
            yield
    finally:
        _state["console"] = None


def ours():
    """The stream mttl's own console lines go to (stdout, also inside `library_prints_to_log`)."""
    return _state.get("console") or sys.stdout


class _LogStream(io.TextIOBase):
    """A text stream writing into the current log file."""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with _state["lock"]:
            handle = _state["file"]
            if handle is not None and not handle.closed:
                handle.write(text)
        return len(text)


def to_log(text: str) -> bool:
    """Append `text` (a traceback a one-line error left out) to the log file; False when there is none."""
    if _state["file"] is None:
        return False
    _write(text)
    return True


def _write(text: str) -> None:
    with _state["lock"]:
        handle = _state["file"]
        if handle is not None and not handle.closed:
            handle.write(text if text.endswith("\n") else text + "\n")


class _FileHandler(logging.Handler):
    """Writes records to the current log file (follows `send_internal_logs_to` when it moves)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _write(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never break the command
            self.handleError(record)


def _is_console(handler: logging.Handler) -> bool:
    stream = getattr(handler, "stream", None)
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) and \
        stream in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)


def _quiet_library_loggers() -> None:
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.get_logger()  # transformers adds its console handler on first use: add it now to move it
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        consoles = [h for h in logger.handlers if _is_console(h)]
        if not consoles and not any(isinstance(h, _FileHandler) for h in logger.handlers):
            continue  # propagates to a parent handled here, or logs nowhere visible
        for handler in consoles:
            logger.removeHandler(handler)
        if not any(isinstance(h, _FileHandler) for h in logger.handlers):
            handler = _FileHandler(logging.INFO)  # Ray Data's DEBUG chatter stays out
            handler.setFormatter(formatter)
            logger.addHandler(handler)


def hide_progress_bars(verbose: bool = False) -> None:
    """Keep transformers' weight-loading and the hub's download bars off the console (a command that
    prints its own progress lines and has no log file yet), unless `verbose`."""
    if verbose:
        return
    from transformers.utils import logging as hf_logging  # imported here: it may not be loaded yet

    hf_logging.disable_progress_bar()
    _quiet_hugging_face_bars()


def _quiet_hugging_face_bars() -> None:
    """Weight-loading and download bars would otherwise draw on the terminal."""
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def worker_line_for_console(line: str) -> str | None:
    """The part of a worker's line the console shows (from its `[mttl]` tag on), or None."""
    found = [at for at in (line.find(mark) for mark in MARKS) if at >= 0]
    return line[min(found):] if found else None


def _handle_worker_output(data: dict) -> None:
    source = data.get("actor_name") or data.get("task_name") or ""
    label = f"({source} pid={data.get('pid')}) " if source or data.get("pid") else ""
    for line in data.get("lines") or []:
        _write(label + line)
        shown = worker_line_for_console(line)
        if shown is not None:
            print(shown, file=sys.stdout, flush=True)


def route_worker_output() -> bool:
    """Swap Ray's print-to-terminal handler for ours (once Ray is initialized); True when done."""
    if _state["path"] is None or "ray" not in sys.modules:
        return False
    import ray

    if not ray.is_initialized():
        return False
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    names = [name for name, _ in getattr(dispatcher, "handlers", [])]
    if _RAY_HANDLER not in names:
        return False
    if any(handler is _handle_worker_output for _, handler in dispatcher.handlers):
        return True
    dispatcher.remove_handler(_RAY_HANDLER)
    dispatcher.add_handler(_RAY_HANDLER, _handle_worker_output)
    return True

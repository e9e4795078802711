"""User-facing errors.

Anything the user can fix (a bad key, a missing file, a malformed task) is raised as a
`MttlError` subclass with a one-line message that names the file/key/task and says what to do.
The CLI prints it as one line and exits non-zero; everything else is a bug and keeps its traceback.
"""


class MttlError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


class ConfigError(MttlError):
    """Bad configuration: unknown key, unreadable config file, invalid value."""


class DataError(MttlError):
    """Bad input data: malformed task files, missing tasks, corrupt shards, manifest mismatch."""


class CheckpointError(MttlError):
    """A checkpoint or run folder that cannot be used as asked (missing, mismatched config)."""


# What an interrupted command keeps and how to pick it up again; commands set it as they go, the
# CLI prints it when Ctrl-C or SIGTERM stops them.
_interrupt_hint = ["nothing was written"]


def set_interrupt_hint(text: str) -> None:
    _interrupt_hint[0] = text


def interrupt_hint() -> str:
    return _interrupt_hint[0]

"""Output folders named on the command line (`--out`): checked before anything is read or written.

`mttl prepare`, `mttl report` and `mttl export` build their output beside `--out` and rename it
into place, so an `--out` whose parent is a file, or that names no folder of its own (`x/..`,
`.`, `/`), would otherwise fail half-way with an OS error. `check_out_dir` turns those into a
one-line `ConfigError` naming the flag and what to give instead.
"""

from __future__ import annotations

import os
from pathlib import Path

from mttl.errors import ConfigError


def check_out_dir(out: str | os.PathLike, *, flag: str = "--out", example: str = "--out reports/run1") -> Path:
    """`out` as a Path (`~` expanded) when it can become a folder of its own; ConfigError otherwise.

    An existing folder is accepted: whether its contents may be replaced is each command's call.
    """
    raw = str(out)
    path = Path(os.path.expanduser(raw))
    # "x/.." and "." name another folder (or the current one) without a name of their own: the
    # staging folder beside it could not be renamed onto it, and a whole-folder replace would hit
    # a folder the user did not name.
    if not raw.strip() or path.name in ("", ".", ".."):
        raise ConfigError(f"{flag} '{raw}' must end in a new or existing folder's own name (not '.', '..' or '/'); "
                          f"example: {example}")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{flag} '{raw}': '{parent}' is a file, not a folder, so nothing can be created "
                                  f"under it; choose another {flag}, e.g. {example}")
            break
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} '{raw}' is a file; give a folder, e.g. {example}")
    return path

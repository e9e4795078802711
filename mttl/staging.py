"""Temporary folders built beside an output and renamed onto it: their names, and the removal of
those whose process is gone.

`mttl prepare` and `mttl export` build their output in `.<out>.tmp-<host>-<pid>-<random>` next to
`<out>` (and `mttl prepare` moves a replaced output aside into `.<out>.old-…`). A process killed
with SIGKILL, or an out-of-memory kill, cannot remove its folder, so the next command writing the
same `<out>` removes every such folder whose owner is gone: made on this host by a process that
no longer runs. Folders of other hosts (an output on shared storage) are left alone, as their
processes cannot be checked from here.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path

KINDS = ("tmp", "old")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def make_staging(out: Path, kind: str = "tmp") -> Path:
    """A new empty folder beside `out`, named after this host and process (mode 0755)."""
    folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-{_host()}-{os.getpid()}-", dir=out.parent))
    folder.chmod(0o755)  # mkdtemp makes it owner-only; what is renamed out of it is an ordinary folder
    return folder


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_staging(out: str | os.PathLike) -> list[Path]:
    """Remove the staging folders beside `out` left by processes of this host that no longer run;
    says so in one line on stderr. Returns the folders removed."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(?:{'|'.join(KINDS)})-(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-"
                         r"[A-Za-z0-9_]+")
    removed = []
    for path in sorted(out.parent.iterdir()):
        match = pattern.fullmatch(path.name)
        if not match or match["host"] != _host() or not path.is_dir() or path.is_symlink():
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or _running(pid):
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(path)
    if removed:
        names = ", ".join(p.name for p in removed)
        print(f"[mttl] removed {len(removed)} temporary folder(s) beside {out} left by processes that no longer run "
              f"(killed before they finished): {names}", file=sys.stderr)
    return removed

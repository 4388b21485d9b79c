"""Hidden temporary names that say which process writes them, so a later run can remove what a killed one left.

Every output is written under a temporary name and renamed when complete. A process killed with ``kill -9`` (or a
power cut) cannot clean up, so its temporaries carry ``<host>-<pid>``: a later run on the same host removes those
whose process is gone, and never touches those of a process still running (another import or prediction into the
same folder).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path

HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"
KINDS = ("tmp", "importing", "replaced")
TAG = re.compile(rf"\.(?:{'|'.join(KINDS)})-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)(?:[.-]|$)")


def owner_tag(kind: str = "tmp") -> str:
    """``<kind>-<host>-<pid>`` of this process (``kind`` is one of :data:`KINDS`)."""
    return f"{kind}-{HOST}-{os.getpid()}"


def temp_path(final: Path, ending: str = "") -> Path:
    """A hidden sibling of ``final`` owned by this process; ``ending`` keeps a writer's format choice
    (``.nii.gz`` for ITK)."""
    final = Path(final)
    return final.with_name(f".{final.name}.{owner_tag()}{ending}")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def left_by_dead_process(name: str) -> bool:
    """Whether a hidden name carries the tag of a process on this host that no longer runs."""
    match = TAG.search(name) if name.startswith(".") else None
    return bool(match and match["host"] == HOST and not process_alive(int(match["pid"])))


def remove_stale(folder: Path) -> list[Path]:
    """Remove the temporaries (files or folders) that dead processes of this host left in ``folder``."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if left_by_dead_process(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed

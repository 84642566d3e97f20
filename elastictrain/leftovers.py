"""What a process of ours leaves behind if it is killed, and how the next one cleans it up.

Children die with their parent: :func:`die_with_parent` wraps a command so that the kernel
kills it when the process that started it dies (``PR_SET_PDEATHSIG``; it survives ``exec``).
Files that outlive a killed agent (shared-memory segments, an embedded etcd's data directory)
carry their owner's pid in their name (:func:`owned_name`); :func:`sweep` removes those of
this user whose owner is gone. Decisions are pure (:func:`stale`); the sweep only unlinks.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable

logger = logging.getLogger(__name__)

# PR_SET_PDEATHSIG = 1: the kernel sends SIGKILL to this process when its parent thread exits.
# It survives execve, so the real program inherits it. If the parent is already gone, exit.
DIE_WITH_PARENT = (
    "import ctypes,os,sys\n"
    "ctypes.CDLL(None,use_errno=True).prctl(1,9)\n"
    "os.getppid()==int(sys.argv[1]) or os._exit(137)\n"
)
_EXEC = "os.execvp(sys.argv[2],sys.argv[2:])\n"
_OWNED = re.compile(r"^etrain-.*-p(\d+)-[^/]*$")


def die_with_parent(command: list[str], before_exec: str = "") -> list[str]:
    """``command`` wrapped so that it is killed when the calling process dies; ``before_exec``
    is Python run in the wrapper first (Linux only: elsewhere ``command`` as is)."""
    if not sys.platform.startswith("linux"):
        return command
    return [sys.executable, "-c", DIE_WITH_PARENT + before_exec + _EXEC, str(os.getpid()),
            *command]  # fmt: skip


def owned_name(prefix: str, pid: int | None = None) -> str:
    """``etrain-<prefix>-p<pid>``: a name :func:`sweep` knows the owner of."""
    return f"etrain-{prefix}-p{os.getpid() if pid is None else pid}"


def owner_of(name: str) -> int | None:
    match = _OWNED.match(name)
    return int(match.group(1)) if match else None


def stale(names: Iterable[str], alive: Callable[[int], bool]) -> list[str]:
    """The names whose owner is known and not alive (pure)."""
    out = []
    for name in names:
        pid = owner_of(name)
        if pid is not None and not alive(pid):
            out.append(name)
    return out


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(directory: str) -> list[str]:
    """Remove this user's leftovers in ``directory`` whose owner is dead; returns their names."""
    try:
        entries = {entry.name: entry for entry in os.scandir(directory)}
    except OSError:
        return []
    removed = []
    for name in stale(entries, pid_alive):
        entry = entries[name]
        try:
            if entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(name)
        except OSError as exc:
            logger.debug("leftover %s not removed: %s", entry.path, exc)
    if removed:
        logger.info("removed %d leftover(s) of dead processes in %s", len(removed), directory)
    return removed

"""Temporary files that are renamed into place, and the ones a killed process left behind.

A file that readers may hold open (an FFCV ``.beton`` memory-mapped by running jobs, a cached
feature file another job loads) is written under a temporary name in its own folder and
``os.replace``d over the old one when complete: readers see the old file or the new one,
whole, and a reader's mmap of the old one stays valid (the old inode lives on until the last
reader closes it; truncating it in place makes their next page fault a SIGBUS).

A kill (SIGKILL, a node lost, the OOM killer) between the write and the rename leaves the
temporary behind, possibly gigabytes of it. Its name says who wrote it,
``.<name>.tmp-<host>-<pid>``, so that the next process to open the folder can tell a dead
writer's file from a live one's: on the same host by the pid, on another host (a shared
filesystem) only by age, because that host's pids cannot be looked up from here.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import time
from pathlib import Path

# ``.<name>.tmp-<host>-<pid>``, and the older ``.<name>.tmp<pid>`` (no host) of earlier versions
_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp(?:-(?P<host>.+)-)?(?P<pid>\d+)$")
# a temporary untouched this long, and older than the process looking, is an orphan wherever its
# writer ran: writers keep appending (a write bumps the mtime) until the rename
IDLE_S = 60.0
# when this process started (imported at a job's start: the time "older than the job" is against)
STARTED = time.time()


def temp_name(path: Path) -> Path:
    """The temporary name of ``path`` for this process: same folder (``os.replace`` must not
    cross filesystems), hidden, owned by this host and pid."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (another user's counts: EPERM)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(path: Path, started: float = STARTED, now: float | None = None) -> bool:
    """Whether ``path``, a temporary of ``temp_name``'s form, was left by a writer that is gone:
    written on this host by a pid that no longer lives, or (a file written on another host, or
    of the older name without one) last written before ``started`` and not for ``IDLE_S``
    seconds. A live pid's temporaries on this host, this process's own among them, are kept."""
    m = _TEMP.match(path.name)
    if m is None:
        return False
    pid, host = int(m["pid"]), m["host"]
    if host == socket.gethostname():           # its writer's fate is known here
        return pid != os.getpid() and not pid_alive(pid)
    try:
        st = path.lstat()
    except FileNotFoundError:          # its writer renamed or removed it meanwhile
        return False
    if stat.S_ISDIR(st.st_mode):       # a folder's mtime moves only with its own entries, not
        return False                   # with writes deeper down: age says nothing of its writer
    mtime = st.st_mtime
    now = time.time() if now is None else now
    return mtime < started and now - mtime >= IDLE_S


def remove_stale(folder: Path, started: float = STARTED) -> list[Path]:
    """Delete the stale temporaries (``is_stale``: files, or staging folders of a whole
    output) directly in ``folder``; returns them."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return removed
    for entry in entries:
        path = Path(entry.path)
        if entry.name.startswith(".") and is_stale(path, started):
            try:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(path)
                else:
                    path.unlink()
                removed.append(path)
            except FileNotFoundError:
                pass
    return removed


def replace_whole(new: Path, target: Path) -> None:
    """``new`` (a file or a folder, in ``target``'s folder) takes ``target``'s name. What
    ``target`` was (a link: never what it points at; a file; a folder) is first moved aside
    under a temporary name, then removed: a kill leaves either the old ``target`` whole or a
    leftover that the next ``remove_stale`` of the folder deletes, never a half-deleted one."""
    new, target = Path(new), Path(target)
    old = temp_name(target.with_name(target.name + "-old"))
    if target.is_symlink() or target.exists():
        os.replace(target, old)
    os.replace(new, target)
    if old.is_symlink() or old.is_file():
        old.unlink()
    elif old.exists():
        shutil.rmtree(old)

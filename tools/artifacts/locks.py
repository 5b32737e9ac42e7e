"""One writer per artifact: an advisory lock beside a model tag or a prediction folder.

The lock is ``fcntl.flock`` on a small file that names its holder (host, pid, command, start time).
The kernel drops it when the holding process ends, however it ends (a kill -9 included), so a killed run
never leaves a lock that blocks the next one; a second writer stops at once with one line naming the
first's host and pid. The file itself stays (an unlocked file means nothing). Locks are advisory: they
order this project's writers, on file systems whose ``flock`` works across the processes involved (local
disks; NFS v4 and Lustre mount options decide for cluster file systems).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tools.artifacts.files import ArtifactError

LOCK_SUFFIX = ".lock"
_HELD: dict[Path, int] = {}  # lock path -> the descriptor holding it, until this process ends


def holder_description() -> dict[str, object]:
    """Who holds a lock: host, pid, the command and when it started."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "command": " ".join(sys.argv),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def acquire(lock_path: Path, what: str) -> int:
    """Lock ``lock_path`` and write the holder into it; returns the descriptor that holds the lock (closing it
    releases it). Another holder is an ``ArtifactError`` naming it and ``what`` it is writing."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    handle = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(handle)
        raise ArtifactError(f"{lock_path}: {what} is being written by another run ({_holder(lock_path)}); "
                            "wait for it to end or stop it, or write to another tag / folder") from None
    os.ftruncate(handle, 0)
    os.write(handle, (json.dumps(holder_description()) + "\n").encode())
    return handle


@contextmanager
def exclusive_writer(lock_path: Path, what: str) -> Iterator[None]:
    """Hold the lock of ``lock_path`` for the block (``acquire``)."""
    handle = acquire(lock_path, what)
    try:
        yield
    finally:
        os.close(handle)  # releases the lock


def _holder(lock_path: Path) -> str:
    """``host H, pid P, since T: command`` of the lock's holder, as far as its file tells."""
    try:
        holder = json.loads(lock_path.read_text())
        return f"host {holder['host']}, pid {holder['pid']}, since {holder['since']}: {holder['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def hold_until_exit(lock_path: Path, what: str) -> None:
    """Take the lock of ``lock_path`` for the rest of this process (a stage writes until it ends); taking it
    again in the same process is a no-op, so a process may claim its own artifact twice."""
    lock_path = Path(lock_path).resolve()
    if lock_path not in _HELD:
        _HELD[lock_path] = acquire(lock_path, what)


def _drop_inherited_locks() -> None:
    """In a forked child (DataLoader or pool workers): close the lock descriptors it inherited, so the lock
    stays its writer's alone and dies with it, not with the last of its workers."""
    for handle in _HELD.values():
        os.close(handle)
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)

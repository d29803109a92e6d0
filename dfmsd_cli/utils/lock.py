"""Advisory lock files: who holds them, whether that holder is gone, and a one-file lock.

A lock is a small JSON file created with ``O_CREAT | O_EXCL`` (atomic on local file systems
and NFSv3+) that records the holder's host, pid and process start time. A lock whose holder
ran on THIS host and is gone (no such pid, a zombie, or a pid reused by a younger process) is
stale and taken over silently, so a process killed with SIGKILL never blocks the next one on
the same machine; a lock from another host cannot be checked, so the refusal names the file to
delete if that process is known to be dead.

Used by the store's writer locks (``store.lock``: one ``precompute`` per image range) and by
run folders (``engine.rundir.run_lock``: one ``train``/``distill`` per ``--out``).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dfmsd_cli.errors import UserError

# an unreadable lock younger than this is being written by its creator right now
FRESH_SECONDS = 10.0


def start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux ``/proc``), or None where unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else fields[19]  # state, ..., starttime (field 22)


def holder_record(**extra: Any) -> dict[str, Any]:
    """This process as a lock holder: host, pid, start time, now, plus ``extra``."""
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "start": start_time(pid),
        **extra,
        "time": time.time(),
    }


def alive(holder: dict[str, Any]) -> bool:
    """False only when the holder certainly ran on this host and is gone."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    if Path("/proc").is_dir():
        started = start_time(pid)
        if started is None:  # a zombie (killed, not yet reaped) or vanished just now
            return False
        if holder.get("start") and holder["start"] != started:
            return False  # the pid was reused by another process
    return True


def read_holder(path: Path) -> dict[str, Any] | None:
    """The holder recorded in ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def describe(holder: dict[str, Any] | None, path: Path) -> str:
    """``pid P on host H (..., since T; lock file F)`` for a refusal message."""
    if not holder:
        return f"another process (lock file {path})"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("time", 0)))
    shard = f"shard {holder['shard']}, " if holder.get("shard") is not None else ""
    return (
        f"pid {holder.get('pid')} on host {holder.get('host')} ({shard}"
        f"since {since}; lock file {path})"
    )


def blocks(path: Path, holder: dict[str, Any] | None) -> bool:
    """True when the lock at ``path`` (holding ``holder``) must be respected, not taken over."""
    if holder is not None:
        return alive(holder)
    try:  # unreadable: respect it only while its creator may still be writing it
        return time.time() - path.stat().st_mtime < FRESH_SECONDS
    except OSError:
        return False


def remove_if_held_by(path: Path, holder: dict[str, Any] | None) -> None:
    """Remove the lock ``path`` if it still holds ``holder``: our own lock on release, or a
    stale one being taken over (not after someone else took it over meanwhile)."""
    if read_holder(path) == holder:
        path.unlink(missing_ok=True)


def create(path: Path, record: dict[str, Any]) -> bool:
    """Create the lock file ``path`` holding ``record``; False when it already exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
    except BaseException:  # e.g. a full disk: leave no half-written lock behind
        path.unlink(missing_ok=True)
        raise
    return True


@contextmanager
def file_lock(path: str | os.PathLike, what: str, hint: str) -> Iterator[Path]:
    """Hold the lock file ``path`` for the duration of the block.

    A live holder makes this raise ``UserError("{what} is in use by {holder}: {hint}")``;
    a stale one (see the module docstring) is taken over.
    """
    path = Path(path)
    me = holder_record()
    for _ in range(2):  # a second try after taking a stale lock over
        if create(path, me):
            break
        holder = read_holder(path)
        if blocks(path, holder):
            raise UserError(f"{what} is in use by {describe(holder, path)}: {hint}")
        remove_if_held_by(path, holder)
    else:
        raise UserError(f"{what} is in use by {describe(read_holder(path), path)}: {hint}")
    try:
        yield path
    finally:
        remove_if_held_by(path, me)

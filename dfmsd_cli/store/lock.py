"""Advisory writer locks: one ``precompute`` process per (store, image range).

A lock is a small JSON file beside the store, ``CACHE/TEACHER/.SPLIT.zarr.lock-START-STOP``,
created with ``O_CREAT | O_EXCL`` (atomic on local file systems and NFSv3+) and holding the
holder's host, pid, process start time and shard. Its range is the block-aligned image range
[START, STOP) that the process writes, so distinct shards (``--shard I/N``, torchrun ranks)
hold disjoint ranges and run side by side, while a second process on an overlapping range is
refused with the holder's host and pid (exit 2).

Stale locks: a lock whose holder ran on THIS host and is gone (no such pid, a zombie, or a
pid reused by a younger process) is taken over silently; a lock from another host cannot be
checked, so the message names the file to delete if that process is known to be dead. A run
killed with SIGKILL therefore never blocks the next run on the same machine.

Remote (fsspec URL) stores are not locked: object stores have no exclusive create.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dfmsd_cli.errors import UserError

_PREFIX = ".{name}.lock-"


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux ``/proc``), or None where unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else fields[19]  # state, ..., starttime (field 22)


def _alive(holder: dict) -> bool:
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
        started = _start_time(pid)
        if started is None:  # a zombie (killed, not yet reaped) or vanished just now
            return False
        if holder.get("start") and holder["start"] != started:
            return False  # the pid was reused by another process
    return True


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _describe(holder: dict | None, path: Path) -> str:
    if not holder:
        return f"another process (lock file {path})"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("time", 0)))
    return (
        f"pid {holder.get('pid')} on host {holder.get('host')} (shard {holder.get('shard')}, "
        f"since {since}; lock file {path})"
    )


def _overlapping(store: Path, start: int, stop: int) -> Iterator[Path]:
    prefix = _PREFIX.format(name=store.name)
    if not store.parent.is_dir():
        return
    for p in store.parent.iterdir():
        if not p.name.startswith(prefix):
            continue
        try:
            a, b = (int(x) for x in p.name[len(prefix) :].split("-"))
        except ValueError:
            continue
        if a < stop and start < b:
            yield p


def _refuse(store: Path, path: Path, holder: dict | None) -> UserError:
    return UserError(
        f"store {store} is being written by {_describe(holder, path)}: wait for it to finish, "
        "or precompute another --shard I/N side by side; if that process is gone, delete the "
        "lock file"
    )


@contextmanager
def store_lock(
    store: str | os.PathLike, start: int, stop: int, shard: str
) -> Iterator[Path | None]:
    """Hold the writer lock of images [start, stop) of ``store`` for the duration of the block.

    Raises ``UserError`` naming the holder when a live process holds an overlapping range.
    An fsspec URL store is not locked.
    """
    if "://" in str(store):
        yield None
        return
    store = Path(store)
    store.parent.mkdir(parents=True, exist_ok=True)
    mine = store.parent / f"{_PREFIX.format(name=store.name)}{start}-{stop}"
    me = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start": _start_time(os.getpid()),
        "shard": shard,
        "range": [start, stop],
        "time": time.time(),
    }
    for other in list(_overlapping(store, start, stop)):
        holder = _read(other)
        if holder is not None and _alive(holder):
            raise _refuse(store, other, holder)
        if holder is None and time.time() - _mtime(other) < 10:
            raise _refuse(store, other, None)  # being written right now by its creator
        _take_over(other, holder)
    try:
        fd = os.open(mine, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:  # another process won the race for this very range
        raise _refuse(store, mine, _read(mine)) from None
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
    except BaseException:  # e.g. a full disk: leave no half-written lock behind
        mine.unlink(missing_ok=True)
        raise
    try:
        rivals = [p for p in _overlapping(store, start, stop) if p != mine]
        if rivals:  # a different but overlapping range appeared meanwhile: both give way
            raise _refuse(store, rivals[0], _read(rivals[0]))
        yield mine
    finally:
        if _read(mine) == me:
            mine.unlink(missing_ok=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _take_over(path: Path, holder: dict | None) -> None:
    """Remove a stale lock, unless it changed since we read it (someone else took it over)."""
    if _read(path) == holder:
        path.unlink(missing_ok=True)

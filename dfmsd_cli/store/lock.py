"""Advisory writer locks: one ``precompute`` process per (store, image range).

A lock is a small JSON file beside the store, ``CACHE/TEACHER/.SPLIT.zarr.lock-START-STOP``,
created with ``O_CREAT | O_EXCL`` (atomic on local file systems and NFSv3+) and holding the
holder's host, pid, process start time and shard. Its range is the block-aligned image range
[START, STOP) that the process writes, so distinct shards (``--shard I/N``, torchrun ranks)
hold disjoint ranges and run side by side, while a second process on an overlapping range is
refused with the holder's host and pid (exit 2).

Stale locks (the holder ran on this host and is gone) are taken over silently, by the rules
of ``utils.lock``: a run killed with SIGKILL never blocks the next run on the same machine.

Remote (fsspec URL) stores are not locked: object stores have no exclusive create.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dfmsd_cli.errors import UserError
from dfmsd_cli.utils import lock

_PREFIX = ".{name}.lock-"


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
        f"store {store} is being written by {lock.describe(holder, path)}: wait for it to "
        "finish, or precompute another --shard I/N side by side; if that process is gone, "
        "delete the lock file"
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
    me = lock.holder_record(shard=shard, range=[start, stop])
    for other in list(_overlapping(store, start, stop)):
        holder = lock.read_holder(other)
        if lock.blocks(other, holder):
            raise _refuse(store, other, holder)
        lock.remove_if_held_by(other, holder)
    if not lock.create(mine, me):  # another process won the race for this very range
        raise _refuse(store, mine, lock.read_holder(mine))
    try:
        rivals = [p for p in _overlapping(store, start, stop) if p != mine]
        if rivals:  # a different but overlapping range appeared meanwhile: both give way
            raise _refuse(store, rivals[0], lock.read_holder(rivals[0]))
        yield mine
    finally:
        lock.remove_if_held_by(mine, me)

"""User-facing errors: one line that names the problem and the fix; the CLI exits with code 2."""

from __future__ import annotations

import difflib
import errno
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dfmsd_cli.utils.fmt import format_bytes


class UserError(Exception):
    """A mistake in the user's input (options, files, data). Printed as one line, exit code 2."""


_WORKER_PREFIX = "dfmsd_cli.errors.UserError: "


def one_line(exc: BaseException) -> str:
    """The user-facing line of ``exc``.

    A ``UserError`` raised inside a DataLoader worker reaches the main process re-raised by
    PyTorch with its message replaced by "Caught UserError in DataLoader worker process N" plus
    the worker's traceback; the original message is the traceback's last line.
    """
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith(_WORKER_PREFIX):
            return ln[len(_WORKER_PREFIX) :] + " (raised in a DataLoader worker)"
    return lines[-1]


def suggest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """Return ' (did you mean: a, b?)' for close matches of ``name`` in ``choices``, or ''."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    return f" (did you mean: {', '.join(close)}?)" if close else ""


# ------------------------------------------------------------------ operating-system faults


@contextmanager
def io_path(path: str | os.PathLike) -> Iterator[None]:
    """Name ``path`` in an ``OSError`` raised inside the block that names no file.

    ``write()`` on a full disk raises ``OSError(ENOSPC)`` without a file name; the CLI line
    must still say where (the store or run folder being written).
    """
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            exc.filename = str(path)
        raise


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes on the file system of ``path`` (its nearest existing ancestor); None when
    it cannot be told."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return int(shutil.disk_usage(p).free)
    except OSError:
        return None


def free_space(path: str | os.PathLike) -> str:
    """:func:`free_bytes`, formatted."""
    free = free_bytes(path)
    return "unknown space" if free is None else format_bytes(free)


def os_error_line(exc: OSError) -> str:
    """The one user-facing line of an operating-system fault: what, where, and the fix.

    Writes are atomic and every command resumes, so the fix is always "correct the cause and
    run the same command again".
    """
    if exc.errno is None:  # e.g. re-raised from a DataLoader worker: only the text is left
        last = one_line(exc)
        m = re.search(r"\[Errno (\d+)\] ([^:]+)(?:: '(.*)')?$", last)
        if m and "Original Traceback" in str(exc):
            inner = OSError(int(m.group(1)), m.group(2), m.group(3))
            return os_error_line(inner) + " (raised in a DataLoader worker)"
        return f"{last}: correct the cause and run the same command again (it resumes)"
    path = exc.filename or "?"
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return (
            f"no space left on the device of {path} ({free_space(path)} free): free space or "
            "choose another --cache/--out, then run the same command again (it resumes)"
        )
    if exc.errno == errno.EROFS:
        return (
            f"{path} is on a read-only file system ({free_space(path)} free): pass a writable "
            "--cache/--out folder"
        )
    if exc.errno in (errno.EACCES, errno.EPERM):
        return (
            f"permission denied on {path} ({free_space(path)} free): make it writable for this "
            "user or pass another --cache/--out folder"
        )
    if exc.errno == errno.ENOENT:
        return (
            f"{path} does not exist (deleted while the command ran?): check the path, then run "
            "the same command again"
        )
    return (
        f"{exc.strerror or type(exc).__name__} on {path} (errno {exc.errno}): correct the cause, "
        "then run the same command again (it resumes)"
    )

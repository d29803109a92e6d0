"""User-facing errors: one line that names the problem and the fix; the CLI exits with code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


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

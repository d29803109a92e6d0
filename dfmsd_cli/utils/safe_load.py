"""The one way dfmsd reads a ``.pth`` file: ``torch.load(weights_only=True)``, never more.

A pickle can carry a ``__reduce__`` payload that runs arbitrary code when it is loaded. Every
checkpoint, run state and weights file dfmsd reads goes through :func:`load_pth`, which uses
PyTorch's restricted unpickler (tensors, numbers, strings, lists, tuples, dicts) and has no
automatic fallback. What dfmsd itself writes (checkpoints, ``last.pth`` run states with their
RNG streams) contains only those types, so it always loads.

A file the restricted unpickler refuses ends with one line that names the Python objects it
references and two ways on: ``dfmsd convert mmdet`` for MMDetection checkpoints (it keeps only
the tensors without running anything), or — only for a file the user trusts —
``--trust-checkpoint``, which allows exactly the objects that file names (their code may run)
and prints a warning.
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
import sys
from pathlib import Path
from typing import Any

from dfmsd_cli.errors import UserError

TRUST_ENV = "DFMSD_TRUST_CHECKPOINT"
_STATE = {"trust": os.environ.get(TRUST_ENV, "") not in ("", "0")}


def set_trust(trust: bool) -> None:
    """Process-wide opt-in (the CLI's ``--trust-checkpoint``); exported to child processes."""
    _STATE["trust"] = bool(trust)
    if trust:
        os.environ[TRUST_ENV] = "1"  # DataLoader workers and torchrun children inherit it
    else:
        os.environ.pop(TRUST_ENV, None)


def trusted() -> bool:
    return _STATE["trust"]


def _resolve(name: str) -> Any:
    """The object a pickle GLOBAL ``module.qualname`` names (imports the module)."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            continue
        return obj
    raise UserError(f"--trust-checkpoint: the file references {name}, which cannot be imported")


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


_NEEDS = (re.compile(r"got <class '([\w.]+)'>"), re.compile(r"GLOBAL ([\w.]+)"))


def _load_trusted(path: Path, names: list[str], what: str, fix: str) -> Any:
    """weights_only=True with the file's own globals allowed; classes met only while loading
    (e.g. numpy dtypes inside a numpy scalar) are added as the unpickler names them."""
    import torch

    names = list(names)
    for _ in range(32):
        try:
            with torch.serialization.safe_globals([_resolve(n) for n in names]):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            found = [m.group(1) for rx in _NEEDS for m in rx.finditer(str(exc))]
            new = [n for n in found if n not in names]
            if not new:
                raise UserError(f"cannot read {what} {path} ({_first_line(exc)}): {fix}") from exc
            names += new
    raise UserError(f"cannot read {what} {path}: it references too many Python objects: {fix}")


def _globals_of(path: Path) -> list[str]:
    import torch

    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - an unreadable file is reported by the caller
        return []


def load_pth(
    path: str | os.PathLike,
    *,
    what: str = "checkpoint",
    fix: str = "check the file",
    trust: bool | None = None,
    mmap: bool = False,
) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with one-line errors.

    ``what`` names the file in messages ("weights file", "run state"), ``fix`` ends the message
    for an unreadable file. ``trust`` (default: the
    process-wide ``--trust-checkpoint`` setting) allows the Python objects the file names.
    ``mmap``: map the tensors instead of reading them (only those used are paged in).
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} not found: pass an existing .pth file")
    trust = trusted() if trust is None else trust
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap or None)
    except pickle.UnpicklingError as exc:
        names = _globals_of(path)
        if not names:  # refused for another reason (bad opcode, corrupt stream)
            raise UserError(
                f"cannot read {what} {path} safely ({_first_line(exc)}): {fix}"
            ) from exc
        shown = ", ".join(names[:4]) + (f" (+{len(names) - 4})" if len(names) > 4 else "")
        if not trust:
            raise UserError(
                f"{what} {path} is refused: it references Python objects beyond tensors "
                f"({shown}), and loading it could run code from the file; an MMDetection "
                "checkpoint converts safely with 'dfmsd convert mmdet', and only if you trust "
                "the file, add --trust-checkpoint"
            ) from exc
        print(
            f"warning: --trust-checkpoint: loading {path} with the Python objects it names "
            f"({shown}); code from this file may run",
            file=sys.stderr,
        )
        return _load_trusted(path, names, what, fix)
    except Exception as exc:  # truncated, not a torch file, unreadable
        raise UserError(
            f"cannot read {what} {path} as a torch file ({type(exc).__name__}: "
            f"{_first_line(exc)}): "
            f"{fix}"
        ) from exc

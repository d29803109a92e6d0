"""Output folders: never silently mix two runs in one folder, never run two at once in one."""

from __future__ import annotations

import json
import os
import shutil
import sys
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from dfmsd_cli.errors import UserError
from dfmsd_cli.utils.lock import file_lock

RUN_FILES = ("config.json", "last.pth", "metrics.jsonl")
LOCK_FILE = ".dfmsd.lock"  # held by the process training into the folder


def run_lock(out: Path) -> AbstractContextManager[Path]:
    """Hold ``OUT/.dfmsd.lock`` while a run writes into ``out`` (rank 0, the run's lifetime).

    A second ``train``/``distill`` with the same ``--out`` is refused (exit 2) naming the
    holder's pid, instead of both writing ``last.pth`` and ``metrics.jsonl`` in turn. A lock
    left by a killed run on this host is taken over, so ``--resume`` after ``kill -9`` works.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: pass a folder path")
    out.mkdir(parents=True, exist_ok=True)
    return file_lock(
        out / LOCK_FILE,
        what=f"run folder {out}",
        hint="wait for that run to finish or choose another --out; if that process is gone, "
        "delete the lock file",
    )


def prepare_run_dir(
    out: Path, command: str, identity: dict[str, Any], resume: bool, overwrite: bool
) -> bool:
    """Check ``out`` before a run writes into it; returns True when a checkpoint will be resumed.

    ``identity`` holds the options that define the run (model, data, ...). A folder that
    already holds a run is refused unless ``resume`` (same identity) or ``overwrite``.

    ``resume`` with no run state (no ``last.pth``: a new folder, or a run killed before its
    first checkpoint) starts a new run after a one-line warning on stderr — MMEngine's
    ``resume=True`` behaves the same ("otherwise the training will be restarted from
    scratch"), which lets a job scheduler pass ``--resume`` on every (re)start.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: pass a folder path")
    cfg_path = out / "config.json"
    has_run = out.is_dir() and any((out / f).exists() for f in RUN_FILES)
    if not has_run:
        return _fresh(out, resume and not overwrite)
    if overwrite:
        for child in out.iterdir():
            if child.name == LOCK_FILE:
                continue  # ours (run_lock), held for this run
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
        return False
    if not resume:
        raise UserError(
            f"{out} already holds a run: pass --resume to continue it, --overwrite to replace it, "
            "or choose another --out"
        )
    if cfg_path.is_file():
        try:
            old = json.loads(cfg_path.read_text())
        except json.JSONDecodeError:
            old = {}
        if old.get("command") not in (None, command):
            raise UserError(
                f"{out} holds a '{old.get('command')}' run, not '{command}': "
                "choose another --out or pass --overwrite"
            )
        old_opts = old.get("options", {})
        diffs = [
            f"{k}={old_opts.get(k)!r} (now {v!r})"
            for k, v in identity.items()
            if k in old_opts and not _same(old_opts[k], v)
        ]
        if diffs:
            raise UserError(
                f"{out} holds a different run ({'; '.join(diffs)}): "
                "choose another --out or pass --overwrite"
            )
    return (out / "last.pth").is_file() or _fresh(out, True)


def _fresh(out: Path, resume: bool) -> bool:
    """A new run starts in ``out``; under ``--resume`` say so in one line (returns False)."""
    if resume:
        print(
            f"warning: --resume: {out} holds no run state (no last.pth), starting a new run",
            file=sys.stderr,
        )
    return False


def _same(old: Any, new: Any) -> bool:
    """One identity value, as recorded and as given now: equal, or one existing file or folder
    named two ways (``data/`` and ``/abs/path/data``)."""
    a, b = _norm(old), _norm(new)
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str) and a and b:
        try:
            return os.path.samefile(a, b)
        except OSError:  # either is not an existing path
            return False
    return False


def _norm(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


def write_config(out: Path, options: dict[str, Any], command: str) -> Path:
    """Write the resolved options of ``command`` to ``out/config.json`` (atomically)."""
    from dfmsd_cli.utils.io import atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.json"
    payload = {"command": command, "options": _jsonable(options)}
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
    return path


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)

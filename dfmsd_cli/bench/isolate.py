"""Run one measurement in a fresh process, so its peak memory is its own.

``ru_maxrss`` is a high-water mark that never goes down: two measurements in one process would
report the larger of the two. Each call of :func:`run_isolated` therefore spawns a new Python
process (``spawn``, not ``fork``: no inherited torch state), runs ``module:function(**kwargs)``
there and returns its result with

* ``peak_rss_mb``: the child's peak resident set size (Linux ``ru_maxrss``, KiB → MiB);
* ``base_rss_mb``: its resident size after imports, before the work (``peak − base`` is what the
  work itself needed: model, optimizer, activations, store buffers);
* ``cuda_peak_mb``: ``torch.cuda.max_memory_allocated`` when CUDA was used.

DataLoader worker processes are not counted (run with ``num_workers=0`` to include decoding).
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import queue as _queue
import resource
import traceback
from typing import Any


def _rss_mb() -> float:
    """Current resident set size from /proc (falls back to the peak where /proc is absent)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def call(target: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Import ``module:function``, call it, and measure memory around it (in this process)."""
    import torch

    module, name = target.split(":")
    fn = getattr(importlib.import_module(module), name)
    base = _rss_mb()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = fn(**kwargs)
    out = {
        "result": result,
        "base_rss_mb": round(base, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        out["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def _child(target: str, kwargs: dict[str, Any], queue) -> None:
    try:
        queue.put(("ok", call(target, kwargs)))
    except BaseException as exc:  # report, the parent re-raises
        queue.put(("error", (type(exc).__name__, str(exc), traceback.format_exc())))


def run_isolated(target: str, kwargs: dict[str, Any], isolate: bool = True) -> dict[str, Any]:
    """``module:function(**kwargs)`` in a spawned process (or here with ``isolate=False``, where
    the peak is the whole process's so far). Errors in the child are re-raised here; a
    :class:`~dfmsd_cli.errors.UserError` stays a UserError."""
    if not isolate:
        return call(target, kwargs)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(target, kwargs, queue))
    proc.start()
    try:
        while True:
            try:
                status, payload = queue.get(timeout=1.0)
                break
            except _queue.Empty:
                if not proc.is_alive():  # killed (e.g. out of memory) before reporting
                    raise RuntimeError(
                        f"{target}: the measurement process exited with code {proc.exitcode}"
                    ) from None
    finally:
        proc.join()
    if status == "ok":
        return payload
    name, msg, tb = payload
    if name == "UserError":
        from dfmsd_cli.errors import UserError

        raise UserError(msg)
    raise RuntimeError(f"{target} failed in the measurement process:\n{tb}")

"""One distillation optimisation step's forward and backward passes (see ``train_step``)."""

from __future__ import annotations

import contextlib
import time

import torch
from torch import Tensor, nn

from dfmsd_cli.store.batch import TeacherBatch


def train_step(
    model: nn.Module,
    batch: dict,
    device: torch.device,
    use_amp: bool,
    scaler: torch.amp.GradScaler,
    online=None,
    timings: dict[str, float] | None = None,
    now=time.perf_counter,
) -> tuple[dict[str, float], Tensor]:
    """Forward and backward of one batch; returns the logged values and the total loss.

    ``batch["teacher"]`` is a :class:`~dfmsd_cli.store.batch.TeacherBatch` (or None: the
    student alone). With ME the main pass (detection, stage loss, SFA) is back-propagated
    before the ME pass runs (likewise each further extra view, e.g. adv), so the graphs are
    never held at once: the gradients add up to those of the summed loss, at the peak memory
    of the larger pass (under DDP the first backward skips the all-reduce, the last reduces
    the accumulated gradients). A non-finite loss returns before its backward; the caller
    stops the run. ``timings`` (if given) accumulates the seconds (clock ``now``) of each
    pass's forward (``fwd_<pass>``) and backward (``bwd_<pass>``).
    """
    clock = _Clock(device, timings, now)
    images = batch["images"].to(device, non_blocking=True)
    if online is not None:  # --online: the teachers' pass replaces the store read
        with torch.autocast(device.type, enabled=use_amp):
            batch["teacher"] = online(batch, images)
        clock.lap("teachers_online")
    targets = [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]]
    teacher: TeacherBatch | None = batch.get("teacher")
    teacher = teacher.to(device) if teacher is not None else None
    inner = getattr(model, "module", model)
    passes = ["main"]
    if teacher is not None:  # one more pass per extra view (me, adv) the stage and batch have
        passes += [v for v in getattr(inner, "extra_views", []) if teacher.has(v)]
    if len(passes) == 1:
        passes = ["all"]
    values: dict[str, float] = {}
    total = torch.zeros((), device=device)
    for k, part in enumerate(passes):
        sync = k == len(passes) - 1 or not hasattr(model, "no_sync")
        with contextlib.nullcontext() if sync else model.no_sync():
            clock.lap(None)
            with torch.autocast(device.type, enabled=use_amp):
                losses = model(images, batch["image_sizes"], targets, teacher, part=part)
            clock.lap(f"fwd_{part}")
            loss = sum(v.float() for v in losses.values())
            values.update({n: float(v.detach()) for n, v in losses.items()})
            total = total + loss.detach()
            if not torch.isfinite(loss):
                break
            scaler.scale(loss).backward()
            clock.lap(f"bwd_{part}")
            del losses, loss  # free this pass's graph before the next one
    values["loss"] = float(total)
    return values, total


class _Clock:
    """Adds the seconds since the previous lap to ``timings[name]`` (a no-op without
    ``timings``); synchronises CUDA first so a lap measures the work, not its launch."""

    def __init__(self, device: torch.device, timings: dict[str, float] | None, now) -> None:
        self.device, self.timings, self.now = device, timings, now
        self.t = now() if timings is not None else 0.0

    def lap(self, name: str | None) -> None:
        if self.timings is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = self.now()
        if name is not None:
            self.timings[name] = self.timings.get(name, 0.0) + now - self.t
        self.t = now

"""One distillation optimisation step's forward and backward passes (see ``train_step``)."""

from __future__ import annotations

import contextlib
import time

import torch
from torch import Tensor, nn

from dfmsd_cli.distill.dataset import teacher_to


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

    With ME the main pass (detection, stage loss, SFA) is back-propagated before the ME pass
    runs, so the two graphs are never held at once: the gradients add up to those of the summed
    loss, at the peak memory of the larger pass (under DDP the first backward skips the
    all-reduce, the second reduces the accumulated gradients). A non-finite loss returns
    before its backward; the caller stops the run. ``timings`` (if given) accumulates the
    seconds (clock ``now``) of each pass's forward (``fwd_<pass>``) and backward (``bwd_<pass>``).
    """
    clock = _Clock(device, timings, now)
    images = batch["images"].to(device, non_blocking=True)
    if online is not None:  # --online: the teachers' pass replaces the store read
        with torch.autocast(device.type, enabled=use_amp):
            batch.update(online(batch, images))
        clock.lap("teachers_online")
    targets = [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]]
    teacher = teacher_to(batch["teacher"], device) if "teacher" in batch else None
    teacher_me = teacher_to(batch["teacher_me"], device) if "teacher_me" in batch else None
    me_images = batch["me_images"].to(device, non_blocking=True) if "me_images" in batch else None
    teacher_adv = teacher_to(batch["teacher_adv"], device) if "teacher_adv" in batch else None
    adv_images = batch["adv_images"].to(device) if "adv_images" in batch else None
    inner = getattr(model, "module", model)
    passes = ["main"]
    if inner.has_me and me_images is not None and teacher_me is not None:
        passes.append("me")
    if getattr(inner, "has_adv", False) and adv_images is not None and teacher_adv is not None:
        passes.append("adv")
    if len(passes) == 1:
        passes = ["all"]
    values: dict[str, float] = {}
    total = torch.zeros((), device=device)
    for k, part in enumerate(passes):
        sync = k == len(passes) - 1 or not hasattr(model, "no_sync")
        with contextlib.nullcontext() if sync else model.no_sync():
            clock.lap(None)
            with torch.autocast(device.type, enabled=use_amp):
                losses = model(images, batch["image_sizes"], targets, teacher, me_images,
                               teacher_me, part=part, adv_images=adv_images,
                               teacher_adv=teacher_adv)  # fmt: skip
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

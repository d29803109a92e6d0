"""``fit(task, options)``: the one epoch/step loop of ``dfmsd train`` and of each distill stage.

A :class:`Task` says *what* is trained (its model, dataset, sampler, one step's forward and
backward, its checkpoint payload and evaluation); ``fit`` owns *how*: SGD with the MMDetection
schedule (linear warm-up, step decay), DDP wrapping, AMP on CUDA (``GradScaler``; disabled on
CPU), the one non-finite-loss rule, gradient-norm clipping, ``metrics.jsonl``, checkpoints
(every ``save_interval`` steps, every epoch, at a ``max_steps`` stop), bit-exact resume, the
progress bar and the step timings.

Per optimizer step::

    lr = schedule(iteration, epoch); zero_grad
    values, loss = task.step(model, batch, ctx)       # forward + backward (none if non-finite)
    loss not finite -> UserError (nothing written)    # the one rule, the one text
    clip_grad_norm_(params, grad_clip) if grad_clip;  scaler.step; scaler.update

Resume: ``state`` (a ``last.pth`` written here) restores the optimizer, scaler, position
(epoch, step in epoch, iteration) and RNG streams after ``task.build`` and ``task.restore``,
so a resumed CPU run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dfmsd_cli.engine.distributed import DistInfo, all_reduce_mean, barrier
from dfmsd_cli.engine.loop import epoch_loader
from dfmsd_cli.engine.progress import MetricsLog, RunningMean
from dfmsd_cli.engine.schedule import StepSchedule, build_sgd
from dfmsd_cli.engine.state import rng_state, save_state, set_rng_state
from dfmsd_cli.errors import UserError
from dfmsd_cli.utils.console import console, format_losses, make_progress


@dataclass
class FitOptions:
    """How ``fit`` trains (the recipe), independent of what is trained."""

    out: Path  # run folder: last.pth and metrics.jsonl
    epochs: int
    batch_size: int
    lr: float
    warmup_iters: int = 500
    lr_steps: tuple[int, ...] | None = None  # decay epochs (None: 8/12 and 11/12 of epochs)
    grad_clip: float | None = None  # gradient-norm bound; None/0: no clipping
    save_interval: int = 0  # also checkpoint every N iterations
    max_steps: int | None = None  # stop after N optimizer steps of this call
    seed: int = 0  # the per-epoch DataLoader generator (seed + epoch)
    num_workers: int = 0


@dataclass
class StepContext:
    """What ``Task.step`` needs from the loop."""

    device: torch.device
    use_amp: bool
    scaler: torch.amp.GradScaler
    epoch: int = 0
    iteration: int = 0  # 0-based iteration of this step
    timings: dict[str, float] = field(default_factory=dict)  # per-pass seconds (split)
    clock: Callable[[], float] = time.perf_counter


class Task(ABC):
    """What one ``fit`` call trains. ``build`` sets ``model`` (the module the optimizer, DDP
    and clipping see), ``dataset``, ``sampler`` (an ``engine.sampler.ViewSampler``) and
    ``collate_fn``."""

    tag: str = "train"  # names the run or stage in messages
    label: str = "train"  # progress-bar description
    weight_flags: str = ""  # the loss-weight flags the non-finite error suggests lowering
    model: nn.Module
    dataset: Any
    sampler: Any
    collate_fn: Callable

    @abstractmethod
    def build(self, device: torch.device, dist: DistInfo) -> None:
        """Build model, dataset and sampler (global RNG draws here are part of the run)."""

    def restore(self, state: dict[str, Any]) -> None:
        """Load the task's own parts of a mid-run ``state`` (before the optimizer's)."""
        return None

    @abstractmethod
    def step(self, model: nn.Module, batch: Any, ctx: StepContext) -> tuple[dict, Tensor]:
        """Forward and backward (``ctx.scaler.scale(loss).backward()``) of one batch; returns
        the logged values and the total loss. A non-finite loss returns before its backward."""

    @abstractmethod
    def payload(self, done: bool) -> dict[str, Any]:
        """The checkpoint content (``done``: the final one, once the epochs are complete);
        ``fit`` adds optimizer, scaler and position unless the payload sets them."""

    def log_fields(self) -> dict[str, Any]:
        """Fields every ``metrics.jsonl`` record of this task carries (after ``phase``)."""
        return {}

    def summary_fields(self) -> dict[str, Any]:
        """Fields leading the summary ``fit`` returns."""
        return {}

    def finish(self, complete: bool) -> None:
        """Rank 0, after the loop and before the final checkpoint (e.g. write weights)."""
        return None

    def evaluate(self) -> dict[str, Any] | None:
        """Rank 0, once the epochs are complete: metrics ({} skipped, None not asked)."""
        return None


def non_finite_error(
    tag: str, loss: float, epoch: int, step: int, values: dict[str, float], last: Path, weights: str
) -> UserError:
    """The one message for a NaN/inf loss: where, the parts, the checkpoint, the fix."""
    kept = (
        f"the last good checkpoint {last} is kept; "
        if last.is_file()
        else "no checkpoint was written yet; "
    )
    lower = f"lower --lr or the loss weights ({weights})" if weights else "lower --lr"
    return UserError(
        f"{tag}: loss became {loss} at epoch {epoch + 1} step {step + 1} "
        f"(parts: {format_losses(values, 10)}): {kept}{lower} or set --grad-clip, then "
        "--resume (or start anew with --overwrite)"
    )


def fit(
    task: Task,
    opts: FitOptions,
    *,
    device: torch.device,
    dist: DistInfo,
    log: MetricsLog,
    state: dict[str, Any] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Any]:
    """Train ``task`` for ``opts.epochs`` (from ``state`` when resuming); returns the summary:
    position, seconds, steady seconds per step and its split, ``stopped``/``complete``, ``val``.

    ``clock`` times the steps (``bench distill`` passes the process CPU clock)."""
    task.build(device, dist)
    model = task.model
    optimizer = build_sgd(model.parameters(), lr=opts.lr)
    schedule = StepSchedule.mmdet(opts.lr, opts.epochs, opts.lr_steps, opts.warmup_iters)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    out = Path(opts.out)
    epoch = step = iteration = 0
    if state is not None:
        task.restore(state)
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        epoch, step, iteration = state["epoch"], state["step"], state["iteration"]
        set_rng_state(state["rng"])
        if dist.is_main:
            console.print(f"resuming {task.tag} at epoch {epoch + 1}, step {step}")
    steps_per_epoch = max(1, -(-len(task.sampler) // opts.batch_size))
    ddp_model: nn.Module = model
    if dist.enabled:
        ddp_model = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,
        )

    def checkpoint(ep: int, st: int, it: int, done: bool = False) -> None:
        if not dist.is_main:
            return
        position = {"epoch": ep, "step": st, "iteration": it}
        trainer = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()}
        # the task's keys win: a finished stage drops its optimizer (distill)
        save_state(out / "last.pth", {**position, **trainer, **task.payload(done)})

    smooth = RunningMean()
    t0 = clock()
    done_steps, stopped, t_first = 0, False, t0
    t_last, step_split = t0, {}  # end of the last step; summed split of the steady steps
    with make_progress(disable=not dist.is_main) as progress:
        bar = progress.add_task(
            task.label,
            total=opts.epochs * steps_per_epoch,
            completed=epoch * steps_per_epoch + step,
            info="",
        )
        while epoch < opts.epochs and not stopped:
            loader = epoch_loader(
                task.dataset,
                task.sampler,
                batch_size=opts.batch_size,
                collate_fn=task.collate_fn,
                num_workers=opts.num_workers,
                device=device,
                seed=opts.seed,
                epoch=epoch,
                start_step=step,
            )
            model.train()
            t_prev = clock()
            for batch in loader:
                if batch is None:  # every image of the batch was unreadable (counted, warned)
                    continue
                ctx = StepContext(device, use_amp, scaler, epoch, iteration, clock=clock)
                ctx.timings["data"] = clock() - t_prev
                lr = schedule.apply(optimizer, iteration, epoch)
                optimizer.zero_grad(set_to_none=True)
                values, loss = task.step(ddp_model, batch, ctx)
                t_opt = clock()
                if not torch.isfinite(loss):
                    raise non_finite_error(
                        task.tag,
                        float(loss.detach()),
                        epoch,
                        step,
                        values,
                        out / "last.pth",
                        task.weight_flags,
                    )
                if opts.grad_clip:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                ctx.timings["optimizer"] = clock() - t_opt
                step, iteration, done_steps = step + 1, iteration + 1, done_steps + 1
                t_last = clock()  # a stop checkpoint after the loop is not a step
                if done_steps == 1:
                    t_first = t_last  # steady-state timing excludes start-up
                else:
                    for k, v in ctx.timings.items():
                        step_split[k] = step_split.get(k, 0.0) + v
                values = all_reduce_mean(values, dist)
                shown = format_losses(smooth.update(values), 8)
                progress.update(bar, advance=1, info=f"ep {epoch + 1} lr {lr:.2e} {shown}")
                stopped = opts.max_steps is not None and done_steps >= opts.max_steps
                if iteration % 10 == 0 or step == steps_per_epoch or stopped:
                    record = {"epoch": epoch + 1, "step": step, "iteration": iteration, "lr": lr}
                    log.write({"phase": "train", **task.log_fields(), **record, **values})
                if opts.save_interval and iteration % opts.save_interval == 0:
                    checkpoint(epoch, step, iteration)
                if stopped:
                    break
                t_prev = clock()
            if stopped and step < steps_per_epoch:  # mid-epoch stop (max_steps)
                checkpoint(epoch, step, iteration)
                break
            epoch, step = epoch + 1, 0
            if epoch < opts.epochs:  # the last epoch's checkpoint is the final one below
                checkpoint(epoch, step, iteration)
            barrier(dist)
    elapsed = clock() - t0
    steady = done_steps - 1
    summary: dict[str, Any] = {
        **task.summary_fields(),
        "epochs_done": epoch,
        "iterations": iteration,
        "steps_this_run": done_steps,
        "seconds": round(elapsed, 2),
        "seconds_per_step": round(elapsed / max(done_steps, 1), 4),
        "steady_seconds_per_step": round((t_last - t_first) / steady, 4) if steady > 0 else None,
        # steady steps' split: data wait, forward/backward per pass, optimizer (bench distill)
        "split_seconds_per_step": {
            k: round(v / steady, 5) for k, v in step_split.items() if steady > 0
        },
        "stopped": stopped,
        "complete": epoch >= opts.epochs,
    }
    if dist.is_main:
        task.finish(summary["complete"])
        if summary["complete"]:
            checkpoint(epoch, 0, iteration, done=True)
            saved = rng_state()  # evaluation must not shift the training RNG stream
            metrics = task.evaluate()
            set_rng_state(saved)
            if metrics is not None:
                summary["val"] = metrics
                if metrics:
                    log.write({"phase": "val", **task.log_fields(), "epoch": epoch, **metrics})
    barrier(dist)
    return summary

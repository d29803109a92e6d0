"""Baseline training of one detector (a student without distillation, or a teacher).

MMDetection-style recipe: SGD (momentum 0.9, weight decay 1e-4), linear warm-up and step
decay (``engine/schedule.py``), optional gradient clipping, AMP on CUDA, random horizontal
flip as an explicit view drawn per image (``engine/sampler.py``). ``last.pth`` is written
atomically every epoch (and every ``save_interval`` steps); ``resume`` continues at the
exact step with the same optimizer and RNG state. Runs under ``torchrun`` (DDP); rank 0 writes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dfmsd_cli.data.geometry import Geometry
from dfmsd_cli.engine.distributed import (
    DistInfo,
    all_reduce_mean,
    barrier,
    cleanup,
    init_distributed,
)
from dfmsd_cli.engine.loop import epoch_loader, evaluate_split, options_dict
from dfmsd_cli.engine.progress import MetricsLog, RunningMean
from dfmsd_cli.engine.rundir import prepare_run_dir, write_config
from dfmsd_cli.engine.sampler import ViewSampler
from dfmsd_cli.engine.schedule import StepSchedule, build_sgd
from dfmsd_cli.engine.state import load_state, save_state, seed_everything, set_rng_state
from dfmsd_cli.errors import UserError
from dfmsd_cli.utils.console import console, format_losses, make_progress
from dfmsd_cli.utils.device import resolve_device


@dataclass
class TrainOptions:
    """Options of ``dfmsd train`` (also usable from Python)."""

    model: str
    out: Path
    data: Path | None = None
    split: str = "train2017"
    val_split: str = "val2017"
    ann: Path | None = None
    images: Path | None = None
    epochs: int = 12
    batch_size: int = 2
    lr: float = 0.01
    steps: tuple[int, ...] | None = None
    warmup_iters: int = 500
    grad_clip: float | None = None
    weights: str | None = None
    resume: bool = False
    overwrite: bool = False
    img_scale: tuple[int, int] = (1333, 800)
    flip: bool = True
    skip_empty: bool = True
    strict: bool = False
    seed: int = 0
    num_workers: int = 2
    device: str = "auto"
    evaluate: bool = True
    save_interval: int = 0
    max_steps: int | None = None  # stop early after this many optimizer steps (benchmarks/tests)
    extra: dict[str, Any] = field(default_factory=dict)


def identity_of(opts: TrainOptions) -> dict[str, Any]:
    """The options that define a run: a resumed run must match them."""
    return {
        "model": opts.model,
        "data": str(opts.data) if opts.data else None,
        "split": opts.split,
        "epochs": opts.epochs,
        "batch_size": opts.batch_size,
        "img_scale": list(opts.img_scale),
        "seed": opts.seed,
    }


def train(opts: TrainOptions) -> dict[str, Any]:
    """Train ``opts.model`` on the dataset; returns a summary (steps, time, final metrics)."""
    from dfmsd_cli.data.coco import CocoDetection
    from dfmsd_cli.data.loader import collate, resolve_data
    from dfmsd_cli.models import build_model
    from dfmsd_cli.models.checkpoint import load_weights, make_checkpoint

    device = resolve_device(opts.device)
    dist_info = init_distributed(device)
    if dist_info.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    out = Path(opts.out)
    geometry = Geometry(img_scale=tuple(opts.img_scale))
    ann_file, image_dir = resolve_data(opts.data, opts.split, opts.ann, opts.images)

    resuming = False
    if dist_info.is_main:
        resuming = prepare_run_dir(out, "train", identity_of(opts), opts.resume, opts.overwrite)
        write_config(out, options_dict(opts), "train")
    barrier(dist_info)
    resuming = (out / "last.pth").is_file() and opts.resume

    views = ("orig", "hflip") if opts.flip else ("orig",)
    dataset = CocoDetection(
        ann_file,
        image_dir,
        geometry=geometry,
        views=views,
        train=True,
        skip_empty=opts.skip_empty,
        strict=opts.strict,
    )
    seed_everything(opts.seed)
    model = build_model(opts.model, num_classes=dataset.num_classes)
    with_masks = bool(getattr(model, "has_masks", False))
    if with_masks:
        dataset = CocoDetection(
            ann_file,
            image_dir,
            geometry=geometry,
            views=views,
            train=True,
            skip_empty=opts.skip_empty,
            strict=opts.strict,
            with_masks=True,
        )
    if opts.weights and not resuming:
        load_weights(model, opts.weights, categories=dataset.categories)
    model.to(device)

    sampler = ViewSampler(
        len(dataset.image_ids),
        len(views),
        shuffle=True,
        seed=opts.seed,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
    )
    steps_per_epoch = max(1, -(-len(sampler) // opts.batch_size))
    if len(sampler) == 0:
        raise UserError(f"no training images in {image_dir}: check --data/--split or annotations")

    optimizer = build_sgd(model.parameters(), lr=opts.lr)
    schedule = StepSchedule.mmdet(opts.lr, opts.epochs, opts.steps, opts.warmup_iters)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    epoch, step, iteration = 0, 0, 0
    if resuming:
        state = load_state(out / "last.pth")
        if state.get("model") != opts.model:
            raise UserError(
                f"{out}/last.pth is a '{state.get('model')}' run, not '{opts.model}': "
                "use another --out or --overwrite"
            )
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        epoch, step, iteration = state["epoch"], state["step"], state["iteration"]
        set_rng_state(state["rng"])
        if dist_info.is_main:
            console.print(f"resuming {out} at epoch {epoch + 1}, step {step}")

    ddp_model: torch.nn.Module = model
    if dist_info.enabled:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,
        )

    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(out / "metrics.jsonl", enabled=dist_info.is_main)

    def checkpoint(ep: int, st: int, it: int) -> None:
        if not dist_info.is_main:
            return
        payload = make_checkpoint(model, categories=dataset.categories, geometry=geometry)
        payload.update(
            kind="train-state",
            optimizer=optimizer.state_dict(),
            scaler=scaler.state_dict(),
            epoch=ep,
            step=st,
            iteration=it,
            options=options_dict(opts),
        )
        save_state(out / "last.pth", payload)

    total_steps = opts.epochs * steps_per_epoch
    t0 = time.perf_counter()
    done_steps = 0
    smooth = RunningMean()
    stopped = False
    with make_progress(disable=not dist_info.is_main) as progress:
        task = progress.add_task(
            f"train {opts.model}",
            total=total_steps,
            completed=epoch * steps_per_epoch + step,
            info="",
        )
        while epoch < opts.epochs and not stopped:
            loader = epoch_loader(
                dataset,
                sampler,
                batch_size=opts.batch_size,
                collate_fn=collate,
                num_workers=opts.num_workers,
                device=device,
                seed=opts.seed,
                epoch=epoch,
                start_step=step,
            )
            model.train()
            for batch in loader:
                if batch is None:  # every image of the batch was unreadable (counted, warned)
                    continue
                lr = schedule.apply(optimizer, iteration, epoch)
                images = batch["images"].to(device, non_blocking=True)
                targets = [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]]
                with torch.autocast(device.type, enabled=use_amp):
                    output = ddp_model(images, batch["image_sizes"], targets)
                    losses = output.losses
                    loss = sum(losses.values())
                if not torch.isfinite(loss):
                    raise UserError(
                        f"loss became {loss.item()} at epoch {epoch + 1} step {step + 1}: "
                        f"the last good checkpoint is {out / 'last.pth'}; lower --lr or set "
                        "--grad-clip, then --resume"
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if opts.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                step += 1
                iteration += 1
                done_steps += 1
                values = {k: float(v.detach()) for k, v in losses.items()}
                values["loss"] = float(loss.detach())
                values = all_reduce_mean(values, dist_info)
                shown = smooth.update(values)
                progress.update(
                    task, advance=1, info=f"ep {epoch + 1} lr {lr:.2e} " + format_losses(shown)
                )
                if iteration % 10 == 0 or step == steps_per_epoch:
                    log.write(
                        {
                            "phase": "train",
                            "epoch": epoch + 1,
                            "step": step,
                            "iteration": iteration,
                            "lr": lr,
                            **values,
                        }
                    )
                if opts.save_interval and iteration % opts.save_interval == 0:
                    checkpoint(epoch, step, iteration)
                if opts.max_steps is not None and done_steps >= opts.max_steps:
                    stopped = True
                    break
            if stopped:
                checkpoint(epoch, step, iteration)
                break
            epoch, step = epoch + 1, 0
            checkpoint(epoch, step, iteration)
            barrier(dist_info)
    elapsed = time.perf_counter() - t0
    summary: dict[str, Any] = {
        "model": opts.model,
        "epochs_done": epoch,
        "iterations": iteration,
        "steps_this_run": done_steps,
        "seconds": round(elapsed, 2),
        "seconds_per_step": round(elapsed / max(done_steps, 1), 4),
    }
    if dist_info.is_main:
        final = make_checkpoint(model, categories=dataset.categories, geometry=geometry)
        final["options"] = options_dict(opts)
        from dfmsd_cli.utils.io import atomic_torch_save

        atomic_torch_save(final, out / "model.pth")
        if opts.evaluate and epoch >= opts.epochs:
            summary["val"] = evaluate_split(
                model,
                opts.data,
                opts.val_split,
                geometry=geometry,
                batch_size=opts.batch_size,
                device=device,
                out=out / f"eval_{opts.val_split}.json",
            )
            log.write({"phase": "val", "epoch": epoch, **summary["val"]})
    cleanup(dist_info)
    return summary


__all__ = ["TrainOptions", "train", "DistInfo"]

"""Baseline training of one detector (a student without distillation, or a teacher).

MMDetection-style recipe: SGD (momentum 0.9, weight decay 1e-4), linear warm-up and step
decay (``engine/schedule.py``), no gradient clipping by default (MMDetection's detector
configs; docs/train.md), AMP on CUDA, random horizontal flip as an explicit view drawn per
image (``engine/sampler.py``). :class:`TrainTask` is the task; :func:`dfmsd_cli.engine.fit.fit`
runs it (checkpoints, bit-exact resume, DDP under ``torchrun``; rank 0 writes).
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dfmsd_cli.data.geometry import Geometry, parse_img_scale
from dfmsd_cli.engine.distributed import DistInfo, barrier, cleanup, init_distributed
from dfmsd_cli.engine.fit import FitOptions, StepContext, Task, fit
from dfmsd_cli.engine.loop import evaluate_split, options_dict
from dfmsd_cli.engine.progress import MetricsLog
from dfmsd_cli.engine.rundir import prepare_run_dir, run_lock, write_config
from dfmsd_cli.engine.sampler import ViewSampler
from dfmsd_cli.engine.state import load_state, seed_everything
from dfmsd_cli.errors import UserError
from dfmsd_cli.utils.device import resolve_device
from dfmsd_cli.utils.options import (
    BatchOptions,
    DataOptions,
    DeviceOptions,
    GeometryOptions,
    OptimOptions,
    OutOptions,
    ValidationOptions,
    int_tuple,
    opt,
    record,
    reuse,
)


def _lr_steps(text: str) -> tuple[int, ...] | None:
    return int_tuple("--steps")(text) or None


@dataclass(kw_only=True)
class TrainOptions(
    DeviceOptions, GeometryOptions, BatchOptions, ValidationOptions, OptimOptions, DataOptions,
    OutOptions,
):  # fmt: skip
    """Options of ``dfmsd train`` (also usable from Python): the typer command, the ``--config``
    keys and ``config.json`` come from these fields (``dfmsd_cli.utils.options``).
    ``img_scale`` and ``steps`` are typed as text on the command line and parsed here."""

    model: str = opt(
        help="Zoo name {head}_{backbone}, e.g. retina_r50 (see `dfmsd models`).", short="-m"
    )
    out: Path = reuse(
        OutOptions, "out", help="Run folder (config.json, last.pth, model.pth, metrics.jsonl)."
    )
    split: str = reuse(DataOptions, "split", help="Training split name.")
    batch_size: int = reuse(BatchOptions, "batch_size", help="Images per step (per process).")
    steps: tuple[int, ...] | None = opt(
        None, "LR decay epochs, e.g. 8,11 (default: 8/12 and 11/12 of --epochs).", parse=_lr_steps
    )
    overwrite: bool = reuse(OutOptions, "overwrite", help="Replace a run already in --out.")
    img_scale: tuple[int, int] = reuse(GeometryOptions, "img_scale", parse=parse_img_scale)
    flip: bool = opt(True, "Random horizontal flip (the hflip view).", flag="--flip/--no-flip")
    skip_empty: bool = opt(
        True, "Skip images without annotations in training.", flag="--skip-empty/--keep-empty"
    )
    strict: bool = opt(False, "Fail on unreadable images instead of skipping them.")
    num_workers: int = reuse(DeviceOptions, "num_workers", help="DataLoader worker processes.")


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


class TrainTask(Task):
    """``dfmsd train`` as a :class:`Task`: the detector's own losses on the orig/hflip views."""

    def __init__(self, opts: TrainOptions, data: tuple[Path, Path], resuming: bool) -> None:
        self.opts, self.data, self.resuming = opts, data, resuming
        self.tag = self.label = f"train {opts.model}"

    def build(self, device: torch.device, dist: DistInfo) -> None:
        from dfmsd_cli.data.coco import CocoDetection
        from dfmsd_cli.data.loader import collate
        from dfmsd_cli.models import build_model
        from dfmsd_cli.models.trunk import init_weights
        from dfmsd_cli.utils.console import console

        opts = self.opts
        self.device = device
        self.geometry = Geometry(img_scale=tuple(opts.img_scale))
        ann_file, image_dir = self.data
        views = ("orig", "hflip") if opts.flip else ("orig",)

        def dataset(with_masks: bool = False) -> CocoDetection:
            return CocoDetection(
                ann_file,
                image_dir,
                geometry=self.geometry,
                views=views,
                train=True,
                skip_empty=opts.skip_empty,
                strict=opts.strict,
                with_masks=with_masks,
            )

        self.dataset = dataset()
        seed_everything(opts.seed)
        self.model = build_model(opts.model, num_classes=self.dataset.num_classes)
        if getattr(self.model, "has_masks", False):
            self.dataset = dataset(with_masks=True)
        if opts.weights and not self.resuming:
            say = console.print if dist.is_main else None
            init_weights(self.model, opts.weights, opts.reinit_heads, self.dataset.categories, say)
        self.model.to(device)
        self.collate_fn = collate
        self.sampler = ViewSampler(
            len(self.dataset.image_ids),
            len(views),
            shuffle=True,
            seed=opts.seed,
            rank=dist.rank,
            world_size=dist.world_size,
        )
        if len(self.sampler) == 0:
            raise UserError(
                f"no training images in {image_dir}: check --data/--split or annotations"
            )

    def restore(self, state: dict[str, Any]) -> None:
        if state.get("model") != self.opts.model:
            raise UserError(
                f"{self.opts.out}/last.pth is a '{state.get('model')}' run, not "
                f"'{self.opts.model}': use another --out or --overwrite"
            )
        self.model.load_state_dict(state["state_dict"])

    def step(self, model: torch.nn.Module, batch: dict, ctx: StepContext):
        device = ctx.device
        images = batch["images"].to(device, non_blocking=True)
        targets = [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]]
        with torch.autocast(device.type, enabled=ctx.use_amp):
            losses = model(images, batch["image_sizes"], targets).losses
            loss = sum(losses.values())
        values = {k: float(v.detach()) for k, v in losses.items()}
        values["loss"] = float(loss.detach())
        if torch.isfinite(loss):
            ctx.scaler.scale(loss).backward()
        return values, loss

    def payload(self, done: bool) -> dict[str, Any]:
        from dfmsd_cli.models.checkpoint import make_checkpoint

        payload = make_checkpoint(
            self.model, categories=self.dataset.categories, geometry=self.geometry
        )
        return {**payload, "kind": "train-state", "options": options_dict(self.opts)}

    def summary_fields(self) -> dict[str, Any]:
        return {"model": self.opts.model}

    def finish(self, complete: bool) -> None:
        """``model.pth``: the weights trained so far (also after a ``max_steps`` stop)."""
        from dfmsd_cli.models.checkpoint import make_checkpoint
        from dfmsd_cli.utils.io import atomic_torch_save

        final = make_checkpoint(
            self.model, categories=self.dataset.categories, geometry=self.geometry
        )
        final["options"] = options_dict(self.opts)
        atomic_torch_save(final, Path(self.opts.out) / "model.pth")

    def evaluate(self) -> dict[str, Any] | None:
        opts = self.opts
        if not opts.evaluate:
            return None
        return evaluate_split(
            self.model,
            opts.data,
            opts.val_split,
            geometry=self.geometry,
            batch_size=opts.batch_size,
            device=self.device,
            out=Path(opts.out) / f"eval_{opts.val_split}.json",
        )


def train(opts: TrainOptions) -> dict[str, Any]:
    """Train ``opts.model`` on the dataset; returns a summary (steps, time, final metrics),
    also written to ``OUT/summary.json``. ``OUT`` is locked for the run (``run_lock``)."""
    with ExitStack() as held:
        return _train(opts, held)


def _train(opts: TrainOptions, held: ExitStack) -> dict[str, Any]:
    from dfmsd_cli.data.loader import resolve_data

    device = resolve_device(opts.device)
    dist = init_distributed(device)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    out = Path(opts.out)
    data = resolve_data(opts.data, opts.split, opts.ann, opts.images)
    if dist.is_main:
        held.enter_context(run_lock(out))
        prepare_run_dir(out, "train", identity_of(opts), opts.resume, opts.overwrite)
        write_config(out, record(opts), "train")
    barrier(dist)
    resuming = (out / "last.pth").is_file() and opts.resume
    state = load_state(out / "last.pth") if resuming else None
    fit_opts = FitOptions(
        out=out,
        epochs=opts.epochs,
        batch_size=opts.batch_size,
        lr=opts.lr,
        warmup_iters=opts.warmup_iters,
        lr_steps=opts.steps,
        grad_clip=opts.grad_clip,
        save_interval=opts.save_interval,
        max_steps=opts.max_steps,
        seed=opts.seed,
        num_workers=opts.num_workers,
    )
    log = MetricsLog(out / "metrics.jsonl", enabled=dist.is_main)
    task = TrainTask(opts, data, resuming)
    summary = fit(task, fit_opts, device=device, dist=dist, log=log, state=state)
    if dist.is_main:
        write_summary(out, summary)
    cleanup(dist)
    return summary


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    """``OUT/summary.json``: the run's summary, atomically (rank 0)."""
    from dfmsd_cli.utils.io import atomic_write_text

    if Path(out).is_dir():
        atomic_write_text(Path(out) / "summary.json", json.dumps(summary, indent=2, default=str))


__all__ = ["TrainOptions", "TrainTask", "train", "DistInfo"]

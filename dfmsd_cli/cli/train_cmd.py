"""``dfmsd train``: a baseline detector (student or teacher), no distillation."""

from __future__ import annotations

from pathlib import Path

import typer

from dfmsd_cli.cli.app import ConfigOption, app, parse_int_list
from dfmsd_cli.data.geometry import parse_img_scale
from dfmsd_cli.utils.console import console


@app.command("train")
def train_cmd(
    model: str = typer.Option(
        ...,
        "--model",
        "-m",
        help="Zoo name {head}_{backbone}, e.g. retina_r50 (see `dfmsd models`).",
    ),
    data: Path | None = typer.Option(
        None, "--data", help="COCO root: ROOT/annotations/instances_{split}.json and ROOT/{split}/."
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Run folder (config.json, last.pth, model.pth, metrics.jsonl)."
    ),
    split: str = typer.Option("train2017", "--split", help="Training split name."),
    val_split: str = typer.Option("val2017", "--val-split", help="Split evaluated at the end."),
    ann: Path | None = typer.Option(None, "--ann", help="Annotation file (overrides --data)."),
    images: Path | None = typer.Option(None, "--images", help="Image folder (overrides --data)."),
    epochs: int = typer.Option(12, "--epochs", help="Epochs (12 = MMDetection 1x, 24 = 2x)."),
    batch_size: int = typer.Option(2, "--batch-size", "-b", help="Images per step (per process)."),
    lr: float = typer.Option(0.01, "--lr", help="Base learning rate of SGD."),
    steps: str | None = typer.Option(
        None, "--steps", help="LR decay epochs, e.g. 8,11 (default: 8/12 and 11/12 of --epochs)."
    ),
    warmup_iters: int = typer.Option(500, "--warmup-iters", help="Linear warm-up iterations."),
    grad_clip: float | None = typer.Option(
        None, "--grad-clip", help="Clip the gradient norm (e.g. 35)."
    ),
    weights: str | None = typer.Option(
        None, "--weights", help="Initial weights: a checkpoint, a state dict, or 'torchvision'."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from last.pth."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run already in --out."),
    img_scale: str = typer.Option(
        "1333,800", "--img-scale", help="Keep-ratio resize bound LONG,SHORT."
    ),
    flip: bool = typer.Option(
        True, "--flip/--no-flip", help="Random horizontal flip (the hflip view)."
    ),
    skip_empty: bool = typer.Option(
        True, "--skip-empty/--keep-empty", help="Skip images without annotations in training."
    ),
    strict: bool = typer.Option(
        False, "--strict", help="Fail on unreadable images instead of skipping them."
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed (weights, order, views)."),
    num_workers: int = typer.Option(2, "--num-workers", help="DataLoader worker processes."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    no_eval: bool = typer.Option(
        False, "--no-eval", help="Skip the final evaluation on --val-split."
    ),
    save_interval: int = typer.Option(
        0, "--save-interval", help="Also checkpoint every N steps (0: each epoch only)."
    ),
    max_steps: int | None = typer.Option(
        None, "--max-steps", help="Stop after N steps (quick runs, benchmarks)."
    ),
    config: str | None = ConfigOption,
) -> None:
    """Train a detector on COCO-format data (SGD, warm-up + step decay, AMP on CUDA, DDP)."""
    from dfmsd_cli.engine.train import TrainOptions, train

    opts = TrainOptions(
        model=model,
        out=out,
        data=data,
        split=split,
        val_split=val_split,
        ann=ann,
        images=images,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        steps=tuple(parse_int_list(steps, "--steps")) if steps else None,
        warmup_iters=warmup_iters,
        grad_clip=grad_clip,
        weights=weights,
        resume=resume,
        overwrite=overwrite,
        img_scale=parse_img_scale(img_scale),
        flip=flip,
        skip_empty=skip_empty,
        strict=strict,
        seed=seed,
        num_workers=num_workers,
        device=device,
        evaluate=not no_eval,
        save_interval=save_interval,
        max_steps=max_steps,
    )
    summary = train(opts)
    from dfmsd_cli.engine.distributed import is_main_process

    if is_main_process():
        _print_summary(summary)


def _print_summary(summary: dict) -> None:
    from rich.table import Table

    table = Table(title="train")
    table.add_column("key")
    table.add_column("value")
    for k, v in summary.items():
        if k not in ("val", "split_seconds_per_step"):
            table.add_row(k, str(v))
    console.print(table)
    if summary.get("val"):
        from dfmsd_cli.eval.metrics import print_metrics

        print_metrics(summary["val"], title="val")

"""``dfmsd eval``: COCO metrics of a checkpoint (or a zoo model with weights)."""

from __future__ import annotations

from pathlib import Path

import typer

from dfmsd_cli.cli.app import ConfigOption, app


@app.command("eval")
def eval_cmd(
    checkpoint: Path | None = typer.Argument(
        None,
        help="A dfmsd checkpoint (model.pth, student.pth, last.pth): the architecture is rebuilt from it.",
    ),
    data: Path | None = typer.Option(
        None, "--data", help="COCO root: ROOT/annotations/instances_{split}.json and ROOT/{split}/."
    ),
    split: str = typer.Option("val2017", "--split", help="Split to evaluate."),
    ann: Path | None = typer.Option(None, "--ann", help="Annotation file (overrides --data)."),
    images: Path | None = typer.Option(None, "--images", help="Image folder (overrides --data)."),
    out: Path = typer.Option(
        Path("results.json"),
        "--out",
        "-o",
        help="Metrics JSON; detections go to <stem>.bbox.json beside it.",
    ),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Zoo name, for a teacher given by --weights instead of CKPT."
    ),
    weights: str | None = typer.Option(
        None, "--weights", help="Weights for --model: a checkpoint, a state dict, or 'torchvision'."
    ),
    random_weights: bool = typer.Option(
        False,
        "--random-weights",
        help="Evaluate --model with random weights (pipeline checks, timing).",
    ),
    img_scale: str | None = typer.Option(
        None,
        "--img-scale",
        help="LONG,SHORT resize bound (default: the checkpoint's, else 1333,800).",
    ),
    batch_size: int = typer.Option(2, "--batch-size", "-b", help="Images per forward pass."),
    num_workers: int = typer.Option(2, "--num-workers", help="DataLoader worker processes."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    max_images: int | None = typer.Option(
        None, "--max-images", help="Evaluate only the first N images (by id)."
    ),
    config: str | None = ConfigOption,
) -> None:
    """Evaluate detections with pycocotools (bbox, and segm for mask models) and print the
    paper's columns: mAP, AP50, AP75, APs, APm, APl, mAR, ARs, ARm, ARl."""
    from rich.console import Console

    from dfmsd_cli.data.geometry import parse_img_scale
    from dfmsd_cli.eval import print_metrics
    from dfmsd_cli.eval.run import evaluate_checkpoint

    name, metrics = evaluate_checkpoint(
        checkpoint,
        data=data,
        split=split,
        ann=ann,
        images=images,
        out=out,
        model=model,
        weights=weights,
        random_weights=random_weights,
        img_scale=parse_img_scale(img_scale) if img_scale else None,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        max_images=max_images,
        warn=Console(stderr=True).print,
    )
    print_metrics(metrics, title=f"{name} on {split}")
    Console().print(f"metrics: {out}   detections: {out.with_name(out.stem + '.bbox.json')}")

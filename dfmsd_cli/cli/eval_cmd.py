"""``dfmsd eval``: COCO metrics of a checkpoint (or a zoo model with weights)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dfmsd_cli.cli.app import app
from dfmsd_cli.cli.options import command
from dfmsd_cli.utils.options import (
    BatchOptions,
    DataOptions,
    DeviceOptions,
    GeometryOptions,
    JsonOptions,
    opt,
    reuse,
)


@dataclass(kw_only=True)
class EvalCLI(DataOptions, GeometryOptions, BatchOptions, DeviceOptions, JsonOptions):
    checkpoint: Path | None = opt(
        None,
        "A dfmsd checkpoint (model.pth, student.pth, last.pth): the architecture is rebuilt "
        "from it.",
        argument=True,
    )
    split: str = reuse(DataOptions, "split", default="val2017", help="Split to evaluate.")
    json: Path = reuse(
        JsonOptions,
        "json",
        default=Path("results.json"),
        help="Metrics JSON file; detections go to <stem>.bbox.json beside it.",
        deprecated=("--out", "-o"),
    )
    model: str | None = opt(
        None, "Zoo name, for a teacher given by --weights instead of CKPT.", short="-m"
    )
    weights: str | None = opt(
        None, "Weights for --model: a checkpoint, a state dict, or 'torchvision'."
    )
    random_weights: bool = opt(
        False, "Evaluate --model with random weights (pipeline checks, timing)."
    )
    img_scale: str | None = reuse(
        GeometryOptions,
        "img_scale",
        default=None,
        help="LONG,SHORT resize bound (default: the checkpoint's, else 1333,800).",
    )
    batch_size: int = reuse(BatchOptions, "batch_size", help="Images per forward pass.")
    max_images: int | None = opt(None, "Evaluate only the first N images (by id).")


@command(app, "eval", EvalCLI)
def eval_cmd(o: EvalCLI) -> None:
    """Evaluate detections with pycocotools (bbox, and segm for mask models) and print the
    paper's columns: mAP, AP50, AP75, APs, APm, APl, mAR, ARs, ARm, ARl."""
    from rich.console import Console

    from dfmsd_cli.data.geometry import parse_img_scale
    from dfmsd_cli.eval import print_metrics
    from dfmsd_cli.eval.run import evaluate_checkpoint

    name, metrics = evaluate_checkpoint(
        o.checkpoint,
        data=o.data,
        split=o.split,
        ann=o.ann,
        images=o.images,
        out=o.json,
        model=o.model,
        weights=o.weights,
        random_weights=o.random_weights,
        img_scale=parse_img_scale(o.img_scale) if o.img_scale else None,
        batch_size=o.batch_size,
        num_workers=o.num_workers,
        device=o.device,
        max_images=o.max_images,
        warn=Console(stderr=True).print,
    )
    print_metrics(metrics, title=f"{name} on {o.split}")
    out = o.json
    Console().print(f"metrics: {out}   detections: {out.with_name(out.stem + '.bbox.json')}")

"""``dfmsd eval``: COCO metrics of a checkpoint (or a zoo model with weights)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dfmsd_cli.cli.app import app
from dfmsd_cli.cli.options import command
from dfmsd_cli.errors import UserError
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

    from dfmsd_cli.data.coco import CocoDetection
    from dfmsd_cli.data.geometry import Geometry, parse_img_scale
    from dfmsd_cli.data.loader import resolve_data
    from dfmsd_cli.eval import evaluate, print_metrics
    from dfmsd_cli.models import build_model
    from dfmsd_cli.models.checkpoint import build_from_checkpoint, load_weights
    from dfmsd_cli.utils.device import resolve_device

    checkpoint, data, split, ann, images, out = (
        o.checkpoint,
        o.data,
        o.split,
        o.ann,
        o.images,
        o.json,
    )
    model, weights, random_weights, img_scale = o.model, o.weights, o.random_weights, o.img_scale
    batch_size, num_workers, device, max_images = (
        o.batch_size,
        o.num_workers,
        o.device,
        o.max_images,
    )
    console = Console(stderr=True)
    dev = resolve_device(device)
    ann_file, image_dir = resolve_data(data, split, ann, images)
    categories = None
    geometry_dict = None
    if checkpoint is not None:
        if model or weights:
            raise UserError(
                "give either CKPT or --model/--weights, not both: the checkpoint "
                "already names its architecture"
            )
        net, meta = build_from_checkpoint(checkpoint, device=dev)
        categories = meta.get("categories") or None
        geometry_dict = meta.get("geometry")
        name = meta.get("model")
    elif model:
        if not weights and not random_weights:
            raise UserError(
                f"--model {model} needs weights: pass --weights FILE (or "
                "'torchvision'), or --random-weights to evaluate random weights"
            )
        probe = CocoDetection(ann_file, image_dir, train=False, probe=False)
        categories = probe.categories
        net = build_model(model, num_classes=probe.num_classes)
        if weights:
            load_weights(net, weights, categories=categories)
        else:
            console.print(f"[yellow]{model}: random weights, expect mAP near 0")
        net = net.to(dev).eval()
        name = model
    else:
        raise UserError(
            "nothing to evaluate: pass a checkpoint (dfmsd eval CKPT) or --model NAME --weights W"
        )
    if img_scale:
        geometry = Geometry(img_scale=parse_img_scale(img_scale))
    elif geometry_dict:
        geometry = Geometry.from_dict(geometry_dict)
    else:
        geometry = Geometry()
    options = {
        "checkpoint": str(checkpoint) if checkpoint else None,
        "model": name,
        "weights": weights,
        "data": str(data) if data else None,
        "split": split,
        "ann": str(ann_file),
        "images": str(image_dir),
        "img_scale": list(geometry.img_scale),
        "batch_size": batch_size,
        "device": str(dev),
        "max_images": max_images,
    }
    metrics = evaluate(
        net,
        ann_file,
        image_dir,
        geometry=geometry,
        batch_size=batch_size,
        device=dev,
        out=out,
        num_workers=num_workers,
        categories=categories,
        max_images=max_images,
        extra={"options": options},
    )
    if not metrics:
        raise UserError(f"no readable image in {image_dir}: check --data/--split/--images")
    print_metrics(metrics, title=f"{name} on {split}")
    Console().print(f"metrics: {out}   detections: {out.with_name(out.stem + '.bbox.json')}")

"""``evaluate_checkpoint``: what ``dfmsd eval`` does, as a library call.

The architecture comes from a dfmsd checkpoint (its categories and geometry too), or from a
zoo name with weights (``--model``/``--weights``, or random weights for pipeline checks).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from dfmsd_cli.errors import UserError


def evaluate_checkpoint(
    checkpoint: Path | None = None,
    *,
    data: Path | None = None,
    split: str = "val2017",
    ann: Path | None = None,
    images: Path | None = None,
    out: Path = Path("results.json"),
    model: str | None = None,
    weights: str | None = None,
    random_weights: bool = False,
    img_scale: tuple[int, int] | None = None,
    batch_size: int = 2,
    num_workers: int = 2,
    device: str = "auto",
    max_images: int | None = None,
    warn: Callable[[str], Any] = print,
) -> tuple[str, dict[str, Any]]:
    """COCO metrics of ``checkpoint`` (or ``model`` with ``weights``) on ``split``; writes
    ``out`` (metrics and options) and ``<stem>.bbox.json`` beside it. Returns (name, metrics)."""
    from dfmsd_cli.data.coco import CocoDetection
    from dfmsd_cli.data.geometry import Geometry
    from dfmsd_cli.data.loader import resolve_data
    from dfmsd_cli.eval.inference import evaluate
    from dfmsd_cli.models import build_model
    from dfmsd_cli.models.checkpoint import build_from_checkpoint, load_weights
    from dfmsd_cli.utils.device import resolve_device

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
            warn(f"[yellow]{model}: random weights, expect mAP near 0")
        net = net.to(dev).eval()
        name = model
    else:
        raise UserError(
            "nothing to evaluate: pass a checkpoint (dfmsd eval CKPT) or --model NAME --weights W"
        )
    if img_scale:
        geometry = Geometry(img_scale=tuple(img_scale))
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
    return name, metrics

"""Batched inference over a COCO dataset and evaluation with pycocotools.

Detections come out of the model in input (resized) coordinates; they are mapped back to the
original image by dividing by each sample's resize factor ``scale`` (an ``hflip`` view is
flipped back first), written as COCO
results (``bbox`` as ``[x, y, w, h]``, labels 1..K mapped to category ids through the
checkpoint's ``categories``), and masks are resized to the original image, thresholded at 0.5
and RLE-encoded, as MMDetection's ``CocoMetric`` does.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from dfmsd_cli.data.geometry import Geometry
from dfmsd_cli.eval.metrics import IOU_TYPES, coco_metrics, load_coco, write_json


@torch.inference_mode()
def predict(
    model: torch.nn.Module,
    dataset,
    *,
    batch_size: int = 2,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    categories: list[dict] | None = None,
    progress: bool = True,
) -> tuple[list[dict], list[int]]:
    """Run ``model`` over ``dataset`` (a ``CocoDetection`` with the ``orig`` view).

    Returns ``(results, image_ids)``: COCO-format results (``segmentation`` added for mask
    models) and the ids of the images actually run (unreadable ones are skipped).
    ``categories`` maps label L to ``categories[L-1]["id"]`` (default: the dataset's).
    """
    from dfmsd_cli.data.loader import make_loader
    from dfmsd_cli.utils.console import make_progress

    device = torch.device(device)
    cats = categories if categories is not None else dataset.categories
    label_to_cat = {i + 1: int(c["id"]) for i, c in enumerate(cats)}
    loader = make_loader(dataset, batch_size, shuffle=False, num_workers=num_workers)
    was_training = model.training
    model.eval()
    results: list[dict] = []
    done: list[int] = []
    use_amp = device.type == "cuda"
    with make_progress(disable=not progress) as bar:
        task = bar.add_task("eval", total=len(loader), info="")
        for batch in loader:
            bar.advance(task)
            if batch is None:
                continue
            images = batch["images"].to(device, non_blocking=True)
            with torch.autocast(device.type, enabled=use_amp):
                out = model(images, batch["image_sizes"])
            for det, meta in zip(out.detections, batch["meta"], strict=True):
                done.append(int(meta["image_id"]))
                results.extend(_to_coco(det, meta, label_to_cat))
            bar.update(task, info=f"{len(results)} detections")
    model.train(was_training)
    return results, done


def _to_coco(det: dict[str, torch.Tensor], meta: dict, label_to_cat: dict[int, int]) -> list[dict]:
    """One image's detections -> COCO results in original-image pixels."""
    h0, w0 = meta["orig_size"]
    h, w = meta["size"]
    boxes = det["boxes"].float().cpu().clone()
    if meta.get("view", "orig") == "hflip":  # back to the unflipped resized image
        boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
    # The exact inverse of the dataset's box transform (original * meta["scale"]); the
    # rounded image sides make w/w0 differ from it by under half an original pixel.
    boxes /= float(meta["scale"])
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w0)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h0)
    scores = det["scores"].float().cpu().tolist()
    labels = det["labels"].cpu().tolist()
    rles = None
    if "masks" in det and len(boxes):
        masks = det["masks"]
        if meta.get("view", "orig") == "hflip":
            masks = masks[..., :h, :w].flip(-1)
        rles = _encode_masks(masks, (h, w), (h0, w0))
    out = []
    for i, (box, score, label) in enumerate(zip(boxes.tolist(), scores, labels, strict=True)):
        cat = label_to_cat.get(int(label))
        if cat is None:  # a label outside the checkpoint's categories (background column)
            continue
        x1, y1, x2, y2 = box
        rec: dict[str, Any] = {
            "image_id": int(meta["image_id"]),
            "category_id": cat,
            "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
            "score": round(float(score), 5),
        }
        if rles is not None:
            rec["segmentation"] = rles[i]
        out.append(rec)
    return out


def _encode_masks(masks: torch.Tensor, size: tuple[int, int], orig: tuple[int, int]) -> list:
    """(n[,1],h',w') probabilities in input coordinates -> RLEs at the original size."""
    m = masks.float().cpu()
    if m.ndim == 3:
        m = m[:, None]
    h, w = size
    m = m[:, :, :h, :w]  # drop padding, if the model pasted into the padded canvas
    m = F.interpolate(m, size=tuple(orig), mode="bilinear", align_corners=False)[:, 0]
    binary = np.asfortranarray((m >= 0.5).numpy().astype(np.uint8).transpose(1, 2, 0))
    rles = mask_utils.encode(binary)
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles


def evaluate(
    model: torch.nn.Module,
    ann_file: str | Path,
    image_dir: str | Path,
    *,
    geometry: Geometry | None = None,
    batch_size: int = 2,
    device: str | torch.device = "cpu",
    out: str | Path | None = None,
    num_workers: int = 0,
    categories: list[dict] | None = None,
    max_images: int | None = None,
    progress: bool = True,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` on a COCO split; returns ``{"bbox": {...}[, "segm": {...}]}``.

    With ``out``, writes the metrics (plus ``images``, ``seconds`` and ``extra``) as JSON to
    ``out`` and the detections to ``<out stem>.bbox.json`` (COCO results format).
    """
    from dfmsd_cli.data.coco import CocoDetection

    dataset = CocoDetection(
        ann_file,
        image_dir,
        geometry=geometry or Geometry(),
        train=False,
        skip_empty=False,
        max_images=max_images,
    )
    t0 = time.perf_counter()
    results, image_ids = predict(
        model,
        dataset,
        batch_size=batch_size,
        device=device,
        num_workers=num_workers,
        categories=categories,
        progress=progress,
    )
    seconds = time.perf_counter() - t0
    coco_gt = load_coco(ann_file)
    has_masks = bool(getattr(model, "has_masks", False)) and _gt_has_segm(coco_gt)
    metrics: dict[str, Any] = {}
    if image_ids:
        for iou_type in IOU_TYPES:
            if iou_type == "segm" and not has_masks:
                continue
            metrics[iou_type] = coco_metrics(coco_gt, results, iou_type, image_ids=image_ids)
    if out is not None:
        out = Path(out)
        det_path = out.with_name(out.stem + ".bbox.json")
        write_json(det_path, results)
        payload = {
            **metrics,
            "images": len(image_ids),
            "detections": len(results),
            "seconds": round(seconds, 2),
            "detections_file": det_path.name,
            **(extra or {}),
        }
        write_json(out, payload)
    return metrics


def _gt_has_segm(coco_gt) -> bool:
    return any(a.get("segmentation") for a in coco_gt.dataset.get("annotations", []))

"""COCO metrics with the paper's columns, through pycocotools' ``COCOeval``.

DFMSD (arXiv 2407.13147) reports, for bbox (and segm for mask models):
mAP (AP@[.50:.95]), AP50, AP75, APs, APm, APl, mAR (AR@100), ARs, ARm, ARl.
They are ``COCOeval.stats`` indices 0-5 and 8-11 (indices 6 and 7 are AR@1 and AR@10).
Values are fractions in [0, 1] (the table prints them x100 as the paper does); COCOeval
reports -1 for an area range without any ground truth, and so do we.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from dfmsd_cli.utils.io import atomic_write_text

PAPER_COLUMNS: tuple[str, ...] = (
    "mAP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "mAR",
    "ARs",
    "ARm",
    "ARl",
)
# COCOeval.summarize() order: AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl.
_STATS_INDEX: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 8, 9, 10, 11)
IOU_TYPES: tuple[str, ...] = ("bbox", "segm")


def load_coco(ann: str | Path | dict) -> COCO:
    """A pycocotools ``COCO`` from a file path or an in-memory dataset dict, without its prints."""
    coco = COCO()
    if isinstance(ann, dict):
        coco.dataset = ann
    else:
        with open(ann) as f:
            coco.dataset = json.load(f)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _empty_results(coco_gt: COCO) -> COCO:
    """A result set with no detections: ``COCO.loadRes`` rejects an empty list."""
    return load_coco(
        {
            "images": coco_gt.dataset.get("images", []),
            "categories": coco_gt.dataset.get("categories", []),
            "annotations": [],
        }
    )


def coco_metrics(
    coco_gt: COCO,
    detections: Sequence[dict],
    iou_type: str = "bbox",
    image_ids: Iterable[int] | None = None,
) -> dict[str, float]:
    """Evaluate COCO-format ``detections`` against ``coco_gt`` and return the paper's columns.

    ``detections``: ``[{"image_id", "category_id", "score", "bbox": [x, y, w, h]}]`` (original
    image pixels), plus ``"segmentation"`` (RLE) for ``iou_type="segm"``. ``image_ids``
    restricts the evaluation to the images that were actually run (default: all images of
    ``coco_gt``), so skipped images do not count as misses. Standard COCO protocol otherwise:
    10 IoU thresholds .50:.05:.95, 101-point interpolated precision, maxDets 100, crowd
    ground truth matched but ignored. No detections gives 0.0 (not an exception).
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    ids = sorted(coco_gt.getImgIds()) if image_ids is None else sorted({int(i) for i in image_ids})
    if not ids:
        raise ValueError("no images to evaluate")
    key = "segmentation" if iou_type == "segm" else "bbox"
    # loadRes mutates its input (adds area/id/iscrowd): hand it copies.
    wanted = set(ids)
    dets = [dict(d) for d in detections if int(d["image_id"]) in wanted and key in d]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(dets) if dets else _empty_results(coco_gt)
        ev = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        ev.params.imgIds = ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = np.asarray(ev.stats, dtype=np.float64)
    return {name: float(stats[i]) for name, i in zip(PAPER_COLUMNS, _STATS_INDEX, strict=True)}


def _fmt(value: Any) -> str:
    if not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
        return "-"  # -1: no ground truth in this area range
    return f"{100.0 * value:.1f}"


def metrics_table(metrics: dict[str, dict[str, float]], title: str = "COCO metrics"):
    """A rich ``Table``: one row per IoU type, the paper's columns, values x100."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("type", style="bold")
    for col in PAPER_COLUMNS:
        table.add_column(col, justify="right")
    for iou_type, row in metrics.items():
        table.add_row(iou_type, *(_fmt(row.get(col)) for col in PAPER_COLUMNS))
    return table


def print_metrics(metrics: dict[str, dict[str, float]], title: str = "COCO metrics") -> None:
    """Print ``{"bbox": {...}, "segm": {...}}`` as a rich table (paper's columns, x100)."""
    from rich.console import Console

    Console().print(metrics_table(metrics, title=title))


def write_json(path: str | Path, payload: Any) -> Path:
    """Write ``payload`` as indented JSON, atomically."""
    path = Path(path)
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
    return path

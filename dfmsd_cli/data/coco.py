"""COCO-format detection dataset with explicit, named views (``orig``, ``hflip``).

Contract (docs/architecture.md, "Dataset"): item ``k`` is image ``k // len(views)`` seen
through view ``views[k % len(views)]``; a sample holds the resized, normalised, unpadded image,
its boxes (xyxy, resized + view coordinates) and contiguous labels 1..K.

Annotation handling follows MMDetection's ``CocoDataset._parse_ann_info``:
``iscrowd`` boxes are never training targets (COCOeval handles them at evaluation), boxes are
clipped to the image and zero/negative-size ones dropped (counted in ``stats``), and labels are
the categories sorted by COCO id, numbered from 1 (0 is background in torchvision heads).

Bad images are found at construction with a cheap probe (header + end marker, see
``data/images.py``) and left out of ``image_ids``; a file that passes the probe but fails to
decode later is skipped at load time: ``get`` returns ``None`` (eval / precompute: ``collate``
drops it) or, with ``train=True``, the next readable image, so a DataLoader never crashes.
``strict=True`` turns both cases into a ``UserError``.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dfmsd_cli.data.geometry import (
    Geometry,
    apply_view_boxes,
    apply_view_image,
    check_view,
    normalize,
    resize_image,
)
from dfmsd_cli.data.images import ImageError, load_rgb, probe_image
from dfmsd_cli.errors import UserError

log = logging.getLogger("dfmsd_cli.data")

_MAX_LISTED = 5  # bad files named in one warning
STAT_KEYS = (
    "images_in_json",  # images listed in the JSON
    "images",  # images in the dataset (readable, and non-empty with skip_empty)
    "boxes",  # training boxes kept
    "unreadable_images",  # failed the probe at construction
    "empty_images",  # no usable box (kept unless skip_empty)
    "skipped_empty",
    "crowd_boxes",  # iscrowd=1, not training targets
    "degenerate_boxes",  # zero/negative size after clipping to the image
    "orphan_annotations",  # image_id not in 'images'
    "size_mismatch",  # file size differs from the JSON's width/height
    "load_failures",  # decode failures at load time (per process)
)


def load_coco_json(ann_file: str | Path) -> dict:
    """Read and validate a COCO instances JSON; ``UserError`` (one line) when malformed."""
    path = Path(ann_file)
    if not path.is_file():
        raise UserError(
            f"annotation file {path} not found: pass an existing COCO JSON with --ann FILE "
            "or --data ROOT holding ROOT/annotations/instances_SPLIT.json"
        )
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(
            f"annotation file {path} is not valid JSON ({exc}): pass a COCO instances JSON"
        ) from exc
    if not isinstance(data, dict):
        raise UserError(f"annotation file {path} is not a JSON object: pass a COCO instances JSON")
    missing = [k for k in ("images", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise UserError(
            f"annotation file {path} lacks the list(s) {', '.join(missing)}: "
            "a COCO instances JSON needs 'images', 'annotations' and 'categories'"
        )
    data.setdefault("annotations", [])
    _require_keys(path, data["images"], ("id", "file_name"), "images")
    _require_keys(path, data["categories"], ("id",), "categories")
    _require_keys(path, data["annotations"], ("image_id", "category_id", "bbox"), "annotations")
    return data


def _require_keys(path: Path, items: list, keys: tuple[str, ...], what: str) -> None:
    for i, item in enumerate(items):
        if not isinstance(item, dict) or any(k not in item for k in keys):
            raise UserError(
                f"annotation file {path}: {what}[{i}] lacks one of the keys {', '.join(keys)}: "
                "fix the JSON (COCO instances format)"
            )


class CocoDetection(Dataset):
    """COCO detection dataset: ``ds[k]`` / ``ds.get(index, view)`` -> sample dict.

    Args:
        ann_file: COCO instances JSON.
        image_dir: folder holding the ``file_name`` of every image.
        geometry: resize/normalise geometry (MMDetection keep-ratio resize).
        views: named views, each image appears once per view.
        train: on a load-time decode failure return the next readable image instead of None.
        skip_empty: leave out images with no usable (non-crowd, non-degenerate) box.
        strict: raise ``UserError`` on an unreadable image instead of skipping it.
        with_masks: decode polygon / RLE segmentations into ``masks`` (pycocotools).
        probe: check every image's header and end marker at construction.
        max_images: keep only the first N images (after sorting by id), for quick runs.
    """

    def __init__(
        self,
        ann_file: str | Path,
        image_dir: str | Path,
        geometry: Geometry | None = None,
        views: tuple[str, ...] | list[str] = ("orig",),
        train: bool = True,
        skip_empty: bool = False,
        strict: bool = False,
        with_masks: bool = False,
        probe: bool = True,
        max_images: int | None = None,
    ) -> None:
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        self.geometry = geometry if geometry is not None else Geometry()
        self.views = tuple(check_view(v) for v in views)
        if not self.views:
            raise UserError("no views given: use at least one of orig, hflip")
        self.train = train
        self.skip_empty = skip_empty
        self.strict = strict
        self.with_masks = with_masks
        self.keep_raw = False
        if not self.image_dir.is_dir():
            raise UserError(
                f"image folder {self.image_dir} not found: pass the folder of the images with "
                "--images DIR or --data ROOT holding ROOT/SPLIT/"
            )
        data = load_coco_json(self.ann_file)
        self.stats: Counter = Counter({k: 0 for k in STAT_KEYS})
        self._build(data, probe=probe, max_images=max_images)

    # ------------------------------------------------------------------ construction
    def _build(self, data: dict, probe: bool, max_images: int | None) -> None:
        cats = sorted(data["categories"], key=lambda c: c["id"])
        self.categories: list[dict] = [
            {"id": int(c["id"]), "name": str(c.get("name", c["id"]))} for c in cats
        ]
        if len({c["id"] for c in self.categories}) != len(self.categories):
            raise UserError(
                f"annotation file {self.ann_file}: duplicate category ids: make them unique"
            )
        self.cat_id_to_label = {c["id"]: i + 1 for i, c in enumerate(self.categories)}

        images = sorted(data["images"], key=lambda im: im["id"])
        by_image: dict[int, list[dict]] = {int(im["id"]): [] for im in images}
        for ann in data["annotations"]:
            cid = ann["category_id"]
            if cid not in self.cat_id_to_label:
                raise UserError(
                    f"annotation file {self.ann_file}: category id {cid} (annotation "
                    f"{ann.get('id', '?')}) is missing from 'categories': add it to 'categories' "
                    "or remove its annotations"
                )
            lst = by_image.get(int(ann["image_id"]))
            if lst is None:
                self.stats["orphan_annotations"] += 1
            else:
                lst.append(ann)
        self.stats["images_in_json"] = len(images)
        self.has_segmentation = any(a.get("segmentation") for a in data["annotations"])

        records: list[dict] = []
        bad: list[str] = []
        for im in images:
            if max_images is not None and len(records) >= max_images:
                break
            rec = self._parse_image(im, by_image[int(im["id"])])
            if probe and not self._probe(rec, bad):
                continue
            if not len(rec["labels"]):
                self.stats["empty_images"] += 1
                if self.skip_empty:
                    self.stats["skipped_empty"] += 1
                    continue
            records.append(rec)
        if bad:
            self.stats["unreadable_images"] = len(bad)
            listed = "; ".join(bad[:_MAX_LISTED]) + (" ..." if len(bad) > _MAX_LISTED else "")
            if self.strict:
                raise UserError(
                    f"{len(bad)} unreadable image(s) in {self.image_dir}: {listed}: "
                    "fix or remove them, or drop --strict to skip them"
                )
            log.warning(
                "skipped %d unreadable image(s) in %s: %s", len(bad), self.image_dir, listed
            )
        if self.stats["size_mismatch"]:
            log.warning(
                "%d image(s) in %s differ in size from %s: their boxes may be wrong",
                self.stats["size_mismatch"],
                self.image_dir,
                self.ann_file.name,
            )
        self._records = records
        self.image_ids: list[int] = [r["id"] for r in records]
        self.stats["images"] = len(records)
        self.stats["boxes"] = int(sum(len(r["labels"]) for r in records))

    def _parse_image(self, im: dict, anns: list[dict]) -> dict:
        """Boxes xyxy (clipped to the image), labels 1..K and segmentations of one image."""
        width, height = im.get("width"), im.get("height")
        boxes, labels, segs = [], [], []
        for ann in anns:
            if ann.get("iscrowd", 0):
                self.stats["crowd_boxes"] += 1
                continue
            bbox = ann["bbox"]
            if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
                raise UserError(
                    f"annotation file {self.ann_file}: annotation {ann.get('id', '?')} has bbox "
                    f"{bbox!r}: use [x, y, width, height]"
                )
            x, y, w, h = (float(v) for v in bbox)
            x1, y1, x2, y2 = x, y, x + w, y + h
            if width and height:
                x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
                y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
            if w <= 0 or h <= 0 or x2 <= x1 or y2 <= y1:
                self.stats["degenerate_boxes"] += 1
                continue
            boxes.append((x1, y1, x2, y2))
            labels.append(self.cat_id_to_label[ann["category_id"]])
            if self.with_masks:
                segs.append(ann.get("segmentation") or None)
        return {
            "id": int(im["id"]),
            "file_name": str(im["file_name"]),
            "width": int(width) if width else None,
            "height": int(height) if height else None,
            "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            "labels": np.asarray(labels, dtype=np.int64),
            "segs": segs,
        }

    def _probe(self, rec: dict, bad: list[str]) -> bool:
        try:
            info = probe_image(self.image_dir / rec["file_name"])
        except ImageError as exc:
            bad.append(f"{rec['file_name']} ({exc})")
            return False
        if rec["width"] and (info.width, info.height) != (rec["width"], rec["height"]):
            self.stats["size_mismatch"] += 1
        rec["width"], rec["height"] = info.width, info.height
        return True

    # ------------------------------------------------------------------ access
    @property
    def num_classes(self) -> int:
        return len(self.categories)

    def __len__(self) -> int:
        return len(self._records) * len(self.views)

    def __getitem__(self, k: int) -> dict | None:
        if not 0 <= k < len(self):
            raise IndexError(f"item {k} out of range for a dataset of {len(self)} items")
        n = len(self.views)
        return self.get(k // n, self.views[k % n])

    def image_info(self, index: int) -> dict:
        """COCO facts of image ``index``: id, file_name, width, height (from probe or JSON)."""
        r = self._records[index]
        return {k: r[k] for k in ("id", "file_name", "width", "height")}

    def image_path(self, index: int) -> Path:
        return self.image_dir / self._records[index]["file_name"]

    def aspect_flags(self) -> list[int]:
        """Per item: 1 if the image is landscape (w >= h), else 0 (for aspect-ratio batching)."""
        flags = [int((r["width"] or 1) >= (r["height"] or 1)) for r in self._records]
        return [f for f in flags for _ in self.views]

    def get(self, index: int, view: str) -> dict | None:
        """Sample of image ``index`` seen through ``view`` (see the module docstring)."""
        check_view(view)
        try:
            return self._load(index, view)
        except ImageError as exc:
            if self.strict:
                raise UserError(f"{exc}: fix or remove the image, or drop --strict") from exc
            self.stats["load_failures"] += 1
            log.warning("skipped unreadable image: %s", exc)
        if not self.train:
            return None
        for step in range(1, len(self._records)):
            try:
                return self._load((index + step) % len(self._records), view)
            except ImageError as exc:
                self.stats["load_failures"] += 1
                log.warning("skipped unreadable image: %s", exc)
        raise UserError(f"no readable image in {self.image_dir}: check the image folder")

    def _load(self, index: int, view: str) -> dict:
        rec = self._records[index]
        img = load_rgb(self.image_dir / rec["file_name"])
        h0, w0 = img.shape[:2]
        g = self.geometry
        s = g.scale_factor(w0, h0)
        raw = resize_image(img, g)
        h, w = int(raw.shape[1]), int(raw.shape[2])

        boxes = torch.from_numpy(rec["boxes"]) * s
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        boxes = apply_view_boxes(boxes, view, w)
        raw = apply_view_image(raw, view)
        sample: dict[str, Any] = {
            "image": normalize(raw, g),
            "image_id": rec["id"],
            "index": index,
            "view": view,
            "orig_size": (h0, w0),
            "size": (h, w),
            "scale": float(s),
            "boxes": boxes.contiguous(),
            "labels": torch.from_numpy(rec["labels"].copy()),
        }
        if self.with_masks and self.has_segmentation:
            masks = decode_masks(rec["segs"], rec["boxes"], (h0, w0), (h, w), s)
            sample["masks"] = apply_view_image(masks, view).contiguous()
        if self.keep_raw:
            sample["raw"] = raw
        return sample

    def __repr__(self) -> str:
        return (
            f"CocoDetection({self.ann_file.name}, images={len(self._records)}, "
            f"classes={self.num_classes}, views={self.views})"
        )


def decode_masks(
    segs: list,
    boxes: np.ndarray,
    orig_hw: tuple[int, int],
    out_hw: tuple[int, int],
    scale: float,
) -> torch.Tensor:
    """Instance masks ``uint8 (n, h, w)`` at the resized size, from COCO segmentations.

    Polygons are scaled by ``scale`` and rasterised directly at the output size (exact edges);
    RLE (compressed or not) is decoded at the original size and resized nearest-neighbour.
    An annotation without a usable segmentation gets its box as mask.
    """
    from pycocotools import mask as mask_utils

    h0, w0 = orig_hw
    h, w = out_hw
    out = torch.zeros((len(segs), h, w), dtype=torch.uint8)
    for i, seg in enumerate(segs):
        m = None
        if isinstance(seg, list):
            polys = [np.asarray(p, dtype=np.float64) * scale for p in seg if len(p) >= 6]
            if polys:
                rles = mask_utils.frPyObjects([p.tolist() for p in polys], h, w)
                m = torch.from_numpy(_decode(mask_utils.merge(rles)))
        elif isinstance(seg, dict) and "counts" in seg:
            rle = seg
            if isinstance(seg["counts"], list):
                rle = mask_utils.frPyObjects(seg, *seg.get("size", (h0, w0)))
            full = torch.from_numpy(_decode(rle))
            m = F.interpolate(full[None, None].float(), size=(h, w), mode="nearest")[0, 0]
        if m is None:
            x1, y1, x2, y2 = (boxes[i] * scale).tolist()
            out[i, int(y1) : int(np.ceil(y2)), int(x1) : int(np.ceil(x2))] = 1
        else:
            out[i] = (m > 0).to(torch.uint8)
    return out


def _decode(rle: dict) -> np.ndarray:
    """pycocotools ``decode`` without its NumPy-2 ``__array__(copy=...)`` DeprecationWarning."""
    from pycocotools import mask as mask_utils

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return np.array(mask_utils.decode(rle))

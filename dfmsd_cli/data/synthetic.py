"""A deterministic synthetic COCO dataset: coloured, textured shapes on cluttered backgrounds.

Five classes, each a shape with its own hue (``circle`` red, ``square`` blue, ``triangle``
green, ``star`` yellow, ``cross`` magenta), with per-object textures (solid, stripes, checker,
gradient), small (~8-22 px) to large (up to 60 % of the short side) objects, low-saturation
background clutter (lines, blobs, outlines) and occlusion (objects drawn in order; a placement
is kept only while every earlier object stays at least half visible). About 5 % of the images
hold no object at all (exercising empty-image handling).

Segmentation: an unoccluded object gets its polygon; an occluded one gets the compressed RLE of
its visible pixels (so both pycocotools paths are used); ``bbox`` and ``area`` describe the
visible part, as in COCO. Category ids are deliberately non-contiguous (1, 3, 5, 7, 9) so the
label <-> category-id mapping is exercised.

Determinism: image ``i`` of split ``s`` is drawn from ``SeedSequence([seed, s, i])`` only, so
files are bit-identical for a given seed (with the same Pillow/libjpeg) and image ``i`` does
not depend on the number of images requested.
"""

from __future__ import annotations

import colorsys
import json
import math
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dfmsd_cli.errors import UserError
from dfmsd_cli.utils.io import atomic_write_text

SYNTHETIC_TAG = "dfmsd synthetic shapes"
CLASSES: tuple[tuple[int, str, float], ...] = (
    # (COCO id, name, hue in degrees)
    (1, "circle", 0.0),
    (3, "square", 220.0),
    (5, "triangle", 120.0),
    (7, "star", 55.0),
    (9, "cross", 300.0),
)
SPLITS: dict[str, int] = {"train2017": 0, "val2017": 1}
_TEXTURES = ("solid", "stripes", "checker", "gradient")


def make_synthetic(
    out: str | Path,
    images: int = 200,
    seed: int = 0,
    *,
    val_images: int | None = None,
    min_size: int = 160,
    max_size: int = 320,
    max_objects: int = 8,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write a COCO-layout synthetic dataset to ``out`` and return ``out``.

    Layout: ``out/annotations/instances_{train2017,val2017}.json``, ``out/train2017/``,
    ``out/val2017/``; ``images`` training images and ``val_images`` (default ``images // 4``,
    at least 1) validation images with long side in [``min_size``, ``max_size``] px.
    Refuses to write into a folder holding another dataset; an earlier synthetic dataset
    there is replaced only with ``overwrite=True``.
    """
    out = Path(out)
    if images < 1:
        raise UserError(f"--images must be >= 1, got {images}")
    if not 32 <= min_size <= max_size:
        raise UserError(f"image sizes must satisfy 32 <= min {min_size} <= max {max_size}")
    _check_target(out, overwrite)
    n_val = max(1, images // 4) if val_images is None else val_images
    counts = {"train2017": images, "val2017": n_val}
    total = images + n_val

    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=True)
        bar.start()
        task = bar.add_task("synthetic images", total=total)
    try:
        next_id = 1
        for split, n in counts.items():
            img_dir = out / split
            if img_dir.exists():
                shutil.rmtree(img_dir)
            img_dir.mkdir(parents=True)
            imgs, anns = [], []
            for i in range(n):
                rng = np.random.default_rng(np.random.SeedSequence([seed, SPLITS[split], i]))
                image, objects = render_image(rng, min_size, max_size, max_objects)
                image_id = next_id
                next_id += 1
                ext = "png" if i % 10 == 9 else "jpg"  # a few lossless PNGs too
                name = f"{image_id:012d}.{ext}"
                if ext == "jpg":
                    image.save(img_dir / name, quality=92, subsampling=0)
                else:
                    image.save(img_dir / name, optimize=False)
                imgs.append(
                    {
                        "id": image_id,
                        "file_name": name,
                        "width": image.width,
                        "height": image.height,
                        "license": 0,
                    }
                )
                for obj in objects:
                    anns.append({"id": len(anns) + 1, "image_id": image_id, **obj})
                if bar is not None:
                    bar.advance(task)
            coco = {
                "info": {
                    "description": SYNTHETIC_TAG,
                    "version": "1",
                    "year": 2024,
                    "seed": seed,
                    "split": split,
                },
                "licenses": [{"id": 0, "name": "CC0", "url": ""}],
                "images": imgs,
                "annotations": anns,
                "categories": [
                    {"id": cid, "name": name, "supercategory": "shape"} for cid, name, _ in CLASSES
                ],
            }
            # Annotations last and atomically: a killed run never leaves a valid-looking root.
            atomic_write_text(
                out / "annotations" / f"instances_{split}.json",
                json.dumps(coco, separators=(",", ":")),
            )
    finally:
        if bar is not None:
            bar.stop()
    return out


def _check_target(out: Path, overwrite: bool) -> None:
    ann = out / "annotations" / "instances_train2017.json"
    if not ann.exists():
        if out.exists() and any(out.iterdir()) and not (out / "annotations").exists():
            names = {p.name for p in out.iterdir()}
            if names & set(SPLITS):
                raise UserError(
                    f"{out} already holds image folders: choose an empty or new --out folder"
                )
        return
    try:
        info = json.loads(ann.read_text()).get("info", {})
    except (json.JSONDecodeError, OSError):
        info = {}
    if info.get("description") != SYNTHETIC_TAG:
        raise UserError(
            f"{out} already holds a dataset that is not synthetic: choose another --out"
        )
    if not overwrite:
        raise UserError(
            f"{out} already holds a synthetic dataset: pass --overwrite to replace it "
            "or choose another --out"
        )


# ---------------------------------------------------------------------------- rendering
def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((h % 360.0) / 360.0, s, v)) * 255.0


def _shape_polygon(kind: str, cx: float, cy: float, r: float, rng) -> list[tuple[float, float]]:
    """Vertices of a class shape of circumradius ``r`` centred at (cx, cy)."""
    if kind == "circle":
        n = 28
        angles = [2 * math.pi * k / n for k in range(n)]
        radii = [r] * n
    elif kind == "square":
        a0 = math.radians(rng.uniform(-20, 20)) + math.pi / 4
        angles = [a0 + math.pi / 2 * k for k in range(4)]
        radii = [r] * 4
    elif kind == "triangle":
        a0 = rng.uniform(0, 2 * math.pi)
        angles = [a0 + 2 * math.pi / 3 * k for k in range(3)]
        radii = [r] * 3
    elif kind == "star":
        a0 = rng.uniform(0, 2 * math.pi)
        angles = [a0 + math.pi / 5 * k for k in range(10)]
        radii = [r if k % 2 == 0 else 0.45 * r for k in range(10)]
    elif kind == "cross":
        a0 = math.radians(rng.uniform(-25, 25))
        t = 0.38  # arm half-width relative to r
        pts = [(t, 1), (t, t), (1, t), (1, -t), (t, -t), (t, -1),
               (-t, -1), (-t, -t), (-1, -t), (-1, t), (-t, t), (-t, 1)]  # fmt: skip
        ca, sa = math.cos(a0), math.sin(a0)
        s = r / math.hypot(1, t)
        return [(cx + s * (x * ca - y * sa), cy + s * (x * sa + y * ca)) for x, y in pts]
    else:
        raise ValueError(kind)
    return [
        (cx + q * math.cos(a), cy + q * math.sin(a)) for a, q in zip(angles, radii, strict=True)
    ]


def _texture(rng, h: int, w: int, base: np.ndarray) -> np.ndarray:
    """An (h, w, 3) float texture around ``base`` colour."""
    kind = _TEXTURES[int(rng.integers(len(_TEXTURES)))]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "solid":
        f = np.ones((h, w), np.float32)
    elif kind == "stripes":
        period = rng.uniform(3, 8)
        d = [xx, yy, xx + yy, xx - yy][int(rng.integers(4))]
        f = np.where((d // period) % 2 == 0, 1.0, 0.6).astype(np.float32)
    elif kind == "checker":
        period = rng.uniform(3, 7)
        f = np.where(((xx // period) + (yy // period)) % 2 == 0, 1.0, 0.7).astype(np.float32)
    else:
        t = (xx / max(w - 1, 1)) if rng.random() < 0.5 else (yy / max(h - 1, 1))
        f = (0.65 + 0.35 * t).astype(np.float32)
    tex = f[..., None] * base[None, None, :] + rng.normal(0, 6, (h, w, 3))
    return np.clip(tex, 0, 255)


def _background(rng, h: int, w: int) -> np.ndarray:
    """Low-saturation gradient plus noise, (h, w, 3) float."""
    c0 = _hsv(rng.uniform(0, 360), rng.uniform(0, 0.25), rng.uniform(0.3, 0.85))
    c1 = _hsv(rng.uniform(0, 360), rng.uniform(0, 0.25), rng.uniform(0.3, 0.85))
    ang = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (xx * math.cos(ang) + yy * math.sin(ang)) / max(h, w)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    return img + rng.normal(0, 8, (h, w, 3))


def _clutter(rng, draw: ImageDraw.ImageDraw, h: int, w: int) -> None:
    """Distractors of low saturation: lines, blobs and outlines that are not objects."""
    for _ in range(int(rng.integers(5, 25))):
        hsv = _hsv(rng.uniform(0, 360), rng.uniform(0, 0.3), rng.uniform(0.15, 0.95))
        col = tuple(int(c) for c in hsv)
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        kind = rng.integers(3)
        if kind == 0:
            x1, y1 = x0 + rng.normal(0, w / 4), y0 + rng.normal(0, h / 4)
            draw.line([(x0, y0), (x1, y1)], fill=col, width=int(rng.integers(1, 4)))
        elif kind == 1:
            rx, ry = rng.uniform(2, 14), rng.uniform(2, 14)
            draw.ellipse([x0 - rx, y0 - ry, x0 + rx, y0 + ry], fill=col)
        else:
            rx, ry = rng.uniform(5, 30), rng.uniform(5, 30)
            draw.rectangle([x0 - rx, y0 - ry, x0 + rx, y0 + ry], outline=col, width=1)


def _image_size(rng, min_size: int, max_size: int) -> tuple[int, int]:
    long_side = int(rng.integers(min_size, max_size + 1))
    aspect = float(rng.choice([1.0, 4 / 3, 3 / 2, 16 / 9]))
    short_side = max(32, int(round(long_side / aspect)))
    portrait = rng.random() < 0.3
    return (short_side, long_side) if portrait else (long_side, short_side)


def render_image(
    rng: np.random.Generator, min_size: int = 160, max_size: int = 320, max_objects: int = 8
) -> tuple[Image.Image, list[dict]]:
    """Draw one image; return it and its COCO annotations (without ``id``/``image_id``)."""
    from pycocotools import mask as mask_utils

    w, h = _image_size(rng, min_size, max_size)
    canvas = _background(rng, h, w)
    clutter = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    _clutter(rng, ImageDraw.Draw(clutter), h, w)
    canvas = np.asarray(clutter, dtype=np.float32).copy()

    n_obj = 0 if rng.random() < 0.05 else int(rng.integers(1, max_objects + 1))
    owner = np.full((h, w), -1, dtype=np.int32)  # which object owns each pixel (top-most)
    objects: list[dict] = []
    full_area: list[int] = []
    for _ in range(n_obj):
        cls = int(rng.integers(len(CLASSES)))
        cid, kind, hue = CLASSES[cls]
        u = rng.random()
        short = min(h, w)
        if u < 0.4:
            r = rng.uniform(5, 11)  # small: ~10-22 px across
        elif u < 0.8:
            r = rng.uniform(12, 32)
        else:
            r = rng.uniform(32, max(33.0, 0.3 * short))
        r = min(r, 0.45 * short)
        for _attempt in range(10):
            cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
            poly = _shape_polygon(kind, cx, cy, r, rng)
            m_img = Image.new("L", (w, h), 0)
            ImageDraw.Draw(m_img).polygon(poly, fill=1)
            m = np.asarray(m_img, dtype=bool)
            if m.sum() < 12:
                continue
            trial = owner.copy()
            trial[m] = len(objects)
            if all((trial == j).sum() >= 0.5 * full_area[j] for j in range(len(objects))):
                break
        else:
            continue
        owner = trial
        full_area.append(int(m.sum()))
        base = _hsv(hue + rng.uniform(-12, 12), rng.uniform(0.65, 1.0), rng.uniform(0.65, 1.0))
        ys, xs = np.nonzero(m)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        patch = canvas[y0:y1, x0:x1]
        pm = m[y0:y1, x0:x1]
        patch[pm] = _texture(rng, y1 - y0, x1 - x0, base)[pm]
        objects.append({"category_id": cid, "poly": poly, "mask_area": int(m.sum())})

    anns = []
    for j, obj in enumerate(objects):
        vis = owner == j
        area = int(vis.sum())
        if area == obj["mask_area"]:
            xs, ys = [p[0] for p in obj["poly"]], [p[1] for p in obj["poly"]]
            x0, y0 = max(0.0, min(xs)), max(0.0, min(ys))
            x1, y1 = min(float(w), max(xs)), min(float(h), max(ys))
            seg: list | dict = [[round(v, 2) for p in obj["poly"] for v in p]]
            bbox = [x0, y0, x1 - x0, y1 - y0]
            # COCO's area of a polygon: pixels of its pycocotools rasterisation (what annToMask
            # gives and COCOeval buckets by), not the count of the PIL-drawn pixels.
            area = int(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects(seg, h, w))))
        else:
            rle = mask_utils.encode(np.asfortranarray(vis.astype(np.uint8)))
            bbox = [float(v) for v in mask_utils.toBbox(rle)]
            seg = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
        anns.append(
            {
                "category_id": obj["category_id"],
                "bbox": [round(v, 2) for v in bbox],
                "area": float(area),
                "iscrowd": 0,
                "segmentation": seg,
            }
        )
    image = Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8))
    return image, anns

"""``precompute --dry-run``: the projected store size (from image sizes and the encoding's
measured compression) and time (one timed teacher pass) — nothing is written."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from dfmsd_cli.store import schema
from dfmsd_cli.store.create import store_exists
from dfmsd_cli.store.reader import TeacherStore

if TYPE_CHECKING:
    from dfmsd_cli.data.coco import CocoDetection
    from dfmsd_cli.data.geometry import Geometry


class PlannedStore(Protocol):
    """What a projection reads of ``PrecomputeOptions`` (precompute imports this module)."""

    geometry: Geometry
    dtype: str
    codec: str
    keepbits: int | None
    batch_size: int


# Stored / raw bytes (raw = the encoding's own item size) measured on real-image retina_r50
# features (docs/store.md; `dfmsd bench store`): (codec, dtype, keepbits) -> ratio.
EXPECTED_RATIO = {
    ("blosc", "float16", None): 0.75,
    ("blosc", "uint8", None): 0.90,
    ("zstd", "float16", None): 0.91,
    ("zstd", "uint8", None): 0.94,
    ("blosc", "bfloat16", None): 0.59,
    ("blosc", "float16", 7): 0.60,
    ("blosc", "float16", 5): 0.47,
    ("blosc", "float16", 3): 0.34,
    ("blosc", "bfloat16", 5): 0.465,
    ("blosc", "bfloat16", 3): 0.335,
}


def expected_ratio(codec: str, dtype: str, keepbits: int | None) -> float:
    """Measured stored/raw ratio of an encoding; unmeasured keepbits interpolate linearly in k
    between the measured ones (a projection, said so where it is printed)."""
    if (codec, dtype, keepbits) in EXPECTED_RATIO:
        return EXPECTED_RATIO[(codec, dtype, keepbits)]
    known = sorted(
        (k or {"float16": 10, "bfloat16": 7}.get(dtype, 8), r)
        for (c, d, k), r in EXPECTED_RATIO.items()
        if c == codec and d == dtype
    )
    if not known or keepbits is None:
        return EXPECTED_RATIO.get((codec, dtype, None), 0.75)
    return float(np.interp(keepbits, [k for k, _ in known], [r for _, r in known]))


def plan_summary(
    ds: CocoDetection, o: PlannedStore, strides: list[int], channels: int, views: list[str]
) -> dict[str, float]:
    """Raw bytes per image of the planned store (features + spatial statistics), from sizes."""
    item = 1 if o.dtype == "uint8" else 2
    total = 0
    for i in range(len(ds.image_ids)):
        info = ds.image_info(i)
        w, h = o.geometry.padded_size(info["width"], info["height"])
        for s in strides:
            hw = math.ceil(h / s) * math.ceil(w / s)
            total += len(views) * (channels * hw * item + 4 * hw)
    n = max(1, len(ds.image_ids))
    return {"raw_bytes": float(total), "raw_bytes_per_image": total / n}


def dry_run(ds, o, model, device, strides, views, start, stop, pad_sizes, path) -> dict:
    """Projected size (from image sizes) and time (one timed teacher pass) — writes nothing."""
    est = plan_summary(ds, o, strides, model.out_channels, views)
    n_range = stop - start
    shapes = [pad_sizes[i] for i in range(start, stop)] or [pad_sizes[0]]
    shape = max(set(shapes), key=shapes.count)  # the most common padded shape
    bsz = min(o.batch_size, max(1, n_range)) * len(views)
    x = torch.zeros(bsz, 3, *shape, device=device)
    with torch.inference_mode():
        model(x[:1])  # warm-up
        t0 = time.perf_counter()
        model(x)
        per_image = (time.perf_counter() - t0) / (bsz / len(views))
    done = 0
    if store_exists(path):
        d = TeacherStore.open(path).done()[start:stop]
        done = int((d != schema.DONE_PENDING).sum())
    todo = n_range - done
    ratio = expected_ratio(o.codec, o.dtype, o.keepbits)
    return {
        "path": path,
        "dry_run": True,
        "images": len(ds.image_ids),
        "range": [start, stop],
        "todo": todo,
        "raw_bytes_per_image": est["raw_bytes_per_image"],
        "projected_bytes": est["raw_bytes"] * ratio,
        "expected_compression": ratio,
        "projected_seconds": per_image * todo,
        "seconds_per_image": per_image,
        "probe_shape": list(shape),
    }

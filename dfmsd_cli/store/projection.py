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
from dfmsd_cli.store.quantize import FLOAT_DTYPES
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
    pca: int | None
    store_logits: bool
    block: int


# Stored / raw bytes (raw = the encoding's own item size) measured on real-image retina_r50
# features (docs/store.md; `dfmsd bench store`): (codec, dtype, keepbits) -> ratio. blosc:
# 6 real val images at 1333×800 in BLOSC_BLOCKSIZE blocks (docs/store.md, "Blosc block size";
# stores written before, in Blosc's own blocks, are 0.5-8 % larger).
EXPECTED_RATIO = {
    ("blosc", "float16", None): 0.714,
    ("blosc", "uint8", None): 0.875,
    ("zstd", "float16", None): 0.91,
    ("zstd", "uint8", None): 0.94,
    ("blosc", "bfloat16", None): 0.571,
    ("blosc", "float16", 7): 0.531,
    ("blosc", "float16", 5): 0.431,
    ("blosc", "float16", 3): 0.299,
    ("blosc", "bfloat16", 5): 0.433,
    ("blosc", "bfloat16", 3): 0.286,
    ("blosc", "float32", None): 0.797,
    # --codec pcodec (level 8), the same 6 images and run (pcodec/blosc: 1.00 float16, 0.92
    # bfloat16, 0.99 bfloat16 keepbits 3; against Blosc's own blocks 0.89-0.97)
    ("pcodec", "float16", None): 0.716,
    ("pcodec", "float16", 7): 0.523,
    ("pcodec", "float16", 5): 0.437,
    ("pcodec", "float16", 3): 0.298,
    ("pcodec", "bfloat16", None): 0.525,
    ("pcodec", "bfloat16", 5): 0.396,
    ("pcodec", "bfloat16", 3): 0.284,
    ("pcodec", "float32", None): 0.771,
}


# Stored / raw of --pca K components + att_s (blosc-zstd3 + shuffle + crc32c, Blosc's own
# blocks: an upper bound for stores in BLOSC_BLOCKSIZE blocks), measured by
# examples/measure_pca.py on retina_r50 (random init, 24 real COCO val images, 640×512, K=64;
# K=32..128 give 0.87–0.90 float16): decorrelated components compress less than features.
PCA_RATIO = {"float16": 0.89, "bfloat16": 0.68, "uint8": 0.92}
# Stored / raw float16 of teacher logits: 0.69 measured on the demo's trained gfl_tiny (32
# synthetic images, 320×256); random-init retina_r50 / gfl_r50 gave 0.44 / 0.52 (docs/store.md
# "Teacher logits"). The larger, trained-teacher figure is used.
LOGITS_RATIO = 0.69


def expected_ratio(codec: str, dtype: str, keepbits: int | None) -> float:
    """Measured stored/raw ratio of an encoding; unmeasured keepbits interpolate linearly in k
    between the measured ones (a projection, said so where it is printed)."""
    if (codec, dtype, keepbits) in EXPECTED_RATIO:
        return EXPECTED_RATIO[(codec, dtype, keepbits)]
    known = sorted(
        (k or FLOAT_DTYPES.get(dtype, 8), r)
        for (c, d, k), r in EXPECTED_RATIO.items()
        if c == codec and d == dtype
    )
    if not known or keepbits is None:
        return EXPECTED_RATIO.get((codec, dtype, None), 0.75)
    return float(np.interp(keepbits, [k for k, _ in known], [r for _, r in known]))


def plan_summary(
    ds: CocoDetection,
    o: PlannedStore,
    strides: list[int],
    channels: int,
    views: list[str],
    logit_channels: int = 0,
) -> dict[str, float]:
    """Raw bytes of the planned store, from the images' sizes: features (C channels, or K with
    ``--pca``) + spatial statistics, and ``logit_channels`` (A·K) float16 logits per position."""
    item = schema.ITEM_BYTES[o.dtype]
    cf = getattr(o, "pca", None) or channels
    feat = logits = 0
    for i in range(len(ds.image_ids)):
        info = ds.image_info(i)
        w, h = o.geometry.padded_size(info["width"], info["height"])
        for s in strides:
            hw = math.ceil(h / s) * math.ceil(w / s)
            feat += len(views) * (cf * hw * item + 4 * hw)
            logits += len(views) * logit_channels * hw * 2
    n = max(1, len(ds.image_ids))
    total = feat + logits
    return {
        "raw_bytes": float(total),
        "raw_bytes_per_image": total / n,
        "raw_feature_bytes": float(feat),
        "raw_logit_bytes": float(logits),
    }


def projected_size(
    ds: CocoDetection,
    o: PlannedStore,
    strides: list[int],
    channels: int,
    views: list[str],
    logit_channels: int = 0,
    ratio: float | None = None,
) -> dict[str, float]:
    """The size part of ``--dry-run`` (no teacher needed): raw bytes from the images' sizes
    times the encoding's stored/raw ratio — ``ratio`` when given (measured on this teacher by
    ``store.probe``), else the constant measured on retina_r50; features and logits apart."""
    est = plan_summary(ds, o, strides, channels, views, logit_channels)
    if ratio is None:
        ratio = expected_ratio(o.codec, o.dtype, o.keepbits)
        if getattr(o, "pca", None):  # components compress less than features (PCA_RATIO)
            ratio = PCA_RATIO.get(o.dtype, ratio) * ratio / expected_ratio(o.codec, o.dtype, None)
    feat_bytes = est["raw_feature_bytes"] * ratio
    logit_bytes = est["raw_logit_bytes"] * LOGITS_RATIO
    n = max(1, len(ds.image_ids))
    return {
        "raw_bytes_per_image": est["raw_bytes_per_image"],
        "projected_bytes": feat_bytes + logit_bytes,
        "projected_bytes_per_image": (feat_bytes + logit_bytes) / n,
        "projected_feature_bytes": feat_bytes,
        "projected_logit_bytes": logit_bytes,
        "expected_compression": ratio,
    }


def dry_run(ds, o, model, device, strides, views, start, stop, pad_sizes, path) -> dict:
    """Projected size (from image sizes) and time (one timed teacher pass) — writes nothing."""
    lc = int(model.logit_anchors) * int(model.num_classes) if o.store_logits else 0
    size = projected_size(ds, o, strides, model.out_channels, views, lc)
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
    return {
        "path": path,
        "dry_run": True,
        "images": len(ds.image_ids),
        "range": [start, stop],
        "todo": todo,
        **size,
        "pca": o.pca,
        "projected_seconds": per_image * todo,
        "seconds_per_image": per_image,
        "probe_shape": list(shape),
    }

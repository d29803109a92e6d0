"""The teacher-feature store's schema: attributes, array layout, fingerprints and their checks.

One zarr v3 group per teacher and split, ``<cache>/<teacher>/<split>.zarr``. Its attribute
``dfmsd`` (written once, at creation, never rewritten) describes it::

    schema_version, teacher, num_classes, weights {path, sha256}, dataset {split, ann_sha256,
    image_ids_sha256, num_images}, geometry (Geometry.to_dict), canvas [long, short],
    strides, channels, level_shapes {stride: [Hc, Wc]}, dtype, quantization, codec, views,
    block, topk, score_thr, enhance (or null), logits (or null; absent in older stores),
    pca_components and pca (or null; absent in older stores), dfmsd_version, torch, zarr, created

Arrays (N images, ``i`` = index into the ordered COCO image ids; per view ``v`` and stride ``s``):

=============================  ==================  ==========================================
``image_ids``                  (N,) int64          written at creation
``done``                       (N,) uint8          completion marker, written LAST per image
                                                   (0 pending, 1 complete, 2 unreadable image)
``pad_size``                   (N, 2) int32        the image's own padded (H, W) (untransposed)
``size``                       (N, 2) int32        resized (h, w) before padding
``transposed``                 (N,) bool           portrait maps are stored transposed
``valid/{s}``                  (N, 2) int32        map size (h_s, w_s) = ceil(H/s), ceil(W/s)
``feat/{v}/{s}``               (N, C, Hc, Wc)      the --dtype encoding, one image per chunk
``qparams/{v}/{s}``            (N, C, 2) float32   uint8 only: per-channel (scale, offset)
``att_s/{v}/{s}``              (N, Hc, Wc) f32     mean_c |F| (raw), stored like ``feat``
``att_c/{v}/{s}``              (N, C) float32      mean over the valid positions of |F| (raw)
``det/{v}/boxes|scores|labels``(N, K, 4|-|-)       top-K detections, xyxy resized+view coords
``det/{v}/count``              (N,) int32          how many of the K rows are real
``area_ratio/{v}``             (N,) float32        sum of box areas (score >= thr) / (h*w)
``enhance/params``             (N, 7) float64      ME view: kind, seed, sigma, x1, y1, x2, y2
``enhance/checksum``           (N,) uint64         ME view: checksum of the augmented input
``logits/{v}/{s}``             (N, A·K, Hc, Wc)    float16, ``--store-logits`` (dense teachers):
                                                   class logits, anchor-major, stored like
                                                   ``feat``; attribute ``logits`` {dtype,
                                                   anchors, classes, kind}
``pca/{s}``                    (K+1, C) float32    ``--pca K``: row 0 = mean μ, rows 1..K = basis
                                                   W; ``feat`` then holds z = W(x − μ), (N, K,
                                                   Hc, Wc), reconstructed on read (store/pca.py)
``pca_stat/{v}/{s}``           (N, K+2) float32    ``--pca``: mean |z_k|, Σ‖x − x̂‖², Σ‖x‖²
``adv/delta``                  (N, 3, Hi, Wi) int8 adv view: the integer perturbation δ
                                                   (image canvas, transposed like ``feat``)
``adv/checksum``               (N,) uint64         adv view: checksum of the adversarial input
=============================  ==================  ==========================================

Feature-like arrays have one image per chunk; the small per-image arrays have ``block``
images per chunk, so concurrent writers (``--shard I/N``, torchrun ranks) own disjoint,
block-aligned index ranges and never share a chunk (zarr writes a chunk atomically; two
writers of one chunk would lose updates, see ``notes/feature-store.md``).

Portrait images: the canvas is landscape ``(Hc, Wc) = (ceil(short/s), ceil(long/s))`` and a
portrait map is stored transposed (flag ``transposed``), so no image doubles the canvas.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from dfmsd_cli.errors import UserError

SCHEMA_VERSION = 2  # 2: crc32c on every chunk, every chunk written (store/integrity.py)
READABLE_VERSIONS = (1, 2)
CHECKSUMMED_SINCE = 2
ATTR_KEY = "dfmsd"

DONE_PENDING, DONE_OK, DONE_UNREADABLE = 0, 1, 2
VIEWS_ALL = ("orig", "hflip", "me", "adv")
DTYPES = ("float16", "uint8", "bfloat16", "float32")
# Bytes per stored feature value of each encoding (float32: the teacher's own values, lossless)
ITEM_BYTES = {"float16": 2, "uint8": 1, "bfloat16": 2, "float32": 4}

# Fields whose mismatch makes a store unusable for a request, with a human name each.
FINGERPRINT_FIELDS: dict[str, str] = {
    "schema_version": "store schema version",
    "teacher": "teacher model",
    "weights.sha256": "teacher weights (SHA-256)",
    "dataset.split": "split",
    "dataset.ann_sha256": "annotation file (SHA-256)",
    "dataset.image_ids_sha256": "ordered image ids (SHA-256)",
    "dataset.num_images": "number of images",
    "geometry.img_scale": "geometry img_scale",
    "geometry.pad_divisor": "geometry pad_divisor",
    "geometry.mean": "geometry mean",
    "geometry.std": "geometry std",
    "strides": "levels (strides)",
    "channels": "channels",
    "dtype": "dtype",
    "quantization.keepbits": "mantissa bits kept (--keepbits)",
    "views": "views",
    "block": "block (images per small chunk)",
    "topk": "top-K detections",
    "score_thr": "area-ratio score threshold",
    "enhance": "enhancement settings",
    "adv": "adversarial-view settings",
    "logits": "stored teacher logits (--store-logits)",
    "pca_components": "channel projection components (--pca)",
    "codec.name": "codec",
}


def store_path(cache: str | os.PathLike, teacher: str, split: str) -> str:
    """``<cache>/<teacher>/<split>.zarr`` (a local path or an fsspec URL); a ``teacher`` that
    ends in ``.zarr`` names a store directly (an entry of ``distill --stages``)."""
    if str(teacher).endswith(".zarr"):
        return str(teacher)
    return f"{str(cache).rstrip('/')}/{teacher}/{split}.zarr"


def image_ids_sha256(image_ids: Sequence[int]) -> str:
    """SHA-256 of the ordered image ids as little-endian int64: the store's index order."""
    return hashlib.sha256(np.asarray(list(image_ids), dtype="<i8").tobytes()).hexdigest()


def state_dict_sha256(state_dict: dict) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of every tensor, in key order.

    Hashing the loaded tensors (not the file) fingerprints random-init teachers too and is
    independent of the checkpoint container (dfmsd checkpoint vs plain state dict).
    """
    import torch

    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        if not hasattr(t, "detach"):
            continue
        a = t.detach().cpu().contiguous()
        h.update(f"{name}|{a.dtype}|{tuple(a.shape)}|".encode())
        if a.numel():
            h.update(a.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def level_shape(canvas: tuple[int, int], stride: int) -> tuple[int, int]:
    """Landscape canvas map size (Hc, Wc) = (ceil(short/s), ceil(long/s))."""
    long, short = canvas
    return math.ceil(short / stride), math.ceil(long / stride)


def place_on_canvas(x: np.ndarray, hc: int, wc: int, transposed: bool) -> np.ndarray:
    """Put a (..., h, w) map (transposed if asked) into the top-left of a zero (..., hc, wc)."""
    if transposed:
        x = np.swapaxes(x, -1, -2)
    h, w = x.shape[-2:]
    if h > hc or w > wc:
        raise ValueError(f"map {h}x{w} does not fit the store canvas {hc}x{wc}")
    out = np.zeros(x.shape[:-2] + (hc, wc), dtype=x.dtype)
    out[..., :h, :w] = x
    return out


def shard_range(n: int, shard: int, num_shards: int, block: int) -> tuple[int, int]:
    """Index range [start, stop) of shard ``shard`` of ``num_shards``, aligned to ``block``.

    Blocks are split into contiguous, nearly equal runs, so every small chunk has one writer.
    """
    if not 0 <= shard < num_shards:
        raise UserError(
            f"shard {shard}/{num_shards} is out of range: use --shard I/N with 0 <= I < N"
        )
    nblocks = math.ceil(n / block)
    b0 = nblocks * shard // num_shards
    b1 = nblocks * (shard + 1) // num_shards
    return min(b0 * block, n), min(b1 * block, n)


def parse_shard(text: str | None) -> tuple[int, int]:
    """Parse ``'I/N'`` into (I, N); ``None`` means (0, 1)."""
    if not text:
        return 0, 1
    try:
        i, n = (int(t) for t in str(text).split("/"))
    except ValueError as exc:
        raise UserError(f"--shard must look like I/N (e.g. 0/4), got '{text}'") from exc
    if n < 1 or not 0 <= i < n:
        raise UserError(f"--shard {text}: need N >= 1 and 0 <= I < N")
    return i, n


def _get(d: dict, dotted: str) -> Any:
    cur: Any = d
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _norm(v: Any) -> Any:
    """Normalise JSON round-trip differences (tuples vs lists, int keys vs str keys)."""
    if isinstance(v, dict):
        return {str(k): _norm(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def _short(v: Any) -> str:
    s = str(v)
    if isinstance(v, str) and len(v) == 64:  # a hash
        return v[:12] + "…"
    return s if len(s) <= 80 else s[:77] + "..."


# None is a real value (the view / the logits are absent), not "don't care"
_NULLABLE = ("enhance", "adv", "logits", "pca_components")


def diff_attrs(stored: dict, wanted: dict, fields: Sequence[str] | None = None) -> list[str]:
    """Human-readable differences ``"<what>: store has X, asked for Y"`` over fingerprint fields.

    Only fields present in ``wanted`` are compared, so a reader can check a subset.
    """
    out = []
    for key in fields or FINGERPRINT_FIELDS:
        want = _get(wanted, key)
        if want is None and key not in _NULLABLE:
            continue
        if key in _NULLABLE and key not in wanted:
            continue
        have = _get(stored, key)
        if _norm(have) != _norm(want):
            out.append(
                f"{FINGERPRINT_FIELDS[key]}: store has {_short(have)}, asked for {_short(want)}"
            )
    return out


def check_attrs(path: str, stored: dict, wanted: dict, fix: str) -> None:
    """Raise a one-line UserError naming every fingerprint that differs."""
    diffs = diff_attrs(stored, wanted)
    if diffs:
        raise UserError(f"store {path} does not match ({'; '.join(diffs)}): {fix}")

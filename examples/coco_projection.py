"""COCO train2017 store size for the paper's pair, per encoding: the size part of
``precompute --dry-run`` (``dfmsd_cli.store.projection.projected_size``, the same code) on the
real val images' sizes at the default 1333×800, scaled to 118,287 images — without the timed
teacher pass, so every row costs a second (docs/store.md).

Usage: PYTHONPATH=. python examples/coco_projection.py [COCO_ROOT]
Pair: cmr_r101 (views orig, hflip) + cmr_x101 (orig, hflip, me); dense teachers' rows with
``--store-logits`` use gfl_r101 (two-stage teachers have no per-position logits).
"""

from __future__ import annotations

import sys
from pathlib import Path

from dfmsd_cli.data.coco import CocoDetection
from dfmsd_cli.data.geometry import Geometry
from dfmsd_cli.models import get_spec
from dfmsd_cli.store.precompute import PrecomputeOptions, _student_levels
from dfmsd_cli.store.projection import projected_size

TRAIN_IMAGES = 118_287
root = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/coco2017-subset")
ds = CocoDetection(root / "annotations/instances_val2017.json", root / "val2017",
                   geometry=Geometry(), train=False)  # fmt: skip


def tb(teacher: str, views: list[str], logits: bool = False, **kw) -> float:
    """Projected TB (10^12 bytes) of one teacher's train2017 store."""
    o = PrecomputeOptions(teacher=teacher, views=views, store_logits=logits, **kw)
    spec = get_spec(teacher)
    strides = list(spec.strides)
    if o.for_student:
        strides = _student_levels(o.for_student, strides, teacher)
    lc = 0
    if logits:  # GFL: one anchor x 80 classes
        lc = 80
    size = projected_size(ds, o, strides, spec.channels, views, lc)
    return size["projected_bytes_per_image"] * TRAIN_IMAGES / 1e12


rows = [
    ("float16, all levels", {}),
    ("float16 --for-student retina_r50", {"for_student": "retina_r50"}),
    ("uint8 --for-student", {"for_student": "retina_r50", "dtype": "uint8"}),
    (
        "bfloat16 --keepbits 3 --for-student",
        {"for_student": "retina_r50", "dtype": "bfloat16", "keepbits": 3},
    ),  # fmt: skip
    ("float16 --codec pcodec --for-student", {"for_student": "retina_r50", "codec": "pcodec"}),
    (
        "bfloat16 --keepbits 3 --codec pcodec --for-student",
        {"for_student": "retina_r50", "dtype": "bfloat16", "keepbits": 3, "codec": "pcodec"},
    ),  # fmt: skip
    ("float16 --pca 128 --for-student", {"for_student": "retina_r50", "pca": 128}),
    ("float16 --pca 64 --for-student", {"for_student": "retina_r50", "pca": 64}),
    ("float16 --pca 32 --for-student", {"for_student": "retina_r50", "pca": 32}),
    (
        "bfloat16 --pca 64 --for-student",
        {"for_student": "retina_r50", "pca": 64, "dtype": "bfloat16"},
    ),  # fmt: skip
    ("uint8 --pca 64 --for-student", {"for_student": "retina_r50", "pca": 64, "dtype": "uint8"}),
    ("uint8 --pca 32 --for-student", {"for_student": "retina_r50", "pca": 32, "dtype": "uint8"}),
]
print("| encoding | cmr_r101 (orig, hflip) | cmr_x101 (orig, hflip, me) | pair |")
print("|---|---|---|---|")
for name, kw in rows:
    a = tb("cmr_r101", ["orig", "hflip"], **kw)
    b = tb("cmr_x101", ["orig", "hflip", "me"], **kw)
    print(f"| {name} | {a:.2f} TB | {b:.2f} TB | **{a + b:.2f} TB** |")
print()
print("| dense teacher gfl_r101 (orig, hflip) | without logits | --store-logits |")
print("|---|---|---|")
for name, kw in (("float16", {}), ("float16 --pca 64", {"pca": 64}),
                 ("uint8 --pca 32", {"pca": 32, "dtype": "uint8"})):  # fmt: skip
    a = tb("gfl_r101", ["orig", "hflip"], **kw)
    b = tb("gfl_r101", ["orig", "hflip"], logits=True, **kw)
    print(f"| {name} | {a:.2f} TB | {b:.2f} TB |")

"""Measure --store-logits: bytes per image (logits vs features), float16 round-trip error.

Usage: PYTHONPATH=. python examples/measure_logits.py TEACHER N_IMAGES (docs/store.md).
"""

import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from dfmsd_cli.data.coco import CocoDetection
from dfmsd_cli.data.geometry import Geometry
from dfmsd_cli.models.checkpoint import load_teacher
from dfmsd_cli.store.precompute import PrecomputeOptions, precompute
from dfmsd_cli.store.reader import TeacherStore

teacher, n = sys.argv[1], int(sys.argv[2])
root = Path(os.environ.get("COCO_SUBSET", "../shared/data/coco2017-subset"))
ann, img = root / "annotations/instances_val2017.json", root / "val2017"
geom = Geometry()
cache = Path(f"/tmp/dfmsd_logits/cache_{teacher}")
o = PrecomputeOptions(
    teacher=teacher,
    split="val2017",
    cache=str(cache),
    geometry=geom,
    views=["orig"],
    batch_size=1,
    num_workers=1,
    device="cpu",
    progress=False,
    max_images=n,
    store_logits=True,
)
t0 = time.time()
s = precompute(ann, img, o)
print("precompute s", time.time() - t0, flush=True)
path = Path(s["path"])


def du(prefix):
    return sum(f.stat().st_size for f in (path / prefix).rglob("*") if f.is_file())


store = TeacherStore.open(path)
done = int((store.done() == 1).sum())
res = {
    "teacher": teacher,
    "images": done,
    "logits_bytes_per_image": du("logits") / done,
    "feat_bytes_per_image": du("feat") / done,
    "logits_attr": store.meta.logits,
}
ds = CocoDetection(ann, img, geometry=geom, train=False, max_images=n)
model = load_teacher(teacher, ds.num_classes, None, 0)
mx, sm, cnt, raw = 0.0, 0.0, 0, 0
for i in range(min(n, 3)):
    smp = ds.get(i, "orig")
    h, w = smp["size"]
    H, W = math.ceil(h / 32) * 32, math.ceil(w / 32) * 32
    x = torch.zeros(1, 3, H, W)
    x[0, :, :h, :w] = smp["image"]
    with torch.inference_mode():
        ref = model(x, [(h, w)], return_logits=True).logits
    t = store.get(i, "orig")
    for st in store.meta.strides:
        e = (t["logits"][st] - ref[st][0]).abs()
        mx = max(mx, float(e.max()))
        sm += float(e.sum())
        cnt += e.numel()
        raw += ref[st][0].numel() * 4
    res.setdefault(
        "logit_range",
        [float(min(z.min() for z in ref.values())), float(max(z.max() for z in ref.values()))],
    )
res.update(max_abs_err=mx, mean_abs_err=sm / cnt, float32_bytes_per_image_first3=raw / min(n, 3))
print(json.dumps(res), flush=True)

"""KD error of float16 stored logits: the SLD term with stored vs float32 teacher logits.

Usage (after measure_logits.py):
    PYTHONPATH=. python examples/logits_kd_error.py TEACHER STUDENT N
"""

import json
import math
import os
import sys
from pathlib import Path

import torch

from dfmsd_cli.data.coco import CocoDetection
from dfmsd_cli.data.geometry import Geometry
from dfmsd_cli.distill.losses.sld import logit_kd_map
from dfmsd_cli.models import build_model
from dfmsd_cli.models.checkpoint import load_teacher
from dfmsd_cli.store.reader import TeacherStore

teacher, student_name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
root = Path(os.environ.get("COCO_SUBSET", "../shared/data/coco2017-subset"))
ds = CocoDetection(
    root / "annotations/instances_val2017.json",
    root / "val2017",
    geometry=Geometry(),
    train=False,
    max_images=8,
)
store = TeacherStore.open(f"/tmp/dfmsd_logits/cache_{teacher}/{teacher}/val2017.zarr")
model = load_teacher(teacher, ds.num_classes, None, 0)
torch.manual_seed(1)
student = build_model(student_name, num_classes=ds.num_classes).eval()
A = store.meta.logits["anchors"]
num = den = 0.0
for i in range(n):
    s = ds.get(i, "orig")
    h, w = s["size"]
    H, W = math.ceil(h / 32) * 32, math.ceil(w / 32) * 32
    x = torch.zeros(1, 3, H, W)
    x[0, :, :h, :w] = s["image"]
    with torch.inference_mode():
        ref = model(x, [(h, w)], return_logits=True).logits
        zs = student(x, [(h, w)], return_logits=True).logits
        t = store.get(i, "orig")
        for st in store.meta.strides:
            k32 = logit_kd_map(zs[st], ref[st], A)
            k16 = logit_kd_map(zs[st], t["logits"][st][None], A)
            num += float((k16 - k32).abs().sum())
            den += float(k32.abs().sum())
print(
    json.dumps(
        {"teacher": teacher, "student": student_name, "images": n, "rel_kd_change": num / den}
    )
)

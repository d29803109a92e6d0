"""Measure dfmsd's two deviations from the official FGD foreground mask (docs/method.md).

1. Box -> cell mapping: dfmsd divides by the stride; yzd-v/FGD multiplies by (padded feature
   width / unpadded image width), which stretches boxes on a padded batch.
2. Edge boxes: dfmsd clamps the cell range to the map before computing the box area;
   yzd-v/FGD computes the area from the unclamped range (so an edge box gets a smaller weight).

Usage: python examples/fgd_mask_deviation.py DATA_ROOT [LONG,SHORT] [BATCH]
Batches are formed in image order and padded to 32 as distill does (orig view).
"""

from __future__ import annotations

import math
import sys

import torch

from dfmsd_cli.data.coco import CocoDetection
from dfmsd_cli.data.geometry import Geometry
from dfmsd_cli.data.loader import collate
from dfmsd_cli.distill.losses.fgd import foreground_background_masks, pad_boxes


def official_fg(boxes, sizes, hw, clamp_first: bool, by_stride: int | None) -> torch.Tensor:
    """The official per-box loop (optionally with dfmsd's stride mapping / clamp order)."""
    h, w = hw
    fg = torch.zeros(len(boxes), h, w)
    for i, (b, (ih, iw)) in enumerate(zip(boxes, sizes, strict=True)):
        if by_stride:
            c = b / by_stride
        else:
            c = torch.stack(
                [b[:, 0] / iw * w, b[:, 1] / ih * h, b[:, 2] / iw * w, b[:, 3] / ih * h], 1
            )
        x1, y1 = c[:, 0].floor().long(), c[:, 1].floor().long()
        x2, y2 = c[:, 2].ceil().long(), c[:, 3].ceil().long()
        if clamp_first:
            x1, y1 = x1.clamp(0, w - 1), y1.clamp(0, h - 1)
            x2, y2 = x2.clamp(0, w - 1), y2.clamp(0, h - 1)
        area = 1.0 / ((y2 + 1 - y1) * (x2 + 1 - x1)).float()
        for j in range(len(b)):
            sl = fg[i, y1[j] : y2[j] + 1, x1[j] : x2[j] + 1]
            fg[i, y1[j] : y2[j] + 1, x1[j] : x2[j] + 1] = torch.maximum(sl, area[j])
    return fg


def main() -> None:
    root = sys.argv[1]
    scale = tuple(int(v) for v in (sys.argv[2] if len(sys.argv) > 2 else "320,256").split(","))
    bsz = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    ds = CocoDetection(
        f"{root}/annotations/instances_train2017.json",
        f"{root}/train2017",
        geometry=Geometry(img_scale=scale),
        train=True,
        skip_empty=True,
    )
    n = len(ds.image_ids)
    stats = {k: [0.0, 0.0] for k in ("mapping", "clamp")}  # [cells differing, fg cells]
    imgs = {k: 0 for k in stats}
    total_imgs = 0
    for b0 in range(0, n, bsz):
        batch = collate([ds.get(i, "orig") for i in range(b0, min(n, b0 + bsz))])
        H, W = batch["images"].shape[-2:]
        boxes = [t["boxes"] for t in batch["targets"]]
        sizes = batch["image_sizes"]
        total_imgs += len(boxes)
        for s in (8, 16, 32, 64, 128):
            hw = (math.ceil(H / s), math.ceil(W / s))
            valid = torch.zeros(len(boxes), *hw, dtype=torch.bool)
            for i, (ih, iw) in enumerate(sizes):
                valid[i, : math.ceil(ih / s), : math.ceil(iw / s)] = True
            ours, _ = foreground_background_masks(*pad_boxes(boxes), valid, s)
            ref = official_fg(boxes, sizes, hw, clamp_first=True, by_stride=s) * valid
            assert torch.allclose(ours, ref), "vectorised mask != loop with dfmsd's choices"
            for key, other in (
                ("mapping", official_fg(boxes, sizes, hw, clamp_first=True, by_stride=None)),
                ("clamp", official_fg(boxes, sizes, hw, clamp_first=False, by_stride=s)),
            ):
                other = other * valid
                diff = (other - ours).abs() > 1e-9
                stats[key][0] += float(diff.sum())
                stats[key][1] += float((ours > 0).sum())
                imgs[key] += int(diff.flatten(1).any(1).sum())
    print(
        f"{n} images, batch {bsz}, img-scale {scale}, levels 8..128 ({total_imgs * 5} image-levels)"
    )
    for key, (d, fg) in stats.items():
        print(
            f"{key}: {d:.0f} cells differ = {100 * d / max(fg, 1):.1f}% of dfmsd's fg cells; "
            f"{imgs[key]} image-levels of {total_imgs * 5} affected"
        )


if __name__ == "__main__":
    main()

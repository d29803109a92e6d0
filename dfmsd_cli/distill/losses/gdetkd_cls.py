"""G-DetKD's homogeneous extra for dense pairs: class-aware region KD on the teacher's stored
class logits (G-DetKD, Yao et al., ICCV 2021, arXiv 2108.07482; the dense form is ours).

The paper adds class-aware localisation KD (and head transfer) when the two detectors' heads
match: the student's head imitates the teacher's predictions on the distilled regions. A dense
pair has no RoI head; its "prediction for a region" is what its head predicts at the positions
inside the region, and the store holds the teacher's class logits z^t (float16,
``precompute --store-logits``), not its box regression. So, per region i (the same regions as
L_feat and L_ckd: GT + the teacher's top-K detections, 1:3), with P_i the positions of every
distilled level whose cell centre ((x + ½)·s, (y + ½)·s) lies inside box i (a box with none: the
finest level's cell holding its centre)::

    kd_p    = Σ_a Σ_k KL(Bern(σ(z^t_{p,a,k})) ‖ Bern(σ(z^s_{p,a,k})))      sigmoid heads
            = Σ_a KL(softmax_k z^t_{p,a} ‖ softmax_k z^s_{p,a})              softmax heads
    L_cls   = (1/N) Σ_i (1/|P_i|) Σ_{p ∈ P_i} kd_p

(``logit_kd_map`` of :mod:`.sld`, τ = 1: 0 when z^s = z^t). It is class-aware in that every
region distils the teacher's full per-class distribution, not its top class; for a GFL head,
σ(z_k) is the quality focal loss's joint score — class k's probability times the predicted IoU
of its box — so it also carries the teacher's class-wise localisation quality, the closest a
logit store comes to the paper's class-aware localisation KD. Box-offset KD and head transfer
are not done (the store holds no regression outputs; head transfer is a weight copy, not a
loss). Each region weighs the same whatever its size (as in L_feat); the teacher is detached.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dfmsd_cli.distill.losses.common import zero_loss
from dfmsd_cli.distill.losses.gdetkd import _RegionLoss
from dfmsd_cli.distill.losses.sld import LOGIT_KINDS, logit_kd_map


def region_cells(rois: Tensor, stride: int, hw: tuple[int, int]) -> Tensor:
    """(N, h, w) bool: the cells of a stride-``stride`` map whose centre lies inside each RoI
    ((N, 5) = image index, x1, y1, x2, y2; boundaries inclusive)."""
    h, w = hw
    dev = rois.device
    cy = (torch.arange(h, device=dev, dtype=torch.float32) + 0.5) * stride
    cx = (torch.arange(w, device=dev, dtype=torch.float32) + 0.5) * stride
    x1, y1, x2, y2 = (rois[:, k, None] for k in range(1, 5))
    in_y = (cy[None] >= y1) & (cy[None] <= y2)  # (N, h)
    in_x = (cx[None] >= x1) & (cx[None] <= x2)  # (N, w)
    return in_y[:, :, None] & in_x[:, None, :]


def centre_cell(rois: Tensor, stride: int, hw: tuple[int, int]) -> Tensor:
    """(N, h, w) bool: the one cell holding each RoI's centre (clamped into the map)."""
    h, w = hw
    n = rois.shape[0]
    cx = ((rois[:, 1] + rois[:, 3]) / 2 / stride).floor().long().clamp(0, w - 1)
    cy = ((rois[:, 2] + rois[:, 4]) / 2 / stride).floor().long().clamp(0, h - 1)
    out = torch.zeros(n, h, w, dtype=torch.bool, device=rois.device)
    out[torch.arange(n, device=rois.device), cy, cx] = True
    return out


def region_logit_kd(
    kd: dict[int, Tensor], rois: Tensor, valid: dict[int, Tensor] | None = None
) -> Tensor:
    """L_cls from per-position KD maps ``kd`` {stride: (B, h, w)} and the regions ``rois``:
    the mean over regions of the mean of kd over each region's cells (module docstring)."""
    strides = sorted(kd)
    b = rois[:, 0].long()
    total = torch.zeros(rois.shape[0], device=rois.device)
    count = torch.zeros(rois.shape[0], device=rois.device)
    masks = {}
    for s in strides:
        m = region_cells(rois, s, tuple(kd[s].shape[-2:]))
        if valid is not None:
            m = m & valid[s][b].to(m.device)
        masks[s] = m
        count = count + m.flatten(1).sum(1)
    empty = count == 0  # a box between cell centres: its centre cell on the finest level
    if empty.any():
        s = strides[0]
        masks[s] = masks[s] | (centre_cell(rois, s, tuple(kd[s].shape[-2:])) & empty[:, None, None])
        count = count + empty.float()
    for s in strides:
        total = total + (masks[s].float() * kd[s][b]).flatten(1).sum(1)
    return (total / count).mean()


class ClassKDLoss(_RegionLoss):
    """L_cls (module docstring) on ``levels`` for heads of ``anchors`` anchors and ``kind``
    logits; ``forward(student_logits, teacher_logits, valid, det_boxes, det_scores, targets)``."""

    def __init__(
        self,
        levels,
        anchors: int = 1,
        kind: str = "sigmoid",
        region_rule: dict | None = None,
    ) -> None:
        super().__init__(region_rule)
        if kind not in LOGIT_KINDS:
            raise ValueError(f"unknown logit kind {kind!r}: use one of {', '.join(LOGIT_KINDS)}")
        self.levels = [int(s) for s in levels]
        self.anchors, self.kind = int(anchors), kind

    def forward(self, student_logits, teacher_logits, valid, det_boxes, det_scores, targets):
        levels = [s for s in self.levels if s in student_logits and s in teacher_logits]
        if not levels:
            raise ValueError(f"no logits at the distilled levels {self.levels}")
        rois, _ = self.regions(student_logits, targets, det_boxes, det_scores)
        if rois.shape[0] == 0:
            return zero_loss(student_logits)
        kd = {}
        for s in levels:
            zs, zt = student_logits[s], teacher_logits[s]
            if zs.shape != zt.shape:  # the batch maps of one padded size: the same shape
                raise ValueError(
                    f"stride {s}: student logits {tuple(zs.shape)} vs teacher {tuple(zt.shape)}"
                )
            kd[s] = logit_kd_map(zs, zt, self.anchors, self.kind)
        return region_logit_kd(kd, rois, {s: valid[s] for s in levels} if valid else None)

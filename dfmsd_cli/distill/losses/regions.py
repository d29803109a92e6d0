"""Regions for G-DetKD (Yao et al., ICCV 2021, arXiv 2108.07482): which boxes are distilled, the
FPN level a box is pooled from, and the 7×7 RoI features of both sides.

* **Regions** (:func:`sample_regions`): per image, the ground-truth boxes plus the teacher's
  stored top-K detections of the view. A region is *positive* when it is a GT box or a detection
  whose IoU with some GT box is ≥ ``pos_iou`` (0.5, the usual RoI-head rule; our choice), else
  *negative*. Positives: GT boxes first, then positive detections by teacher score, at most
  ``max_pos``; negatives: the highest-scoring negative detections (the teacher's confident
  false positives, the hardest background), at most ``neg_ratio · max(n_pos, 1)`` — the
  paper's 1:3 positive:negative rule (``neg_ratio`` = 3); an image without GT keeps 3 hard
  negatives. Deterministic (no sampling RNG), so L_feat and L_ckd see the same regions.
* **Level rule** (:func:`roi_levels`): MMDetection's ``SingleRoIExtractor.map_roi_levels``,
  ``l = ⌊log2(√(wh) / 56 + 1e-6)⌋`` on strides (4, 8, 16, 32), written in absolute terms
  (level k ↔ stride 2^k, k = l + 2, the canonical "224 px ↔ P4" of FPN Eq. 1) and clamped to
  the strides given: for a stride-4 finest level it is MMDetection's rule exactly; for a teacher
  whose store starts at P3 a box keeps the level its size means instead of shifting one level.
  The teacher uses its 4 finest distilled strides (MMDetection's RoI extractors take 4 levels).
* **Pooling** (:func:`pool_levels`): ``torchvision.ops.roi_align``, 7×7, ``aligned=True``
  (MMDetection's RoIAlign) and ``sampling_ratio=2`` (torchvision's Faster R-CNN; bounded cost
  when a large box is pooled from a fine student level; our choice), in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou, roi_align

ROI_SIZE = 7
FINEST_SCALE = 56  # MMDetection SingleRoIExtractor: boxes below 2·56 px go to stride 4


def roi_levels(boxes: Tensor, strides: list[int] | tuple[int, ...]) -> Tensor:
    """Index into ``strides`` (ascending powers of 2) of each (N, 4) xyxy box's RoI level.

    ``k = ⌊log2(√(wh) / 56 + 1e-6)⌋ + 2`` (MMDetection's rule, level 0 = stride 4), clamped
    to ``[log2 strides[0], log2 strides[-1]]``; the largest given stride ≤ 2^k is chosen.
    """
    scale = (boxes[:, 2] - boxes[:, 0]).clamp_min(0) * (boxes[:, 3] - boxes[:, 1]).clamp_min(0)
    k = torch.floor(torch.log2(scale.sqrt() / FINEST_SCALE + 1e-6)) + 2
    logs = torch.tensor([float(s) for s in strides], device=boxes.device).log2()
    k = k.clamp(float(logs[0]), float(logs[-1]))
    return (torch.searchsorted(logs, k, right=True) - 1).clamp_min(0)


def _usable(boxes: Tensor) -> Tensor:
    return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def sample_regions(
    gt: Tensor,
    det: Tensor,
    det_scores: Tensor,
    max_pos: int = 16,
    neg_ratio: int = 3,
    pos_iou: float = 0.5,
) -> tuple[Tensor, Tensor]:
    """One image's regions: ``(boxes (n, 4), positive (n,) bool)``, positives first.

    ``gt`` (g, 4) ground truth, ``det`` (k, 4) / ``det_scores`` (k,) the teacher's stored
    detections, all xyxy in the view's resized pixels. See the module docstring for the rule.
    """
    gt = gt.float()[_usable(gt)]
    keep = _usable(det)
    det, det_scores = det.float()[keep], det_scores.float()[keep]
    order = torch.argsort(det_scores, descending=True, stable=True)
    det = det[order]
    if gt.shape[0] and det.shape[0]:
        det_pos = box_iou(det, gt).amax(dim=1) >= pos_iou
    else:
        det_pos = torch.zeros(det.shape[0], dtype=torch.bool, device=det.device)
    pos = torch.cat([gt, det[det_pos]])[:max_pos]
    n_neg = neg_ratio * max(pos.shape[0], 1)
    neg = det[~det_pos][:n_neg]
    boxes = torch.cat([pos, neg])
    positive = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    positive[: pos.shape[0]] = True
    return boxes, positive


def batch_regions(
    gt_boxes: list[Tensor],
    det_boxes: list[Tensor],
    det_scores: list[Tensor],
    device: torch.device,
    **rule,
) -> tuple[Tensor, Tensor]:
    """Regions of a batch: ``rois`` (N, 5) = (image index, x1, y1, x2, y2) and ``positive`` (N,).

    ``det_boxes`` may be empty (a teacher view without detections): then the regions are the
    GT boxes alone. (``--online`` gives the live teacher's top-K, ``distill/online.py``.)
    """
    rois, flags = [], []
    for b, gt in enumerate(gt_boxes):
        gt = gt.to(device)
        if det_boxes:
            det, sc = det_boxes[b].to(device), det_scores[b].to(device)
        else:
            det, sc = gt.new_zeros((0, 4)), gt.new_zeros((0,))
        boxes, positive = sample_regions(gt, det, sc, **rule)
        index = torch.full((boxes.shape[0], 1), float(b), device=device)
        rois.append(torch.cat([index, boxes], dim=1))
        flags.append(positive)
    if not rois:
        return torch.zeros((0, 5), device=device), torch.zeros(0, dtype=torch.bool, device=device)
    return torch.cat(rois), torch.cat(flags)


def pool_levels(maps: dict[int, Tensor], rois: Tensor, strides: list[int]) -> Tensor:
    """RoIAlign (7×7) of every RoI from each of ``strides``: (L, N, C, 7, 7), float32."""
    return torch.stack(
        [
            roi_align(
                maps[s].float(), rois, ROI_SIZE, spatial_scale=1.0 / s, sampling_ratio=2,
                aligned=True,
            )
            for s in strides
        ]
    )  # fmt: skip


def pool_assigned(maps: dict[int, Tensor], rois: Tensor, strides: list[int]) -> Tensor:
    """RoIAlign (7×7) of each RoI on the one level :func:`roi_levels` assigns: (N, C, 7, 7)."""
    level = roi_levels(rois[:, 1:], strides)
    c = maps[strides[0]].shape[1]
    out = rois.new_zeros((rois.shape[0], c, ROI_SIZE, ROI_SIZE))
    for i, s in enumerate(strides):
        sel = (level == i).nonzero().squeeze(1)
        if sel.numel():
            out[sel] = roi_align(
                maps[s].float(), rois[sel], ROI_SIZE, spatial_scale=1.0 / s, sampling_ratio=2,
                aligned=True,
            )  # fmt: skip
    return out


def teacher_strides(strides: list[int] | tuple[int, ...]) -> list[int]:
    """The teacher's RoI levels: its 4 finest distilled strides (MMDetection takes 4)."""
    return sorted(int(s) for s in strides)[:4]


def duplicate_pairs(rois: Tensor, iou: float) -> Tensor:
    """(N, N) bool: i ≠ j, same image, IoU(box_i, box_j) ≥ ``iou`` (near-duplicate regions)."""
    same = rois[:, None, 0] == rois[None, :, 0]
    overlap = box_iou(rois[:, 1:], rois[:, 1:]) >= iou
    eye = torch.eye(rois.shape[0], dtype=torch.bool, device=rois.device)
    return same & overlap & ~eye

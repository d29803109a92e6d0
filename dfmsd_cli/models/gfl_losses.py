"""Generalized Focal Loss pieces (Li et al., NeurIPS 2020), as MMDetection 3.3 implements them.

* :func:`quality_focal_loss` – ``mmdet/models/losses/gfocal_loss.py``: sigmoid BCE against a
  soft target (the IoU of the predicted box for the positive class, 0 elsewhere), modulated by
  ``|target - sigmoid(pred)|^beta`` (beta 2); summed over classes per sample.
* :func:`distribution_focal_loss` – CE towards the two integer bins around a continuous
  distance ``y``: ``(ceil - y) CE(p, floor) + (y - floor) CE(p, ceil)``.
* :func:`giou_loss` – ``1 - GIoU`` (``eps=1e-6``).
* :func:`atss_assign` – ``ATSSAssigner(topk=9)``: per ground truth, the ``topk`` anchors of each
  level closest to its centre are candidates; those with IoU >= mean + std of the candidates'
  IoUs and whose centre lies inside the box (margin 0.01) are positive; an anchor positive for
  several boxes takes the one with the highest IoU.
* :func:`integral` – ``Integral``: the expectation of the softmax over ``reg_max + 1`` bins.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_iou


def quality_focal_loss(pred: Tensor, labels: Tensor, scores: Tensor, beta: float = 2.0) -> Tensor:
    """Per-sample QFL. ``pred``: (N, K) logits; ``labels``: (N,) in 0..K-1, or K (= background);
    ``scores``: (N,) IoU targets of the positives. Returns (N,) (summed over classes)."""
    sig = pred.sigmoid()
    loss = F.binary_cross_entropy_with_logits(pred, torch.zeros_like(pred), reduction="none")
    loss = loss * sig.pow(beta)
    pos = torch.where((labels >= 0) & (labels < pred.shape[1]))[0]
    if pos.numel():
        cls = labels[pos].long()
        mod = (scores[pos] - sig[pos, cls]).abs().pow(beta)
        pos_loss = F.binary_cross_entropy_with_logits(pred[pos, cls], scores[pos], reduction="none")
        loss = loss.index_put((pos, cls), pos_loss * mod)
    return loss.sum(dim=1)


def distribution_focal_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Per-sample DFL. ``pred``: (N, n + 1) bin logits; ``target``: (N,) in [0, n)."""
    left = target.long()
    right = left + 1
    w_left = right.float() - target
    w_right = target - left.float()
    return (
        F.cross_entropy(pred, left, reduction="none") * w_left
        + F.cross_entropy(pred, right, reduction="none") * w_right
    )


def aligned_iou(a: Tensor, b: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU of each row of ``a`` with the same row of ``b`` (xyxy)."""
    lt = torch.max(a[:, :2], b[:, :2])
    rb = torch.min(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    area_a = (a[:, 2:] - a[:, :2]).prod(dim=1)
    area_b = (b[:, 2:] - b[:, :2]).prod(dim=1)
    return inter / (area_a + area_b - inter).clamp(min=eps)


def giou_loss(pred: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-sample ``1 - GIoU`` of aligned xyxy boxes."""
    lt = torch.max(pred[:, :2], target[:, :2])
    rb = torch.min(pred[:, 2:], target[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    area_p = (pred[:, 2:] - pred[:, :2]).prod(dim=1)
    area_t = (target[:, 2:] - target[:, :2]).prod(dim=1)
    union = (area_p + area_t - inter).clamp(min=eps)
    enclose = (
        (torch.max(pred[:, 2:], target[:, 2:]) - torch.min(pred[:, :2], target[:, :2]))
        .clamp(min=0)
        .prod(dim=1)
        .clamp(min=eps)
    )
    giou = inter / union - (enclose - union) / enclose
    return 1 - giou


def integral(reg: Tensor, project: Tensor) -> Tensor:
    """(N, 4 (n + 1)) bin logits -> (N, 4) expected distances ``sum_i softmax_i * i``."""
    n1 = project.numel()
    prob = F.softmax(reg.reshape(-1, n1), dim=1)
    return (prob @ project.to(prob.dtype)).reshape(-1, 4)


def distance2bbox(points: Tensor, dist: Tensor, max_shape: tuple[int, int] | None = None) -> Tensor:
    """(cx, cy) + (l, t, r, b) -> xyxy, clipped to ``max_shape`` = (h, w) when given."""
    boxes = torch.cat([points - dist[:, :2], points + dist[:, 2:]], dim=1)
    if max_shape is not None:
        h, w = max_shape
        boxes = torch.stack(
            [boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w),
             boxes[:, 3].clamp(0, h)], dim=1,
        )  # fmt: skip
    return boxes


def bbox2distance(points: Tensor, boxes: Tensor, max_dis: float, eps: float = 0.01) -> Tensor:
    """xyxy -> (l, t, r, b) from ``points``, clamped to [0, max_dis - eps] (DFL's bin range)."""
    dist = torch.cat([points - boxes[:, :2], boxes[:, 2:] - points], dim=1)
    return dist.clamp(min=0, max=max_dis - eps)


def atss_assign(
    anchors: Tensor,
    num_per_level: list[int],
    gt_boxes: Tensor,
    gt_labels: Tensor,
    num_classes: int,
    topk: int = 9,
) -> tuple[Tensor, Tensor]:
    """ATSS for one image. Returns ``labels`` (A,) in 0..K-1, K for background, and
    ``targets`` (A, 4): the assigned box of each positive (zeros elsewhere)."""
    n = anchors.shape[0]
    labels = anchors.new_full((n,), num_classes, dtype=torch.long)
    targets = anchors.new_zeros((n, 4))
    if gt_boxes.shape[0] == 0 or n == 0:
        return labels, targets
    overlaps = box_iou(anchors, gt_boxes)  # (A, G)
    a_ctr = (anchors[:, :2] + anchors[:, 2:]) / 2
    g_ctr = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    dist = torch.cdist(a_ctr, g_ctr)  # (A, G)
    candidates = []
    start = 0
    for count in num_per_level:
        k = min(topk, count)
        _, idx = dist[start : start + count].topk(k, dim=0, largest=False)
        candidates.append(idx + start)
        start += count
    cand = torch.cat(candidates, dim=0)  # (k L, G)
    g = torch.arange(gt_boxes.shape[0], device=anchors.device)
    cand_iou = overlaps[cand, g]
    thr = cand_iou.mean(0) + cand_iou.std(0)
    is_pos = cand_iou >= thr[None]
    cx, cy = a_ctr[cand, 0], a_ctr[cand, 1]  # (k L, G)
    inside = (
        torch.stack(
            [cx - gt_boxes[:, 0], cy - gt_boxes[:, 1], gt_boxes[:, 2] - cx, gt_boxes[:, 3] - cy],
            dim=0,
        ).amin(dim=0)
        > 0.01
    )
    is_pos &= inside
    masked = torch.full_like(overlaps, -float("inf"))
    flat_idx = (cand * gt_boxes.shape[0] + g[None]).reshape(-1)[is_pos.reshape(-1)]
    masked.view(-1)[flat_idx] = overlaps.view(-1)[flat_idx]
    best, best_gt = masked.max(dim=1)
    pos = best != -float("inf")
    labels[pos] = gt_labels[best_gt[pos]].long()
    targets[pos] = gt_boxes[best_gt[pos]]
    return labels, targets

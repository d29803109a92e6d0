"""RepPoints point sets, box conversion, target assignment and losses.

Yang et al., "RepPoints: Point Set Representation for Object Detection", ICCV 2019, as
MMDetection 3.3 implements it (``mmdet/models/dense_heads/reppoints_head.py``,
``task_modules/assigners/point_assigner.py`` and ``max_iou_assigner.py``):

* a point set is 9 (y, x) offsets per location, channel ``2k`` = y and ``2k + 1`` = x of point
  ``k`` (kernel positions row-major), in units of the level's stride, relative to the
  location ``(j s, i s)`` -- the same interleaving as the deformable conv offsets;
* moment transform (``transform_method='moment'``): centre = mean of the points,
  half size = std (unbiased, n - 1) of x / y times ``exp(moment_transfer)``; the learnable
  ``moment_transfer`` (2,) gets its gradient scaled by ``moment_mul = 0.01``;
* init stage: :func:`point_assign` (``PointAssigner``, scale 4, pos_num 1) on the locations;
  refine stage: :func:`max_iou_assign` (``MaxIoUAssigner`` 0.5 / 0.4, min_pos_iou 0, every
  prior tied at a gt's best IoU is positive) on the boxes of the (detached) init points;
* losses: sigmoid focal (gamma 2, alpha 0.25, weight 1) on the refine labels, averaged over
  the refine positives; SmoothL1 (beta 0.11) between predicted and gt boxes, both divided by
  ``point_base_scale * stride``, weight 0.5 (init, averaged over init positives) and
  1.0 (refine, over refine positives).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_iou, sigmoid_focal_loss

from dfmsd_cli.models.detector import grid_points


def scaled_grad(param: Tensor, mul: float) -> Tensor:
    """``param`` in value, ``mul * grad`` in gradient: ``p mul + p.detach() (1 - mul)``."""
    return param * mul + param.detach() * (1.0 - mul)


def moment_box(xs: Tensor, ys: Tensor, transfer: Tensor) -> Tensor:
    """Moment transform of point sets: ``xs``, ``ys`` (..., P) -> boxes (..., 4) xyxy.

    ``c = mean(p)``, ``half_w = std(x) exp(t_w)``, ``half_h = std(y) exp(t_h)`` (std unbiased,
    as ``torch.std``), box ``(c_x - half_w, c_y - half_h, c_x + half_w, c_y + half_h)``.
    ``transfer``: (2,) = (t_w, t_h), already gradient-scaled by the caller.
    """
    cx, cy = xs.mean(dim=-1), ys.mean(dim=-1)
    half_w = torch.std(xs - cx[..., None], dim=-1) * torch.exp(transfer[0])
    half_h = torch.std(ys - cy[..., None], dim=-1) * torch.exp(transfer[1])
    return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=-1)


def split_yx(pts: Tensor) -> tuple[Tensor, Tensor]:
    """(B, 2P, H, W) y-first point offsets -> x, y each (B, H W, P), locations row-major."""
    b, c, h, w = pts.shape
    t = pts.reshape(b, c // 2, 2, h * w).permute(0, 3, 1, 2)  # (B, HW, P, 2)
    return t[..., 1], t[..., 0]


def point_assign(
    points: Tensor, levels: Tensor, gt_boxes: Tensor, scale: float = 4.0, pos_num: int = 1
) -> Tensor:
    """MMDetection ``PointAssigner``: 0 = background, ``i + 1`` = gt ``i``, per point.

    Each gt goes to level ``int((log2(w / scale) + log2(h / scale)) / 2)`` (truncated toward
    zero, clamped to the levels present); on that level its ``pos_num`` points nearest to the
    box centre in ``|(p - c) / (w, h)|`` become positive, unless an earlier gt holds the point
    at a strictly smaller distance. ``points`` (N, 2) xy, ``levels`` (N,) = log2(stride).
    """
    n = points.shape[0]
    assigned = points.new_zeros(n, dtype=torch.long)
    if gt_boxes.numel() == 0 or n == 0:
        return assigned
    dist_rec = points.new_full((n,), float("inf"))
    centre = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    wh = (gt_boxes[:, 2:] - gt_boxes[:, :2]).clamp(min=1e-6)
    gt_lvl = ((torch.log2(wh[:, 0] / scale) + torch.log2(wh[:, 1] / scale)) / 2).int()
    gt_lvl = gt_lvl.clamp(int(levels.min()), int(levels.max()))
    index = torch.arange(n, device=points.device)
    for g in range(gt_boxes.shape[0]):
        on_level = levels == gt_lvl[g]
        idx = index[on_level]
        dist = ((points[on_level] - centre[g]) / wh[g]).norm(dim=1)
        d, order = torch.topk(dist, min(pos_num, dist.numel()), largest=False)
        chosen = idx[order]
        better = d < dist_rec[chosen]
        assigned[chosen[better]] = g + 1
        dist_rec[chosen[better]] = d[better]
    return assigned


def max_iou_assign(
    boxes: Tensor, gt_boxes: Tensor, pos_iou: float = 0.5, neg_iou: float = 0.4,
    min_pos_iou: float = 0.0,
) -> Tensor:  # fmt: skip
    """MMDetection ``MaxIoUAssigner`` (``gt_max_assign_all=True``, ``match_low_quality=True``):
    -1 = ignored, 0 = negative, ``i + 1`` = gt ``i``.

    ``max IoU < neg_iou`` -> negative; ``>= pos_iou`` -> its best gt; then for each gt in
    order, every box whose IoU equals that gt's best IoU (if ``>= min_pos_iou``) goes to it.
    """
    n = boxes.shape[0]
    if gt_boxes.numel() == 0:
        return boxes.new_zeros(n, dtype=torch.long)
    assigned = boxes.new_full((n,), -1, dtype=torch.long)
    if n == 0:
        return assigned
    overlaps = box_iou(gt_boxes, boxes)  # (G, N)
    max_ov, argmax = overlaps.max(dim=0)
    assigned[(max_ov >= 0) & (max_ov < neg_iou)] = 0
    pos = max_ov >= pos_iou
    assigned[pos] = argmax[pos] + 1
    gt_max = overlaps.max(dim=1).values
    for g in range(gt_boxes.shape[0]):
        if gt_max[g] >= min_pos_iou:
            assigned[overlaps[g] == gt_max[g]] = g + 1
    return assigned


def smooth_l1(pred: Tensor, target: Tensor, beta: float) -> Tensor:
    """Element-wise ``0.5 d^2 / beta`` if ``|d| < beta`` else ``|d| - 0.5 beta``."""
    return F.smooth_l1_loss(pred, target, beta=beta, reduction="none")


def reppoints_loss(
    cls_out: list[Tensor],
    pts_init: list[Tensor],
    pts_refine: list[Tensor],
    strides: tuple[int, ...],
    targets: list[dict[str, Tensor]],
    transfer: Tensor,
    *,
    point_base_scale: float = 4.0,
    beta: float = 0.11,
    init_weight: float = 0.5,
    refine_weight: float = 1.0,
) -> dict[str, Tensor]:
    """The three RepPoints losses over a batch (see the module docstring for the formulas).

    ``cls_out`` (B, K, H, W), ``pts_init`` / ``pts_refine`` (B, 18, H, W) per level, y-first
    offsets in stride units; ``targets``: boxes xyxy and labels 1..K; ``transfer``: the
    gradient-scaled moment transfer. Averages use ``max(#positives, 1)`` (MMDetection divides
    by ``#positives + eps``, which explodes on a batch without objects: our choice).
    """
    centres, lvl, stride_of = grid_points(cls_out, strides), [], []
    for c, s in zip(cls_out, strides, strict=True):
        n = c.shape[-2] * c.shape[-1]
        lvl.append(torch.full((n,), int(round(torch.log2(torch.tensor(float(s))).item())),
                              device=c.device))  # fmt: skip
        stride_of.append(torch.full((n,), float(s), device=c.device))
    centre, levels, stride = torch.cat(centres), torch.cat(lvl), torch.cat(stride_of)

    def to_pixels(per_level: list[Tensor]) -> tuple[Tensor, Tensor]:
        xs, ys = zip(*(split_yx(p.float()) for p in per_level), strict=True)
        x, y = torch.cat(xs, dim=1), torch.cat(ys, dim=1)  # (B, N, P)
        return x * stride[:, None] + centre[:, 0:1], y * stride[:, None] + centre[:, 1:2]

    box_init = moment_box(*to_pixels(pts_init), transfer)  # (B, N, 4) pixels
    box_refine = moment_box(*to_pixels(pts_refine), transfer)
    cls = torch.cat([c.float().flatten(2).transpose(1, 2) for c in cls_out], dim=1)  # (B,N,K)
    norm = (point_base_scale * stride)[:, None]

    loss_cls = cls.sum() * 0.0
    init_sum = refine_sum = box_init.sum() * 0.0
    n_init = n_refine = 0
    for b, t in enumerate(targets):
        gt, labels = t["boxes"].float(), t["labels"].long() - 1
        a_init = point_assign(centre, levels, gt, point_base_scale)
        pos = a_init > 0
        if pos.any():
            diff = smooth_l1(box_init[b, pos] / norm[pos], gt[a_init[pos] - 1] / norm[pos], beta)
            init_sum = init_sum + diff.sum()
            n_init += int(pos.sum())
        a_ref = max_iou_assign(box_init[b].detach(), gt)
        pos = a_ref > 0
        onehot = torch.zeros_like(cls[b])
        if pos.any():
            onehot[pos, labels[a_ref[pos] - 1]] = 1.0
            diff = smooth_l1(box_refine[b, pos] / norm[pos], gt[a_ref[pos] - 1] / norm[pos], beta)
            refine_sum = refine_sum + diff.sum()
            n_refine += int(pos.sum())
        weight = (a_ref >= 0).float()[:, None]  # ignored priors (-1) carry no class loss
        focal = sigmoid_focal_loss(cls[b], onehot, alpha=0.25, gamma=2.0, reduction="none")
        loss_cls = loss_cls + (focal * weight).sum()
    return {
        "loss_cls": loss_cls / max(n_refine, 1),
        "loss_pts_init": init_weight * init_sum / max(n_init, 1),
        "loss_pts_refine": refine_weight * refine_sum / max(n_refine, 1),
    }

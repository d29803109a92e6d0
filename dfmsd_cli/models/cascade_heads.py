"""Building blocks of MMDetection's Cascade (Mask) R-CNN RoI head, on torchvision ops.

Everything here follows MMDetection 3.3 (``mmdet/models/roi_heads/``):

* :class:`PyramidRoIAlign` – ``SingleRoIExtractor`` with ``RoIAlign(aligned=True,
  sampling_ratio=0)``: an RoI of size ``s = sqrt(w h)`` is pooled from level
  ``clamp(floor(log2(s / 56 + 1e-6)), 0, L-1)`` (= FPN eq. 1 with k0=4, 224), with the level's
  stride given explicitly instead of inferred from the image size.
* :class:`Shared2FCBoxHead` – ``Shared2FCBBoxHead``: flatten 256x7x7 -> fc 1024 -> fc 1024,
  a (K+1)-way softmax classifier and a class-agnostic 4-d regressor. Background is column 0
  here (torchvision convention, labels 1..K); MMDetection puts it last, the converter moves it.
* :class:`FCNMaskHead` – ``FCNMaskHead``: 4 conv3x3(256)+ReLU, deconv x2 + ReLU, a 1x1 conv
  with one logit map per class (K maps, no background map).
* :func:`mask_targets` / :func:`mask_loss` – ``mask_target`` (aligned RoIAlign of the
  ground-truth bitmap to 28x28, binarised at 0.5) and the per-class BCE of ``FCNMaskHead.loss``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align


def boxes_to_rois(boxes: list[Tensor]) -> Tensor:
    """``bbox2roi``: per-image (n_i, 4) boxes -> (sum n_i, 5) rows [image index, x1, y1, x2, y2]."""
    rois = [
        torch.cat([b.new_full((b.shape[0], 1), float(i)), b[:, :4]], dim=1)
        for i, b in enumerate(boxes)
    ]
    return torch.cat(rois, dim=0)


class PyramidRoIAlign(nn.Module):
    """Pool each RoI from one FPN level, MMDetection's ``SingleRoIExtractor``.

    Level of an RoI with scale ``s = sqrt((x2-x1)(y2-y1))`` is
    ``clamp(floor(log2(s / finest_scale + 1e-6)), 0, len(strides)-1)``, ``finest_scale = 56``.
    Pooling is ``roi_align(feat, rois, output_size, 1/stride, sampling_ratio, aligned)``.
    """

    def __init__(
        self,
        strides: tuple[int, ...] = (4, 8, 16, 32),
        output_size: int = 7,
        sampling_ratio: int = 0,
        aligned: bool = True,
        finest_scale: float = 56.0,
    ) -> None:
        super().__init__()
        self.strides = tuple(strides)
        self.output_size = (output_size, output_size)
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.finest_scale = finest_scale

    def map_levels(self, rois: Tensor) -> Tensor:
        scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
        levels = torch.floor(torch.log2(scale / self.finest_scale + 1e-6))
        return levels.clamp(min=0, max=len(self.strides) - 1).long()

    def forward(self, feats: list[Tensor], rois: Tensor) -> Tensor:
        """``feats``: the maps at ``self.strides`` (finest first); ``rois``: (n, 5)."""
        c = feats[0].shape[1]
        out = feats[0].new_zeros((rois.shape[0], c, *self.output_size))
        if rois.shape[0] == 0:
            return out
        levels = self.map_levels(rois)
        for lvl, (feat, stride) in enumerate(zip(feats, self.strides, strict=True)):
            idx = torch.where(levels == lvl)[0]
            if idx.numel() == 0:
                # keep every level in the graph so DDP sees all parameters used
                out = out + 0.0 * feat.sum()
                continue
            pooled = roi_align(
                feat,
                rois[idx],
                self.output_size,
                spatial_scale=1.0 / stride,
                sampling_ratio=self.sampling_ratio,
                aligned=self.aligned,
            )
            out[idx] = pooled.to(out.dtype)
        return out


class Shared2FCBoxHead(nn.Module):
    """Two shared fully connected layers, then a softmax classifier and a box regressor.

    ``cls_score``: K+1 logits, background at index 0. ``bbox_pred``: 4 deltas
    (class-agnostic, ``reg_class_agnostic=True`` in MMDetection's cascade configs).
    """

    def __init__(
        self,
        in_channels: int = 256,
        roi_size: int = 7,
        fc_channels: int = 1024,
        num_classes: int = 80,
        class_agnostic: bool = True,
    ) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_channels * roi_size * roi_size, fc_channels)
        self.fc7 = nn.Linear(fc_channels, fc_channels)
        self.cls_score = nn.Linear(fc_channels, num_classes + 1)
        self.bbox_pred = nn.Linear(fc_channels, 4 if class_agnostic else 4 * (num_classes + 1))
        # MMDetection's init: normal(0, 0.01) for cls, normal(0, 0.001) for reg, xavier for fcs
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        for layer in (self.fc6, self.fc7):
            nn.init.xavier_uniform_(layer.weight)
        for layer in (self.fc6, self.fc7, self.cls_score, self.bbox_pred):
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(1)
        x = F.relu(self.fc6(x))
        x = F.relu(self.fc7(x))
        # float32 outputs: boxes are decoded from the deltas, fp16 would lose pixels at 1333 px
        return self.cls_score(x).float(), self.bbox_pred(x).float()


class FCNMaskHead(nn.Module):
    """``num_convs`` conv3x3+ReLU, a stride-2 deconv + ReLU, and 1x1 logits, one map per class."""

    def __init__(
        self,
        in_channels: int = 256,
        conv_channels: int = 256,
        num_convs: int = 4,
        num_classes: int = 80,
    ) -> None:
        super().__init__()
        convs = []
        for i in range(num_convs):
            convs.append(
                nn.Conv2d(in_channels if i == 0 else conv_channels, conv_channels, 3, padding=1)
            )
        self.convs = nn.ModuleList(convs)
        self.upsample = nn.ConvTranspose2d(conv_channels, conv_channels, 2, stride=2)
        self.conv_logits = nn.Conv2d(conv_channels, num_classes, 1)
        for m in [*self.convs, self.upsample]:
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        nn.init.kaiming_normal_(self.conv_logits.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.conv_logits.bias)

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = F.relu(conv(x))
        x = F.relu(self.upsample(x))
        return self.conv_logits(x).float()


def mask_targets(gt_masks: Tensor, rois: Tensor, matched: Tensor, size: int) -> Tensor:
    """Crop-and-resize each matched ground-truth mask to ``size`` x ``size``, binarised at 0.5.

    ``gt_masks``: (n_gt, H, W) of one image; ``rois``: (n, 4) boxes in the same coordinates;
    ``matched``: (n,) index of the ground truth of each RoI. Uses aligned RoIAlign as
    MMDetection's ``BitmapMasks.crop_and_resize``.
    """
    if rois.shape[0] == 0:
        return rois.new_zeros((0, size, size))
    boxes = torch.cat([matched[:, None].to(rois.dtype), rois], dim=1)
    out = roi_align(gt_masks[:, None].to(rois.dtype), boxes, (size, size), 1.0, 0, aligned=True)
    return (out[:, 0] >= 0.5).to(rois.dtype)


def mask_loss(mask_logits: Tensor, labels: Tensor, targets: Tensor) -> Tensor:
    """Mean BCE between the logit map of each RoI's class (labels 1..K) and its target."""
    if targets.numel() == 0:
        return mask_logits.sum() * 0.0
    idx = torch.arange(labels.shape[0], device=labels.device)
    logits = mask_logits[idx, labels - 1]
    return F.binary_cross_entropy_with_logits(logits, targets)


def box_stage_loss(
    cls_logits: Tensor, box_deltas: Tensor, labels: Tensor, reg_targets: Tensor, beta: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Softmax cross-entropy over all sampled RoIs, smooth-L1 (``beta``) on the positives.

    MMDetection's ``BBoxHead.loss``: the regression sum is divided by the number of sampled
    RoIs (``avg_factor = bbox_targets.size(0)``), the classification loss is the mean.
    """
    loss_cls = F.cross_entropy(cls_logits, labels)
    pos = labels > 0
    if box_deltas.shape[1] > 4:  # class-specific regression: pick each positive's class
        box_deltas = box_deltas.view(box_deltas.shape[0], -1, 4)[torch.arange(len(labels)), labels]
    loss_box = F.smooth_l1_loss(box_deltas[pos], reg_targets[pos], beta=beta, reduction="sum")
    return loss_cls, loss_box / max(labels.numel(), 1)

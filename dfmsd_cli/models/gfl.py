"""GFL (``gfl_*``): Generalized Focal Loss detector, MMDetection 3.3's ``gfl_r50_fpn_1x_coco``.

Li et al., "Generalized Focal Loss: Learning Qualified and Distributed Bounding Boxes for
Dense Object Detection", NeurIPS 2020. Structure (``mmdet/models/dense_heads/gfl_head.py``):

* FPN P3-P7 from C3-C5 with extra convs on the output and no ReLU before them
  (P6 = conv(P5), P7 = conv(P6));
* head: 4 conv3x3+GN(32)+ReLU per branch; ``gfl_cls`` K sigmoid logits (the joint
  class-IoU score); ``gfl_reg`` 4 x (reg_max + 1) = 68 bin logits, times a learnable
  ``Scale`` per level; ``integral.project`` = [0, 1, ..., 16] (a buffer, as in MMDetection);
* one anchor per location, size 8 x stride (used by ATSS only), distances in stride units;
* loss: QFL (avg over positives) + 2 x GIoU + 0.25 x DFL, both weighted by the predicted
  score of each positive and averaged by the sum of those weights;
* test: score > 0.05, top 1000 per level, NMS 0.6, 100 per image.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList

from dfmsd_cli.models.detector import DetectorMixin, class_nms, grid_points
from dfmsd_cli.models.gfl_losses import (
    aligned_iou,
    atss_assign,
    bbox2distance,
    distance2bbox,
    distribution_focal_loss,
    giou_loss,
    integral,
    quality_focal_loss,
)
from dfmsd_cli.models.mmdet_heads import MMDetExtraConvs
from dfmsd_cli.models.registry import annotate_model, register_head

GFL_STRIDES: tuple[int, ...] = (8, 16, 32, 64, 128)


class Scale(nn.Module):
    """A learnable scalar multiplier (MMCV ``Scale``)."""

    def __init__(self, value: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class ConvGN(nn.Module):
    """conv3x3 (no bias) + GroupNorm + ReLU: MMCV ``ConvModule`` with GN (``conv``/``norm``)."""

    def __init__(self, cin: int, cout: int, groups: int = 32) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.norm = nn.GroupNorm(min(groups, cout), cout)
        nn.init.normal_(self.conv.weight, std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.norm(self.conv(x)))


class GFLHead(nn.Module):
    """The GFL head on every FPN level; returns per level (cls logits, bin logits)."""

    def __init__(
        self, in_channels: int, num_classes: int, num_levels: int = 5, reg_max: int = 16
    ) -> None:
        super().__init__()
        self.cls_convs = nn.ModuleList(ConvGN(in_channels, in_channels) for _ in range(4))
        self.reg_convs = nn.ModuleList(ConvGN(in_channels, in_channels) for _ in range(4))
        self.gfl_cls = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.gfl_reg = nn.Conv2d(in_channels, 4 * (reg_max + 1), 3, padding=1)
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels))
        self.integral = nn.Module()
        self.integral.register_buffer("project", torch.linspace(0, reg_max, reg_max + 1))
        nn.init.normal_(self.gfl_cls.weight, std=0.01)
        nn.init.constant_(self.gfl_cls.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.normal_(self.gfl_reg.weight, std=0.01)
        nn.init.zeros_(self.gfl_reg.bias)

    def forward(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        cls_out, reg_out = [], []
        for x, scale in zip(feats, self.scales, strict=True):
            c, r = x, x
            for conv in self.cls_convs:
                c = conv(c)
            for conv in self.reg_convs:
                r = conv(r)
            cls_out.append(self.gfl_cls(c))
            reg_out.append(scale(self.gfl_reg(r)).float())
        return cls_out, reg_out

    # -- CrossKD hooks (``distill/losses/crosskd.py``): the head split at tower conv ``index``
    @property
    def num_convs(self) -> int:
        return len(self.cls_convs)

    def towers_until(self, x: Tensor, index: int) -> tuple[Tensor, Tensor]:
        """(cls, reg) tower features of one level after the first ``index`` convs, taken
        *before* the ReLU of conv ``index`` (CrossKD's crossing point; ``x`` for index 0)."""
        return tower_until(self.cls_convs, x, index), tower_until(self.reg_convs, x, index)

    def forward_from(
        self, cls_feat: Tensor, reg_feat: Tensor, level: int, index: int
    ) -> tuple[Tensor, Tensor]:
        """The rest of the head on one level from crossing point ``index`` (the ReLU of conv
        ``index`` first when index > 0): (cls logits, bin logits × Scale) as :meth:`forward`,
        so ``forward_from(*towers_until(x, i), level, i)`` is :meth:`forward` on ``x``."""
        c, r = (torch.relu(cls_feat), torch.relu(reg_feat)) if index else (cls_feat, reg_feat)
        for conv in self.cls_convs[index:]:
            c = conv(c)
        for conv in self.reg_convs[index:]:
            r = conv(r)
        return self.gfl_cls(c), self.scales[level](self.gfl_reg(r)).float()


def tower_until(convs: nn.ModuleList, x: Tensor, index: int) -> Tensor:
    """``convs[:index]`` (:class:`ConvGN`) on ``x``, the last one without its ReLU (MMCV
    ``ConvModule(..., activate=False)``, the feature CrossKD crosses at); ``x`` for index 0."""
    for k, conv in enumerate(convs[:index]):
        x = conv.norm(conv.conv(x))
        if k < index - 1:
            x = torch.relu(x)
    return x


def _flatten(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H W, C), row-major locations as the anchors."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])


class GFLDetector(DetectorMixin, nn.Module):
    """Backbone+FPN -> :class:`GFLHead`, the dfmsd one-pass contract."""

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        strides: tuple[int, ...] = GFL_STRIDES,
        reg_max: int = 16,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.6,
        detections_per_img: int = 100,
        topk_candidates: int = 1000,
        atss_topk: int = 9,
        octave_base_scale: float = 8.0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = GFLHead(backbone.out_channels, num_classes, len(strides), reg_max)
        self.reg_max = reg_max
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.topk_candidates = topk_candidates
        self.atss_topk = atss_topk
        self.octave_base_scale = octave_base_scale
        self.init_contract(num_classes, strides)
        self.logit_anchors = 1

    def points(self, feats: list[Tensor]) -> list[Tensor]:
        """Anchor centres ``(j s, i s)`` per level, row-major (MMDetection ``center_offset=0``)."""
        return grid_points(feats, self.strides)

    def forward_head(
        self,
        image_list: ImageList,
        features: dict[int, Tensor],
        targets: list[dict[str, Tensor]] | None,
    ) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
        feats = list(features.values())
        cls_out, reg_out = self.head(feats)
        points = self.points(feats)
        self.keep_logits(cls_out)
        if self.training:
            assert targets is not None
            return self.loss(cls_out, reg_out, points, targets), []
        return {}, self.predict(cls_out, reg_out, points, image_list.image_sizes)

    # ----------------------------------------------------------------------------- losses
    def loss(
        self,
        cls_out: list[Tensor],
        reg_out: list[Tensor],
        points: list[Tensor],
        targets: list[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        k = self.num_classes
        counts = [p.shape[0] for p in points]
        all_points = torch.cat(points)
        anchors = self.atss_anchors(points)
        stride_of = torch.cat([p.new_full((n,), float(s)) for p, n, s in
                               zip(points, counts, self.strides, strict=True)])  # fmt: skip
        labels, boxes = [], []
        for t in targets:
            lab, box = atss_assign(
                anchors, counts, t["boxes"].float(), t["labels"] - 1, k, self.atss_topk
            )
            labels.append(lab)
            boxes.append(box)
        labels_t = torch.cat(labels)
        boxes_t = torch.cat(boxes)
        cls = torch.cat([_flatten(c) for c in cls_out], dim=1).reshape(-1, k).float()
        reg = torch.cat([_flatten(r) for r in reg_out], dim=1).reshape(-1, 4 * (self.reg_max + 1))
        n_img = len(targets)
        pts = all_points.repeat(n_img, 1)
        strides = stride_of.repeat(n_img)
        pos = torch.where(labels_t < k)[0]
        scores = cls.new_zeros(labels_t.shape[0])
        if pos.numel():
            s = strides[pos, None]
            centers = pts[pos] / s
            pred_dist = integral(reg[pos], self.head.integral.project)
            pred_boxes = distance2bbox(centers, pred_dist)
            target_boxes = boxes_t[pos] / s
            scores[pos] = aligned_iou(pred_boxes.detach(), target_boxes)
            weight = cls.detach().sigmoid().max(dim=1).values[pos]
            loss_box = (giou_loss(pred_boxes, target_boxes) * weight).sum()
            target_dist = bbox2distance(centers, target_boxes, self.reg_max).reshape(-1)
            dfl = distribution_focal_loss(reg[pos].reshape(-1, self.reg_max + 1), target_dist)
            loss_dfl = (dfl * weight[:, None].expand(-1, 4).reshape(-1)).sum() / 4.0
            norm = weight.sum().clamp(min=1.0)
        else:
            loss_box = loss_dfl = reg.sum() * 0.0
            norm = reg.new_tensor(1.0)
        qfl = quality_focal_loss(cls, labels_t, scores).sum() / max(float(pos.numel()), 1.0)
        return {
            "loss_cls": qfl,
            "loss_bbox": 2.0 * loss_box / norm,
            "loss_dfl": 0.25 * loss_dfl / norm,
        }

    def atss_anchors(self, points: list[Tensor]) -> Tensor:
        """The square ATSS anchors (side ``octave_base_scale × stride``) at ``points``, xyxy."""
        half = torch.cat(
            [p.new_full((p.shape[0], 1), self.octave_base_scale * s / 2) for p, s in
             zip(points, self.strides, strict=True)]
        )  # fmt: skip
        all_points = torch.cat(points)
        return torch.cat([all_points - half, all_points + half], dim=1)

    def num_positives(self, feats: list[Tensor], targets: list[dict[str, Tensor]]) -> int:
        """How many locations ATSS assigns a box in the batch: the normaliser of the QFL term
        (MMDetection's ``avg_factor``), which CrossKD's class term shares."""
        points = self.points(feats)
        anchors = self.atss_anchors(points)
        counts = [p.shape[0] for p in points]
        k, n = self.num_classes, 0
        for t in targets:
            lab, _ = atss_assign(
                anchors, counts, t["boxes"].float(), t["labels"] - 1, k, self.atss_topk
            )
            n += int((lab < k).sum())
        return n

    # -------------------------------------------------------------------------- inference
    def predict(
        self,
        cls_out: list[Tensor],
        reg_out: list[Tensor],
        points: list[Tensor],
        image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        results = []
        for i, size in enumerate(image_sizes):
            boxes_l, scores_l, labels_l = [], [], []
            for c, r, p, s in zip(cls_out, reg_out, points, self.strides, strict=True):
                scores = _flatten(c[i : i + 1])[0].float().sigmoid()
                flat = scores.reshape(-1)
                keep = torch.where(flat > self.score_thresh)[0]
                sc = flat[keep]
                if sc.numel() > self.topk_candidates:
                    sc, order = sc.topk(self.topk_candidates)
                    keep = keep[order]
                loc, cls_idx = keep // self.num_classes, keep % self.num_classes
                reg = _flatten(r[i : i + 1])[0][loc]
                dist = integral(reg, self.head.integral.project) * s
                boxes_l.append(distance2bbox(p[loc], dist, size))
                scores_l.append(sc)
                labels_l.append(cls_idx + 1)
            boxes, scores, labels = torch.cat(boxes_l), torch.cat(scores_l), torch.cat(labels_l)
            results.append(
                class_nms(boxes, scores, labels, self.nms_thresh, self.detections_per_img, True)
            )
        return results


def build_gfl(
    backbone: nn.Module, num_classes: int, strides: tuple[int, ...] = GFL_STRIDES, **options
) -> GFLDetector:
    """``gfl_{backbone}``: replaces the FPN's P6/P7 block by MMDetection's ``on_output`` convs."""
    c = backbone.out_channels
    backbone.fpn.extra_blocks = MMDetExtraConvs(c, c, source="output", relu_before=False)
    return GFLDetector(backbone, num_classes, strides, **options)


register_head(
    "gfl",
    build_gfl,
    strides=GFL_STRIDES,
    extra="p6p7",
    description="GFL (QFL + DFL reg_max 16 + GIoU, ATSS), MMDetection layout",
    family="one_stage",
)
for _name, _ap, _file in (
    ("gfl_r50", 40.2, "gfl_r50_fpn_1x_coco_20200629_121244-25944287.pth"),
    ("gfl_r101", 44.7, "gfl_r101_fpn_mstrain_2x_coco_20200629_200126-dd12f847.pth"),
    ("gfl_x101_32x4d", 45.9, "gfl_x101_32x4d_fpn_mstrain_2x_coco_20200630_102002-50c1ffdb.pth"),
):
    annotate_model(_name, published_ap=_ap, checkpoint=_file)

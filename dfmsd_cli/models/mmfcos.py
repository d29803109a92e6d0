"""MMDetection-faithful FCOS (``mmfcos_*``) and caffe-style ResNets (``r50_caffe``, ``r101_caffe``).

FCOS (Tian et al., ICCV 2019) as MMDetection 3.3's ``fcos_r101-caffe_fpn_gn-head*`` configs
(``mmdet/models/dense_heads/fcos_head.py``), where torchvision's FCOS (``fcos_*``) differs:

* FPN P6/P7 are convs on the **output**: P6 = conv(P5), P7 = conv(relu(P6))
  (``add_extra_convs='on_output'``, ``relu_before_extra_convs=True``, which MMDetection's FPN
  applies before the second and later extra convs only);
* head: 4 conv3x3+GN+ReLU per branch (``cls_convs``, ``reg_convs``), ``conv_cls`` (K sigmoid
  logits), ``conv_reg`` (4), ``conv_centerness`` (1) on the **classification** branch, and a
  learnable ``Scale`` per level; distances are ``exp(scale * conv_reg)`` in pixels
  (``norm_on_bbox=False``);
* points at ``(j + 0.5) * stride``; targets: points inside a box, regress ranges
  (-1, 64), (64, 128), (128, 256), (256, 512), (512, inf), the smallest box wins;
* losses: focal (gamma 2, alpha 0.25) / #pos, IoU loss ``-log IoU`` weighted by the
  centerness target, centerness BCE / #pos;
* test: sigmoid score > 0.05, top 1000 per level, score x centerness, NMS 0.5, 100 per image.

Caffe-style ResNet (MMDetection ``style='caffe'``): the stride-2 of each stage's first block
is on its 1x1 ``conv1`` instead of the 3x3 ``conv2``, and the network expects BGR input minus
a mean with std 1: [103.53, 116.28, 123.675] in MMDetection's RetinaNet / Faster / Cascade R-CNN
caffe configs (:data:`CAFFE_MEAN_BGR`, the default), the Detectron [102.9801, 115.9465,
122.7717] in its FCOS configs (:data:`DETECTRON_MEAN_BGR`, set by ``mmfcos``; both from the
configs' ``data_preprocessor.mean``). :class:`CaffeStemConv` converts dfmsd's standard input
(RGB, ImageNet mean/std) to that inside the model, so the data pipeline stays the same; the
only difference from MMDetection is in the zero-padded border, where the padding value differs
by less than one grey level.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import sigmoid_focal_loss

from dfmsd_cli.data.geometry import IMAGENET_MEAN, IMAGENET_STD
from dfmsd_cli.models.backbones import build_resnet_fpn
from dfmsd_cli.models.detector import DetectorMixin, class_nms, grid_points
from dfmsd_cli.models.gfl import ConvGN, Scale, tower_until
from dfmsd_cli.models.gfl_losses import aligned_iou, distance2bbox
from dfmsd_cli.models.mmdet_heads import MMDetExtraConvs
from dfmsd_cli.models.registry import annotate_model, register_backbone, register_head

FCOS_STRIDES: tuple[int, ...] = (8, 16, 32, 64, 128)
REGRESS_RANGES = ((-1.0, 64.0), (64.0, 128.0), (128.0, 256.0), (256.0, 512.0), (512.0, 1e8))
CAFFE_MEAN_BGR = (103.53, 116.28, 123.675)  # MMDetection caffe configs (R-CNNs, RetinaNet)
DETECTRON_MEAN_BGR = (102.9801, 115.9465, 122.7717)  # MMDetection FCOS caffe configs


# ------------------------------------------------------------------------------ caffe ResNet
class CaffeStemConv(nn.Conv2d):
    """The stem conv of a caffe ResNet, fed dfmsd's normalised RGB input.

    ``x_caffe = flip_rgb_to_bgr(x * std + mean) - caffe_mean_bgr``, then the convolution.
    Same parameters (and state-dict keys) as ``nn.Conv2d``; the constants are non-persistent.
    """

    def __init__(
        self, conv: nn.Conv2d, caffe_mean: tuple[float, float, float] = CAFFE_MEAN_BGR
    ) -> None:
        super().__init__(3, conv.out_channels, 7, 2, 3, bias=False)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        caffe = torch.tensor(caffe_mean).view(1, 3, 1, 1)
        self.register_buffer("in_mean", mean, persistent=False)
        self.register_buffer("in_std", std, persistent=False)
        self.register_buffer("caffe_mean", caffe, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        bgr = (x * self.in_std + self.in_mean).flip(1) - self.caffe_mean
        return super().forward(bgr)


def build_caffe_resnet_fpn(
    arch: str, strides: tuple[int, ...], extra: str, norm: str = "frozen_bn", frozen_stages: int = 1
) -> nn.Module:
    """torchvision ResNet with the first-block strides moved to ``conv1`` and a caffe stem."""
    backbone = build_resnet_fpn(arch, strides, extra, norm=norm, frozen_stages=frozen_stages)
    body = backbone.body
    stem = CaffeStemConv(body.conv1)
    stem.requires_grad_(body.conv1.weight.requires_grad)
    body.conv1 = stem
    for name in ("layer1", "layer2", "layer3", "layer4"):
        if name not in body:
            continue
        block = getattr(body, name)[0]
        if block.conv2.stride != (1, 1):
            block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)
    return backbone


for _arch in ("r50", "r101"):
    register_backbone(
        f"{_arch}_caffe",
        partial(build_caffe_resnet_fpn, _arch),
        channels=256,
        description=f"ResNet-{_arch[1:]} caffe style FPN (MMDetection/Detectron weights)",
    )


# ------------------------------------------------------------------------------- FCOS head
class MMFCOSHead(nn.Module):
    """``FCOSHead`` with GN: per level (cls logits, exp-distances, centerness logits)."""

    def __init__(self, in_channels: int, num_classes: int, num_levels: int = 5) -> None:
        super().__init__()
        self.cls_convs = nn.ModuleList(ConvGN(in_channels, in_channels) for _ in range(4))
        self.reg_convs = nn.ModuleList(ConvGN(in_channels, in_channels) for _ in range(4))
        self.conv_cls = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.conv_reg = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.conv_centerness = nn.Conv2d(in_channels, 1, 3, padding=1)
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels))
        for conv in (self.conv_cls, self.conv_reg, self.conv_centerness):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.conv_cls.bias, -math.log((1 - 0.01) / 0.01))

    def forward(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        cls_out, reg_out, ctr_out = [], [], []
        for x, scale in zip(feats, self.scales, strict=True):
            c, r = x, x
            for conv in self.cls_convs:
                c = conv(c)
            for conv in self.reg_convs:
                r = conv(r)
            cls_out.append(self.conv_cls(c))
            ctr_out.append(self.conv_centerness(c))  # centerness on the cls branch
            reg_out.append(scale(self.conv_reg(r)).float().exp())
        return cls_out, reg_out, ctr_out

    # -- CrossKD hooks (``distill/losses/crosskd.py``), as ``GFLHead``'s
    def towers_until(self, x: Tensor, index: int) -> tuple[Tensor, Tensor]:
        """(cls, reg) tower features after the first ``index`` convs, before that ReLU."""
        return tower_until(self.cls_convs, x, index), tower_until(self.reg_convs, x, index)

    def forward_from(
        self, cls_feat: Tensor, reg_feat: Tensor, level: int, index: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The rest of the head on one level from crossing point ``index``: (cls logits,
        exp-distances, centerness logits) as :meth:`forward`."""
        c, r = (torch.relu(cls_feat), torch.relu(reg_feat)) if index else (cls_feat, reg_feat)
        for conv in self.cls_convs[index:]:
            c = conv(c)
        for conv in self.reg_convs[index:]:
            r = conv(r)
        reg = self.scales[level](self.conv_reg(r)).float().exp()
        return self.conv_cls(c), reg, self.conv_centerness(c)


def _flat(x: Tensor) -> Tensor:
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])


class MMFCOSDetector(DetectorMixin, nn.Module):
    """Backbone+FPN -> :class:`MMFCOSHead`, the dfmsd one-pass contract."""

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        strides: tuple[int, ...] = FCOS_STRIDES,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        topk_candidates: int = 1000,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = MMFCOSHead(backbone.out_channels, num_classes, len(strides))
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.topk_candidates = topk_candidates
        self.init_contract(num_classes, strides)
        self.logit_anchors = 1

    def points(self, feats: list[Tensor]) -> list[Tensor]:
        return grid_points(feats, self.strides, offset=0.5)  # MMDetection FCOS: cell centres

    def forward_head(self, image_list: ImageList, features, targets):
        feats = list(features.values())
        cls_out, reg_out, ctr_out = self.head(feats)
        points = self.points(feats)
        self.keep_logits(cls_out)
        if self.training:
            return self.loss(cls_out, reg_out, ctr_out, points, targets), []
        return {}, self.predict(cls_out, reg_out, ctr_out, points, image_list.image_sizes)

    def targets_for(
        self, points: list[Tensor], boxes: Tensor, labels: Tensor
    ) -> tuple[Tensor, Tensor]:
        """FCOS targets of one image: labels (P,) in 0..K-1 or K, distances (P, 4)."""
        pts = torch.cat(points)
        ranges = torch.cat(
            [
                pts.new_tensor(r).expand(len(p), 2)
                for p, r in zip(points, REGRESS_RANGES, strict=False)
            ]
        )
        k = self.num_classes
        if boxes.shape[0] == 0:
            return pts.new_full((len(pts),), k, dtype=torch.long), pts.new_zeros((len(pts), 4))
        left = pts[:, None, 0] - boxes[None, :, 0]
        top = pts[:, None, 1] - boxes[None, :, 1]
        right = boxes[None, :, 2] - pts[:, None, 0]
        bottom = boxes[None, :, 3] - pts[:, None, 1]
        dist = torch.stack([left, top, right, bottom], dim=-1)  # (P, G, 4)
        inside = dist.min(dim=-1).values > 0
        max_d = dist.max(dim=-1).values
        in_range = (max_d >= ranges[:, None, 0]) & (max_d <= ranges[:, None, 1])
        areas = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[None].expand(
            len(pts), -1
        )
        areas = areas.masked_fill(~(inside & in_range), float("inf"))
        min_area, idx = areas.min(dim=1)
        lab = labels[idx].long()
        lab[min_area == float("inf")] = k
        return lab, dist[torch.arange(len(pts)), idx]

    def centerness_norm(self, feats: list[Tensor], targets: list[dict[str, Tensor]]) -> float:
        """Σ of the positives' centerness targets in the batch: the IoU loss's normaliser,
        which CrossKD's FCOS terms share (``pos_centerness_denorm``)."""
        points, total = self.points(feats), 0.0
        for t in targets:
            lab, dist = self.targets_for(points, t["boxes"].float(), t["labels"] - 1)
            d = dist[lab < self.num_classes]
            lr, tb = d[:, [0, 2]], d[:, [1, 3]]
            ctr = torch.sqrt(
                (lr.min(1).values / lr.max(1).values) * (tb.min(1).values / tb.max(1).values)
            )
            total += float(ctr.sum())
        return total

    def loss(self, cls_out, reg_out, ctr_out, points, targets) -> dict[str, Tensor]:
        k = self.num_classes
        cls = torch.cat([_flat(c) for c in cls_out], 1).reshape(-1, k).float()
        reg = torch.cat([_flat(r) for r in reg_out], 1).reshape(-1, 4)
        ctr = torch.cat([_flat(c) for c in ctr_out], 1).reshape(-1).float()
        labels, dists = zip(
            *(self.targets_for(points, t["boxes"].float(), t["labels"] - 1) for t in targets),
            strict=True,
        )
        labels_t, dists_t = torch.cat(labels), torch.cat(dists)
        pos = torch.where(labels_t < k)[0]
        num_pos = max(float(pos.numel()), 1.0)
        onehot = torch.zeros_like(cls)
        onehot[pos, labels_t[pos]] = 1.0
        loss_cls = sigmoid_focal_loss(cls, onehot, alpha=0.25, gamma=2.0, reduction="sum") / num_pos
        if pos.numel() == 0:
            zero = reg.sum() * 0.0 + ctr.sum() * 0.0
            return {"loss_cls": loss_cls, "loss_bbox": zero, "loss_centerness": zero}
        pts = torch.cat(points).repeat(len(targets), 1)[pos]
        t = dists_t[pos]
        lr, tb = t[:, [0, 2]], t[:, [1, 3]]
        ctr_t = torch.sqrt(
            (lr.min(1).values / lr.max(1).values) * (tb.min(1).values / tb.max(1).values)
        )
        iou = aligned_iou(distance2bbox(pts, reg[pos]), distance2bbox(pts, t))
        loss_bbox = (-iou.clamp(min=1e-6).log() * ctr_t).sum() / ctr_t.sum().clamp(min=1e-6)
        loss_ctr = F.binary_cross_entropy_with_logits(ctr[pos], ctr_t, reduction="sum") / num_pos
        return {"loss_cls": loss_cls, "loss_bbox": loss_bbox, "loss_centerness": loss_ctr}

    def predict(self, cls_out, reg_out, ctr_out, points, image_sizes) -> list[dict[str, Tensor]]:
        results = []
        for i, size in enumerate(image_sizes):
            boxes_l, scores_l, labels_l = [], [], []
            for c, r, ce, p in zip(cls_out, reg_out, ctr_out, points, strict=True):
                flat = _flat(c[i : i + 1])[0].float().sigmoid().reshape(-1)
                keep = torch.where(flat > self.score_thresh)[0]
                sc = flat[keep]
                if sc.numel() > self.topk_candidates:
                    sc, order = sc.topk(self.topk_candidates)
                    keep = keep[order]
                loc, cls_idx = keep // self.num_classes, keep % self.num_classes
                centerness = _flat(ce[i : i + 1])[0, loc, 0].float().sigmoid()
                boxes_l.append(distance2bbox(p[loc], _flat(r[i : i + 1])[0][loc], size))
                scores_l.append(sc * centerness)
                labels_l.append(cls_idx + 1)
            boxes, scores, labels = torch.cat(boxes_l), torch.cat(scores_l), torch.cat(labels_l)
            results.append(
                class_nms(boxes, scores, labels, self.nms_thresh, self.detections_per_img, True)
            )
        return results


def build_mmfcos(
    backbone: nn.Module, num_classes: int, strides: tuple[int, ...] = FCOS_STRIDES, **options
) -> MMFCOSDetector:
    c = backbone.out_channels
    backbone.fpn.extra_blocks = MMDetExtraConvs(c, c, source="output", relu_before=True)
    stem = getattr(getattr(backbone, "body", None), "conv1", None)
    if isinstance(stem, CaffeStemConv):  # FCOS configs subtract the Detectron mean
        stem.caffe_mean = torch.tensor(DETECTRON_MEAN_BGR, device=stem.weight.device).view(
            1, 3, 1, 1
        )
    return MMFCOSDetector(backbone, num_classes, strides, **options)


register_head(
    "mmfcos",
    build_mmfcos,
    strides=FCOS_STRIDES,
    extra="p6p7",
    description="FCOS, MMDetection layout (GN head, Scale, centerness on cls branch)",
    family="one_stage",
)
for _name, _ap, _file in (
    ("mmfcos_r101_caffe", 40.8, "fcos_r101_caffe_fpn_gn-head_mstrain_640-800_2x_coco-511424d6.pth"),
):
    annotate_model(_name, published_ap=_ap, checkpoint=_file)

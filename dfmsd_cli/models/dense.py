"""Dense one-stage heads on P3-P7 (strides 8..128): RetinaNet and FCOS from torchvision.

* RetinaNet (Lin et al. 2017, "Focal Loss for Dense Object Detection"): 9 anchors per
  location (octave base size ``4 * stride``, scales 2^{0, 1/3, 2/3}, ratios 0.5/1/2), 4-conv
  classification and regression towers, sigmoid focal loss (alpha 0.25, gamma 2) over the
  K+1 torchvision class columns, L1 box loss on (dx, dy, dw, dh) deltas.
* FCOS (Tian et al. 2019): anchor-free, one point per location, GroupNorm towers,
  centre-sampling radius 1.5, focal + GIoU + centerness BCE losses.

Test-time settings follow MMDetection's configs (score > 0.05, NMS 0.5, 100 detections per
image), which COCO evaluation at 100 detections expects; torchvision's FCOS default score
threshold (0.2) would cut the recall of the AP curve.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchvision.models.detection.fcos import FCOS
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead

from dfmsd_cli.errors import UserError
from dfmsd_cli.models.detector import DetectorMixin, StrideAnchorGenerator, drop_background
from dfmsd_cli.models.registry import register_head

DENSE_STRIDES = (8, 16, 32, 64, 128)


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups (Wu & He 2018), fewer when ``channels`` is not a multiple."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


def _head_norm(head_norm: str | None):
    if head_norm in (None, "none"):
        return None
    if head_norm == "gn":
        return _group_norm
    raise UserError(f"unknown head_norm '{head_norm}': use 'gn' or 'none'")


def tv_level_logits(cls_logits: Tensor, feats: list[Tensor], anchors: int) -> list[Tensor]:
    """torchvision's flattened (B, Σ H_l W_l A, K+1) class logits -> per level (B, A·K, H, W).

    torchvision orders a level's rows (h, w, a) and keeps a background column 0 (never a
    positive target); the per-level maps drop it and are anchor-major (a outer, k inner), the
    MMDetection layout the SLD loss expects.
    """
    b, _, k1 = cls_logits.shape
    out = []
    for x, f in zip(cls_logits.split([f.shape[2] * f.shape[3] * anchors for f in feats], 1),
                    feats, strict=True):  # fmt: skip
        h, w = f.shape[2:]
        x = x.reshape(b, h, w, anchors, k1)[..., 1:]
        out.append(x.permute(0, 3, 4, 1, 2).reshape(b, anchors * (k1 - 1), h, w))
    return out


def _split_levels(
    head_outputs: dict[str, Tensor], anchors: list[Tensor], feats: list[Tensor]
) -> tuple[dict[str, list[Tensor]], list[list[Tensor]]]:
    """Split flattened (B, sum_l H_l W_l A, .) head outputs and anchors back into levels."""
    hw = [f.shape[2] * f.shape[3] for f in feats]
    a = head_outputs["cls_logits"].shape[1] // sum(hw)
    sizes = [n * a for n in hw]
    split = {k: list(v.float().split(sizes, dim=1)) for k, v in head_outputs.items()}
    return split, [list(x.split(sizes)) for x in anchors]


class RetinaDetector(DetectorMixin, RetinaNet):
    """torchvision RetinaNet under the dfmsd contract (see detector.py)."""

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        strides: tuple[int, ...] = DENSE_STRIDES,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        topk_candidates: int = 1000,
        head_norm: str | None = None,
    ) -> None:
        # torchvision truncates the octave sizes with int(); MMDetection does not (see notes)
        octaves = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
        sizes = tuple(tuple(int(4 * s * o) for o in octaves) for s in strides)
        anchors = StrideAnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(strides), strides)
        head = RetinaNetHead(
            backbone.out_channels,
            anchors.num_anchors_per_location()[0],
            num_classes + 1,
            norm_layer=_head_norm(head_norm),
        )
        super().__init__(
            backbone,
            num_classes + 1,
            anchor_generator=anchors,
            head=head,
            score_thresh=score_thresh,
            nms_thresh=nms_thresh,
            detections_per_img=detections_per_img,
            topk_candidates=topk_candidates,
        )
        self.init_contract(num_classes, strides)
        self.logit_anchors = anchors.num_anchors_per_location()[0]

    def forward_head(self, image_list: ImageList, features, targets):
        feats = list(features.values())
        head_outputs = self.head(feats)
        anchors = self.anchor_generator(image_list, feats)
        if self._kept_logits is not None:
            self.keep_logits(tv_level_logits(head_outputs["cls_logits"], feats, self.logit_anchors))
        if self.training:
            outs = {k: v.float() for k, v in head_outputs.items()}  # losses in fp32 under AMP
            return self.compute_loss(targets, outs, anchors), []
        split, split_anchors = _split_levels(head_outputs, anchors, feats)
        dets = self.postprocess_detections(split, split_anchors, image_list.image_sizes)
        return {}, drop_background(dets)

    # -- CrossKD hooks (``distill/losses/crosskd.py``)
    def level_anchors(self, feats: list[Tensor]) -> list[Tensor]:
        """Per level the (h, w, A, 4) xyxy anchors of maps ``feats`` (row-major, a inner)."""
        sizes = [(f.shape[-2] * s, f.shape[-1] * s) for f, s in zip(feats, self.strides,
                                                                      strict=True)]  # fmt: skip
        anchors = self.anchor_generator(ImageList(feats[0][:1], sizes[:1]), feats)[0]
        a = self.logit_anchors
        out = []
        for x, f in zip(anchors.split([f.shape[2] * f.shape[3] * a for f in feats]), feats,
                        strict=True):  # fmt: skip
            out.append(x.reshape(f.shape[2], f.shape[3], a, 4))
        return out

    def num_positives(self, feats: list[Tensor], targets: list[dict[str, Tensor]]) -> int:
        """The anchors the RetinaNet matcher (IoU ≥ 0.5, low-quality matches kept) assigns a
        box in the batch: the focal loss's normaliser, which CrossKD's terms share."""
        from torchvision.ops import box_iou

        anchors = torch.cat([x.reshape(-1, 4) for x in self.level_anchors(feats)])
        n = 0
        for t in targets:
            if t["boxes"].numel():
                n += int((self.proposal_matcher(box_iou(t["boxes"].float(), anchors)) >= 0).sum())
        return n


class RetinaHeadSplit(nn.Module):
    """torchvision's ``RetinaNetHead`` split at tower conv ``index`` for CrossKD (the same
    calls as ``GFLHead.towers_until`` / ``forward_from``); wraps the head, adds no weights."""

    def __init__(self, head: RetinaNetHead) -> None:
        super().__init__()
        self.head = head

    @property
    def num_convs(self) -> int:
        return len(self.head.classification_head.conv)

    @staticmethod
    def _until(blocks: nn.Sequential, x: Tensor, index: int) -> Tensor:
        for k, block in enumerate(blocks[:index]):
            for layer in list(block)[:-1]:  # conv (+ norm), not the ReLU after it
                x = layer(x)
            if k < index - 1:
                x = torch.relu(x)
        return x

    def towers_until(self, x: Tensor, index: int) -> tuple[Tensor, Tensor]:
        """(cls, reg) tower features after the first ``index`` convs, before that ReLU."""
        h = self.head
        return (self._until(h.classification_head.conv, x, index),
                self._until(h.regression_head.conv, x, index))  # fmt: skip

    def forward_from(
        self, cls_feat: Tensor, reg_feat: Tensor, level: int, index: int
    ) -> tuple[Tensor, Tensor]:
        """The rest of the head from ``index``: (class logits (B, A·K, h, w) anchor-major
        without torchvision's background column, box deltas (B, A·4, h, w))."""
        h = self.head
        c, r = (torch.relu(cls_feat), torch.relu(reg_feat)) if index else (cls_feat, reg_feat)
        c = h.classification_head.cls_logits(h.classification_head.conv[index:](c))
        r = h.regression_head.bbox_reg(h.regression_head.conv[index:](r))
        b, _, hh, ww = c.shape
        k1 = h.classification_head.num_classes
        c = c.reshape(b, -1, k1, hh, ww)[:, :, 1:].reshape(b, -1, hh, ww)
        return c, r


class FCOSDetector(DetectorMixin, FCOS):
    """torchvision FCOS under the dfmsd contract (see detector.py)."""

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        strides: tuple[int, ...] = DENSE_STRIDES,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        topk_candidates: int = 1000,
        center_sampling_radius: float = 1.5,
    ) -> None:
        # FCOS uses the "anchors" only as points: centre = location, size = stride
        anchors = StrideAnchorGenerator(
            tuple((s,) for s in strides), ((1.0,),) * len(strides), strides
        )
        super().__init__(
            backbone,
            num_classes + 1,
            anchor_generator=anchors,
            score_thresh=score_thresh,
            nms_thresh=nms_thresh,
            detections_per_img=detections_per_img,
            topk_candidates=topk_candidates,
            center_sampling_radius=center_sampling_radius,
        )
        self.init_contract(num_classes, strides)
        self.logit_anchors = 1

    def forward_head(self, image_list: ImageList, features, targets):
        feats = list(features.values())
        head_outputs = self.head(feats)
        anchors = self.anchor_generator(image_list, feats)
        if self._kept_logits is not None:
            self.keep_logits(tv_level_logits(head_outputs["cls_logits"], feats, 1))
        n_per_level = [f.shape[2] * f.shape[3] for f in feats]
        if self.training:
            outs = {k: v.float() for k, v in head_outputs.items()}
            return self.compute_loss(targets, outs, anchors, n_per_level), []
        split, split_anchors = _split_levels(head_outputs, anchors, feats)
        dets = self.postprocess_detections(split, split_anchors, image_list.image_sizes)
        return {}, drop_background(dets)


register_head(
    "retina",
    RetinaDetector,
    strides=DENSE_STRIDES,
    extra="p6p7",
    description="RetinaNet",
    family="one_stage",
)
register_head(
    "fcos",
    FCOSDetector,
    strides=DENSE_STRIDES,
    extra="p6p7",
    description="FCOS",
    family="one_stage",
)

"""The Detector contract: one forward pass gives losses or detections AND the FPN features.

Every detector in the zoo is a torchvision detection model (so state-dict keys match
torchvision's and its pretrained weights load) mixed with :class:`DetectorMixin`, which
replaces torchvision's ``forward``:

* the input is already resized, normalised and padded by the data pipeline
  (``data/geometry.py``); we wrap it in an :class:`ImageList` ourselves and never call
  ``GeneralizedRCNNTransform`` (it would resize again);
* ``model(images, image_sizes, targets)`` runs the backbone+FPN exactly once and returns
  :class:`DetectorOutput` with ``losses`` (train mode) or ``detections`` (eval mode) and the
  features ``{stride: (B, C, ceil(H/s), ceil(W/s))}`` of that same pass, which the teacher
  store and the distillation losses consume. No hooks are involved.

Labels are 1..K; internally the heads use torchvision's convention of ``K + 1`` classes with
index 0 as background. Detections are in input (resized) coordinates.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList


@dataclass
class DetectorOutput:
    """What one forward pass returns (see docs/architecture.md, "Models")."""

    losses: dict[str, Tensor] = field(default_factory=dict)
    detections: list[dict[str, Tensor]] = field(default_factory=list)
    features: dict[int, Tensor] = field(default_factory=dict)
    # ``return_logits=True`` on a dense detector: {stride: (B, A·K, h_s, w_s)} class logits
    logits: dict[int, Tensor] = field(default_factory=dict)


class StrideAnchorGenerator(AnchorGenerator):
    """torchvision's AnchorGenerator with the true FPN strides instead of ``H // grid``.

    torchvision infers each level's stride as ``image_size // feature_size``, which is wrong
    when ``H / stride`` is not an integer (e.g. P7 of a 800-px input: 800 // 7 = 114, not 128).
    MMDetection places anchor centres at ``(i * stride, j * stride)`` with the nominal stride;
    so do we. Anchors are always float32 (AMP-safe box decoding at 1333 px).
    """

    def __init__(self, sizes, aspect_ratios, strides: tuple[int, ...]) -> None:
        super().__init__(sizes, aspect_ratios)
        self.strides = tuple(int(s) for s in strides)

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        if len(feature_maps) != len(self.strides):
            raise ValueError(f"expected {len(self.strides)} feature maps, got {len(feature_maps)}")
        grid_sizes = [list(f.shape[-2:]) for f in feature_maps]
        device = feature_maps[0].device
        strides = [[torch.tensor(s, dtype=torch.int64, device=device)] * 2 for s in self.strides]
        self.set_cell_anchors(torch.float32, device)
        anchors = torch.cat(self.grid_anchors(grid_sizes, strides))
        return [anchors for _ in image_list.image_sizes]


class DetectorMixin:
    """The dfmsd forward contract, mixed in front of a torchvision detection class.

    Subclasses implement :meth:`forward_head` (``features`` -> losses / detections).
    Attributes set by :meth:`init_contract`: ``name``, ``num_classes`` (K, without
    background), ``strides``, ``out_channels``, ``has_masks``, ``options`` (the build options,
    saved in checkpoints so the architecture can be rebuilt).
    """

    name: str
    num_classes: int
    strides: tuple[int, ...]
    out_channels: int
    has_masks: bool
    options: dict[str, Any]
    # dense heads set this to A (anchors per position): their class logits can be returned
    logit_anchors: int | None = None
    logit_kind: str = "sigmoid"
    _kept_logits: dict[int, Tensor] | None = None

    def init_contract(
        self, num_classes: int, strides: tuple[int, ...], has_masks: bool = False
    ) -> None:
        self.name = type(self).__name__
        self.num_classes = int(num_classes)
        self.strides = tuple(int(s) for s in strides)
        self.out_channels = int(self.backbone.out_channels)
        self.has_masks = has_masks
        self.options = {}

    def extract_features(self, images: Tensor) -> dict[int, Tensor]:
        """Backbone + FPN only: ``{stride: (B, C, ceil(H/s), ceil(W/s))}``."""
        feats = self.backbone(images)
        if len(feats) != len(self.strides):
            raise RuntimeError(
                f"{self.name}: backbone returned {len(feats)} levels for strides {self.strides}"
            )
        return dict(zip(self.strides, feats.values(), strict=True))

    def forward(
        self,
        images: Tensor,
        image_sizes: list[tuple[int, int]] | None = None,
        targets: list[dict[str, Tensor]] | None = None,
        return_logits: bool = False,
    ) -> DetectorOutput:
        """One backbone pass. ``images``: (B, 3, H, W) padded batch; ``image_sizes``: each
        image's (h, w) before padding (default: the full padded size); ``targets``: boxes
        (xyxy, input coordinates), labels (1..K)[, masks (n, h, w)] -- required in train mode.
        ``return_logits`` (dense detectors only, ``logit_anchors`` set): also return the head's
        classification logits per level, ``{stride: (B, A·K, h_s, w_s)}`` anchor-major, the
        very tensors the losses/detections of this pass use (with their graph in train mode).
        """
        if return_logits and self.logit_anchors is None:
            raise ValueError(f"{self.name} has no dense classification head: no per-level logits")
        if image_sizes is None:
            image_sizes = [tuple(images.shape[-2:])] * images.shape[0]
        sizes = [(int(h), int(w)) for h, w in image_sizes]
        if len(sizes) != images.shape[0]:
            raise ValueError(f"{len(sizes)} image sizes for a batch of {images.shape[0]}")
        if self.training and targets is None:
            raise ValueError(f"{self.name}: targets are required in train mode")
        image_list = ImageList(images, sizes)
        features = self.extract_features(images)
        self._kept_logits = {} if return_logits else None
        try:
            losses, detections = self.forward_head(
                image_list, features, targets if self.training else None
            )
            logits = self._kept_logits or {}
        finally:
            self._kept_logits = None
        return DetectorOutput(losses=losses, detections=detections, features=features,
                              logits=logits)  # fmt: skip

    def keep_logits(self, per_level: list[Tensor]) -> None:
        """Called by a dense ``forward_head`` with its (B, A·K, h_s, w_s) class logits per
        level (in ``strides`` order); kept only when the forward asked for them."""
        if self._kept_logits is not None:
            self._kept_logits.update(zip(self.strides, per_level, strict=True))

    def forward_head(
        self,
        image_list: ImageList,
        features: dict[int, Tensor],
        targets: list[dict[str, Tensor]] | None,
    ) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
        raise NotImplementedError

    @staticmethod
    def named_features(features: dict[int, Tensor]) -> OrderedDict[str, Tensor]:
        """``{stride: t}`` -> ``OrderedDict(str(stride): t)`` for torchvision's RPN/RoIAlign."""
        return OrderedDict((str(s), f) for s, f in features.items())


def grid_points(feats: list[Tensor], strides, offset: float = 0.0) -> list[Tensor]:
    """Per level, the (x, y) pixel position of every cell, row-major: ``((j + offset)·s,
    (i + offset)·s)`` — MMDetection's ``MlvlPointGenerator`` (``offset`` 0 for GFL and
    RepPoints, 0.5 for FCOS)."""
    out = []
    for f, s in zip(feats, strides, strict=True):
        h, w = f.shape[-2:]
        ys = (torch.arange(h, device=f.device, dtype=torch.float32) + offset) * s
        xs = (torch.arange(w, device=f.device, dtype=torch.float32) + offset) * s
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        out.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1))
    return out


def class_nms(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    nms_thresh: float,
    max_dets: int,
    drop_empty: bool = False,
) -> dict[str, Tensor]:
    """Per-class NMS keeping the ``max_dets`` best (MMDetection's ``multiclass_nms`` tail);
    ``drop_empty`` first removes boxes of zero width or height (``min_bbox_size`` 0)."""
    from torchvision.ops import batched_nms

    if drop_empty:
        valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, scores, labels = boxes[valid], scores[valid], labels[valid]
    keep = batched_nms(boxes, scores, labels, nms_thresh)[:max_dets]
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


def drop_background(detections: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """Remove label-0 (background column) detections of sigmoid heads with K+1 outputs."""
    out = []
    for det in detections:
        keep = det["labels"] > 0
        out.append({k: v[keep] for k, v in det.items()})
    return out

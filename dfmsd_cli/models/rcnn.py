"""Two-stage heads on P2-P6 (strides 4..64): Faster R-CNN and Mask R-CNN from torchvision.

Faster R-CNN (Ren et al. 2015) with FPN (Lin et al. 2017): an RPN with 3 anchors per
location (size ``8 * stride``, ratios 0.5/1/2), RoIAlign 7x7 on P2-P5 (level
``floor(4 + log2(sqrt(wh) / 224))``), a two-FC box head (1024-d) and a softmax classifier
over K+1 classes (background first). Mask R-CNN (He et al. 2017) adds RoIAlign 14x14, four
3x3 convs, a 2x deconvolution and per-class 28x28 mask logits.

Mask targets are optional: a Mask R-CNN batch whose targets carry no ``masks`` trains the
box branch only (the dataset only provides masks with ``with_masks=True``). At test time mask
probabilities are pasted into each image's (h, w) in input coordinates, as (n, 1, h, w).
"""

from __future__ import annotations

from torch import nn
from torchvision.models.detection.faster_rcnn import FasterRCNN, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, paste_masks_in_image
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign

from dfmsd_cli.models.detector import DetectorMixin, StrideAnchorGenerator
from dfmsd_cli.models.registry import register_head

RCNN_STRIDES = (4, 8, 16, 32, 64)


class FloatRPNHead(RPNHead):
    """RPNHead with float32 outputs: under AMP the proposals are decoded in the deltas' dtype
    (torchvision's ``BoxCoder.decode_single``), and fp16/bf16 boxes lose pixels at 1333 px."""

    def forward(self, x):
        logits, deltas = super().forward(x)
        return [t.float() for t in logits], [t.float() for t in deltas]


class FloatFastRCNNPredictor(FastRCNNPredictor):
    """Box predictor with float32 outputs (precise boxes and losses under AMP)."""

    def forward(self, x):
        scores, deltas = super().forward(x)
        return scores.float(), deltas.float()


class FloatMaskRCNNPredictor(MaskRCNNPredictor):
    """Mask predictor with float32 logits (same reason)."""

    def forward(self, x):
        return super().forward(x).float()


class OptionalMaskRoIHeads(RoIHeads):
    """torchvision RoIHeads whose mask branch can be skipped for one call (no mask targets)."""

    def forward(self, features, proposals, image_shapes, targets=None, with_masks: bool = True):
        if with_masks or self.mask_roi_pool is None:
            return super().forward(features, proposals, image_shapes, targets)
        pool = self.mask_roi_pool
        self.mask_roi_pool = None  # has_mask() is False for this call only (no parameters here)
        try:
            return super().forward(features, proposals, image_shapes, targets)
        finally:
            self.mask_roi_pool = pool


class RCNNDetector(DetectorMixin, FasterRCNN):
    """torchvision Faster R-CNN (``masks=False``) or Mask R-CNN (``masks=True``) under the dfmsd
    contract (see detector.py). ``mask_layers``: the widths of the 4 mask-head convs."""

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        strides: tuple[int, ...] = RCNN_STRIDES,
        masks: bool = False,
        representation_size: int = 1024,
        mask_layers: tuple[int, ...] = (256, 256, 256, 256),
        rpn_pre_nms_top_n_train: int = 2000,
        rpn_post_nms_top_n_train: int = 2000,
        rpn_pre_nms_top_n_test: int = 1000,
        rpn_post_nms_top_n_test: int = 1000,
        box_score_thresh: float = 0.05,
        box_nms_thresh: float = 0.5,
        box_detections_per_img: int = 100,
        box_batch_size_per_image: int = 512,
    ) -> None:
        channels = backbone.out_channels
        levels = [str(s) for s in strides[:4]]  # RoIs pool from P2-P5, not P6
        anchors = StrideAnchorGenerator(
            tuple((8 * s,) for s in strides), ((0.5, 1.0, 2.0),) * len(strides), strides
        )
        super().__init__(
            backbone,
            num_classes=None,
            rpn_anchor_generator=anchors,
            rpn_head=FloatRPNHead(channels, anchors.num_anchors_per_location()[0]),
            rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train,
            rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
            rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
            rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
            box_roi_pool=MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=2),
            box_head=TwoMLPHead(channels * 7 * 7, representation_size),
            box_predictor=FloatFastRCNNPredictor(representation_size, num_classes + 1),
            box_score_thresh=box_score_thresh,
            box_nms_thresh=box_nms_thresh,
            box_detections_per_img=box_detections_per_img,
            box_batch_size_per_image=box_batch_size_per_image,
        )
        self.roi_heads.__class__ = OptionalMaskRoIHeads  # same state, adds the per-call switch
        if masks:
            layers = tuple(mask_layers)
            self.roi_heads.mask_roi_pool = MultiScaleRoIAlign(levels, 14, sampling_ratio=2)
            self.roi_heads.mask_head = MaskRCNNHeads(channels, layers, 1)
            self.roi_heads.mask_predictor = FloatMaskRCNNPredictor(
                layers[-1], layers[-1], num_classes + 1
            )
        self.init_contract(num_classes, strides, has_masks=masks)

    def forward_head(self, image_list: ImageList, features, targets):
        feats = self.named_features(features)
        proposals, rpn_losses = self.rpn(image_list, feats, targets)
        with_masks = targets is None or all("masks" in t for t in targets)
        dets, roi_losses = self.roi_heads(
            feats, proposals, image_list.image_sizes, targets, with_masks=with_masks
        )
        if self.training:
            return {**rpn_losses, **roi_losses}, []
        if self.has_masks:
            for det, size in zip(dets, image_list.image_sizes, strict=True):
                det["masks"] = paste_masks_in_image(det["masks"], det["boxes"], size)
        return {}, dets


register_head(
    "frcnn",
    RCNNDetector,
    strides=RCNN_STRIDES,
    extra="maxpool",
    fixed={"masks": False},
    description="Faster R-CNN",
    family="two_stage",
)
register_head(
    "mrcnn",
    RCNNDetector,
    strides=RCNN_STRIDES,
    extra="maxpool",
    has_masks=True,
    fixed={"masks": True},
    description="Mask R-CNN",
    family="two_stage",
)

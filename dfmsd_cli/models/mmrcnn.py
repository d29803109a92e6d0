"""MMDetection-faithful Faster / Mask R-CNN (``mmfrcnn_*``, ``mmmrcnn_*``).

torchvision's Faster/Mask R-CNN (``frcnn_*``, ``mrcnn_*``) has the same parameters as
MMDetection's ``faster-rcnn_*_fpn`` / ``mask-rcnn_*_fpn`` configs (so both convert from the same
checkpoints), but two inference details differ:

* RoIAlign: MMDetection pools with ``aligned=True`` and ``sampling_ratio=0`` (adaptive);
  torchvision with ``aligned=False`` (a half-pixel shift) and here ``sampling_ratio=2``;
* RPN anchors: torchvision rounds the base anchors, MMDetection does not.

The ``mm`` variants swap in :class:`AlignedMultiScaleRoIAlign` and
:class:`~dfmsd_cli.models.cascade.ExactAnchorGenerator`; neither has parameters, so the
state-dict keys are those of ``frcnn_*`` / ``mrcnn_*``. ``mmmrcnn_swin_t`` / ``mmmrcnn_swin_s``
are the paper's ST-T / ST-S teachers as MMDetection runs them.
"""

from __future__ import annotations

from torch import Tensor, nn

from dfmsd_cli.models.cascade import ExactAnchorGenerator
from dfmsd_cli.models.cascade_heads import PyramidRoIAlign, boxes_to_rois
from dfmsd_cli.models.rcnn import RCNN_STRIDES, RCNNDetector
from dfmsd_cli.models.registry import annotate_model, register_head


class AlignedMultiScaleRoIAlign(nn.Module):
    """Drop-in for torchvision's ``MultiScaleRoIAlign`` (same call) with MMDetection's pooling:
    aligned RoIAlign, adaptive sampling, levels by ``floor(log2(sqrt(wh) / 56))``."""

    def __init__(self, featmap_names: list[str], output_size: int, strides: tuple[int, ...]):
        super().__init__()
        self.featmap_names = list(featmap_names)
        self.pool = PyramidRoIAlign(tuple(strides), output_size=output_size)

    def forward(
        self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        return self.pool([x[n] for n in self.featmap_names], boxes_to_rois(boxes))


def _mm(model: RCNNDetector) -> RCNNDetector:
    strides = model.strides
    names = [str(s) for s in strides[:4]]
    model.rpn.anchor_generator = ExactAnchorGenerator(
        tuple((8 * s,) for s in strides), ((0.5, 1.0, 2.0),) * len(strides), strides
    )
    heads = model.roi_heads
    heads.box_roi_pool = AlignedMultiScaleRoIAlign(names, 7, strides[:4])
    if heads.mask_roi_pool is not None:
        heads.mask_roi_pool = AlignedMultiScaleRoIAlign(names, 14, strides[:4])
    return model


def build_mmfrcnn(backbone: nn.Module, num_classes: int, strides=RCNN_STRIDES, **options):
    return _mm(RCNNDetector(backbone, num_classes, strides, masks=False, **options))


def build_mmmrcnn(backbone: nn.Module, num_classes: int, strides=RCNN_STRIDES, **options):
    return _mm(RCNNDetector(backbone, num_classes, strides, masks=True, **options))


register_head(
    "mmfrcnn",
    build_mmfrcnn,
    strides=RCNN_STRIDES,
    extra="maxpool",
    description="Faster R-CNN, MMDetection inference (aligned RoIAlign, exact anchors)",
    family="two_stage",
)
register_head(
    "mmmrcnn",
    build_mmmrcnn,
    strides=RCNN_STRIDES,
    extra="maxpool",
    has_masks=True,
    description="Mask R-CNN, MMDetection inference (aligned RoIAlign, exact anchors)",
    family="two_stage",
)
for _name, _ap, _file in (
    ("mmfrcnn_r50", 37.4, "faster_rcnn_r50_fpn_1x_coco_20200130-047c8118.pth"),
    ("mmmrcnn_swin_t", 42.7, "mask_rcnn_swin-t-p4-w7_fpn_1x_coco_20210902_120937-9d6b7cfa.pth"),
    (
        "mmmrcnn_swin_s",
        48.2,
        "mask_rcnn_swin-s-p4-w7_fpn_fp16_ms-crop-3x_coco_20210903_104808-b92c91f1.pth",
    ),
):
    annotate_model(_name, published_ap=_ap, checkpoint=_file)

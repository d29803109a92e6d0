"""Cascade Mask R-CNN (``cmr_*``), architecturally equal to MMDetection 3.3's
``cascade-mask-rcnn_{r50,r101,x101-32x4d,x101-64x4d}_fpn`` configs.

Parts (torchvision modules where they match MMDetection, our own where they do not):

* backbone + FPN: the registry's backbone with ``extra="maxpool"`` (P2..P6, strides 4..64,
  P6 = max-pool(k=1, s=2) of P5, as MMDetection's FPN with ``num_outs=5`` and no extra convs);
* RPN: torchvision's ``RegionProposalNetwork`` with one 3x3 conv, anchors of scale 8 and ratios
  0.5/1/2 at strides 4..64 generated *without* torchvision's rounding
  (:class:`ExactAnchorGenerator`),
  train 2000/2000 and test 1000/1000 proposals per level/image, NMS 0.7;
* RoI head: :class:`~dfmsd_cli.models.cascade_roi_heads.CascadeRoIHeads` (3 stages, IoU
  0.5/0.6/0.7, stds per stage, Shared2FC 1024, class-agnostic regression, stage weights
  1/0.5/0.25, aligned RoIAlign, a mask head per stage).

State-dict layout: ``backbone.body.*``, ``backbone.fpn.*``, ``rpn.head.*``,
``roi_heads.box_heads.{s}.{fc6,fc7,cls_score,bbox_pred}``,
``roi_heads.mask_heads.{s}.{convs.k,upsample,conv_logits}``; ``dfmsd convert mmdet`` maps
MMDetection checkpoints onto it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork

from dfmsd_cli.models.cascade_roi_heads import CascadeRoIHeads
from dfmsd_cli.models.detector import DetectorMixin, StrideAnchorGenerator
from dfmsd_cli.models.rcnn import FloatRPNHead
from dfmsd_cli.models.registry import annotate_model, register_head

CMR_STRIDES: tuple[int, ...] = (4, 8, 16, 32, 64)


class ExactAnchorGenerator(StrideAnchorGenerator):
    """Base anchors ``(-w/2, -h/2, w/2, h/2)`` with ``w = size / sqrt(r)``, ``h = size * sqrt(r)``,
    NOT rounded (MMDetection ``AnchorGenerator`` with ``center_offset=0``; torchvision rounds).

    Per location the order is ratio-major (torchvision's), which equals MMDetection's
    scale-major order whenever there is one scale per level (RPN, GFL).
    """

    def generate_anchors(
        self,
        scales: list[int],
        aspect_ratios: list[float],
        dtype: torch.dtype = torch.float32,
        device: torch.device = torch.device("cpu"),
    ) -> Tensor:
        scales_t = torch.as_tensor(scales, dtype=dtype, device=device)
        ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        h_ratios = torch.sqrt(ratios)
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales_t[None, :]).view(-1)
        hs = (h_ratios[:, None] * scales_t[None, :]).view(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2


class CascadeMaskRCNN(DetectorMixin, nn.Module):
    """Backbone+FPN -> RPN -> 3-stage cascade box and mask heads, one backbone pass."""

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        strides: tuple[int, ...] = CMR_STRIDES,
        rpn_pre_nms_top_n: tuple[int, int] = (2000, 1000),
        rpn_post_nms_top_n: tuple[int, int] = (2000, 1000),
        **roi_options,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        c = backbone.out_channels
        anchor_sizes = tuple((8 * s,) for s in strides)
        anchors = ExactAnchorGenerator(anchor_sizes, ((0.5, 1.0, 2.0),) * len(strides), strides)
        self.rpn = RegionProposalNetwork(
            anchors,
            FloatRPNHead(c, 3),  # float32 deltas: precise proposals under AMP
            fg_iou_thresh=0.7,
            bg_iou_thresh=0.3,
            batch_size_per_image=256,
            positive_fraction=0.5,
            pre_nms_top_n={"training": rpn_pre_nms_top_n[0], "testing": rpn_pre_nms_top_n[1]},
            post_nms_top_n={"training": rpn_post_nms_top_n[0], "testing": rpn_post_nms_top_n[1]},
            nms_thresh=0.7,
        )
        self.roi_strides = tuple(strides[:4])
        self.roi_heads = CascadeRoIHeads(
            num_classes, in_channels=c, roi_strides=self.roi_strides, **roi_options
        )
        self.init_contract(num_classes, strides, has_masks=self.roi_heads.with_mask)

    @property
    def predict_masks(self) -> bool:
        """Whether eval-mode detections carry ``masks``; False saves the mask heads and the
        pasting of 100 full-image maps per image when only boxes and features are needed."""
        return self.roi_heads.predict_masks

    @predict_masks.setter
    def predict_masks(self, value: bool) -> None:
        self.roi_heads.predict_masks = bool(value)

    def forward_head(
        self,
        image_list: ImageList,
        features: dict[int, Tensor],
        targets: list[dict[str, Tensor]] | None,
    ) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
        proposals, rpn_losses = self.rpn(image_list, self.named_features(features), targets)
        feats = [features[s] for s in self.roi_strides]
        detections, roi_losses = self.roi_heads(feats, proposals, image_list.image_sizes, targets)
        return {**rpn_losses, **roi_losses}, detections


def build_cmr(
    backbone: nn.Module,
    num_classes: int,
    strides: tuple[int, ...] = CMR_STRIDES,
    representation_size: int = 1024,
    mask_layers: tuple[int, ...] = (256, 256, 256, 256),
    with_mask: bool = True,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
    batch_size_per_image: int = 512,
    rpn_pre_nms_top_n: tuple[int, int] = (2000, 1000),
    rpn_post_nms_top_n: tuple[int, int] = (2000, 1000),
    **_ignored,
) -> CascadeMaskRCNN:
    """Head builder for the registry: ``cmr_{backbone}``.

    ``representation_size`` is the Shared2FC width (1024 in MMDetection; the ``tiny`` backbone's
    defaults shrink it); ``mask_layers`` the mask-conv widths (4 x 256).
    """
    if len(set(mask_layers)) != 1:
        raise ValueError(f"mask_layers must share one width, got {mask_layers}")
    model = CascadeMaskRCNN(
        backbone,
        num_classes,
        strides,
        rpn_pre_nms_top_n=tuple(rpn_pre_nms_top_n),
        rpn_post_nms_top_n=tuple(rpn_post_nms_top_n),
        fc_channels=representation_size,
        mask_channels=mask_layers[0],
        mask_convs=len(mask_layers),
        with_mask=with_mask,
        score_thresh=score_thresh,
        nms_thresh=nms_thresh,
        detections_per_img=detections_per_img,
        batch_size_per_image=batch_size_per_image,
    )
    return model


# MMDetection 3.3 model zoo, COCO val2017 box AP of the public checkpoints
CMR_ZOO: dict[str, tuple[float, str]] = {
    "cmr_r50": (41.2, "cascade_mask_rcnn_r50_fpn_1x_coco_20200203-9d4dcb24.pth"),
    "cmr_r101": (42.9, "cascade_mask_rcnn_r101_fpn_1x_coco_20200203-befdf6ee.pth"),
    "cmr_x101_32x4d": (
        45.0,
        "cascade_mask_rcnn_x101_32x4d_fpn_20e_coco_20200528_083917-ed1f4751.pth",
    ),
    "cmr_x101": (45.6, "cascade_mask_rcnn_x101_64x4d_fpn_20e_coco_20200512_161033-bdb5126a.pth"),
    "cmr_r50_caffe": (
        41.2,
        "cascade_mask_rcnn_r50_caffe_fpn_1x_coco_bbox_mAP-0.412__segm_mAP-0.36_20200504_174659-5004b251.pth",
    ),
    "cmr_r101_caffe": (
        43.2,
        "cascade_mask_rcnn_r101_caffe_fpn_1x_coco_bbox_mAP-0.432__segm_mAP-0.376_20200504_174813-5c1e9599.pth",
    ),
}


def _register() -> None:
    register_head(
        "cmr",
        build_cmr,
        strides=CMR_STRIDES,
        extra="maxpool",
        has_masks=True,
        description="Cascade Mask R-CNN (MMDetection layout, 3 stages)",
        family="two_stage",
    )
    for name, (ap, ckpt) in CMR_ZOO.items():
        annotate_model(name, published_ap=ap, checkpoint=ckpt)


_register()

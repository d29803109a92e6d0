"""RepPoints (``reppoints_*``): MMDetection 3.3's ``reppoints-moment_*_fpn-gn_head-gn`` configs.

Yang et al., "RepPoints: Point Set Representation for Object Detection", ICCV 2019; structure
of ``mmdet/models/dense_heads/reppoints_head.py`` and the configs in ``configs/reppoints``:

* FPN P3-P7 from C3-C5 (``start_level=1``), P6 = conv(C5), P7 = conv(P6) with no ReLU
  (``add_extra_convs='on_input'``), GroupNorm(32) after every FPN conv ("gn-neck");
* head ("gn-head"): 3 conv3x3+GN+ReLU per branch (``cls_convs``, ``reg_convs``);
  ``reppoints_pts_init_out(relu(reppoints_pts_init_conv(reg)))`` = 9 initial points as
  (y, x) offsets in stride units (``center_init``: relative to the location);
  the deformable convs ``reppoints_cls_conv`` / ``reppoints_pts_refine_conv`` (3x3, no bias)
  sample at those points, offset = ``points - base grid`` with the points' gradient scaled by
  ``gradient_mul = 0.1``; ``reppoints_cls_out`` = K sigmoid logits, ``reppoints_pts_refine_out``
  = refinement added to the (detached) initial points;
* boxes: moment transform of the refined points (``reppoints_losses.moment_box``), times the
  stride, plus the location ``(j s, i s)`` (``MlvlPointGenerator(offset=0)``), clipped;
* test: sigmoid score > 0.05, top 1000 per level, NMS 0.5, 100 per image.

The deformable convolution is ``torchvision.ops.deform_conv2d``; its offset layout (channel
``2k`` = dy, ``2k + 1`` = dx of kernel position ``k``, row-major) is the one of mmcv's
``DeformConv2d`` (``deformable_im2col`` in
``mmcv/ops/csrc/common/cuda/deform_conv_cuda_kernel.cuh``), and both sample out-of-image
positions as zero. ``gn=False`` (``reppoints_r50_nogn``) gives the plain
``reppoints-moment_r50_fpn_1x_coco`` (biased convs, no GroupNorm in neck and head).
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import deform_conv2d
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork

from dfmsd_cli.models.backbones import build_resnet_fpn
from dfmsd_cli.models.detector import DetectorMixin, class_nms, grid_points
from dfmsd_cli.models.registry import annotate_model, register_head, register_model
from dfmsd_cli.models.reppoints_losses import moment_box, reppoints_loss, scaled_grad, split_yx

REPPOINTS_STRIDES: tuple[int, ...] = (8, 16, 32, 64, 128)


class DeformConv(nn.Module):
    """mmcv ``DeformConv2d`` (weight only, no bias) on ``torchvision.ops.deform_conv2d``.

    ``out[o, p] = sum_{c,k} W[o, c, k] x_c(p + p_k + delta_k)``, bilinear sampling, zero
    outside the map; ``offset`` (B, 2 kh kw, H, W) holds (dy_k, dx_k) pairs.
    """

    def __init__(
        self, cin: int, cout: int, kernel: int = 3, stride: int = 1, padding: int = 1,
        groups: int = 1,
    ) -> None:  # fmt: skip
        super().__init__()
        self.stride, self.padding = stride, padding
        self.weight = nn.Parameter(torch.empty(cout, cin // groups, kernel, kernel))
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")

    def forward(self, x: Tensor, offset: Tensor) -> Tensor:
        return deform_conv2d(
            x, offset.to(x.dtype), self.weight.to(x.dtype), stride=self.stride,
            padding=self.padding,
        )  # fmt: skip


class DeformConvPack(DeformConv):
    """mmcv ``DeformConv2dPack`` (the backbone's ``DCN``): offsets from its own ``conv_offset``
    (zero-initialised: a plain conv at the start)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(cin, cout, 3, stride, 1, groups)
        self.conv_offset = nn.Conv2d(cin, 18, 3, stride, 1, bias=True)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x, self.conv_offset(x))


class ConvNorm(nn.Module):
    """conv3x3 + GroupNorm(32) + ReLU (MMCV ``ConvModule``; names ``conv``/``norm``), or a
    biased conv3x3 + ReLU without ``norm`` when ``gn=False``."""

    def __init__(self, cin: int, cout: int, gn: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=not gn)
        self.norm = nn.GroupNorm(min(32, cout), cout) if gn else nn.Identity()
        nn.init.normal_(self.conv.weight, std=0.01)
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.norm(self.conv(x)))


class ExtraConvsOnInput(ExtraFPNBlock):
    """MMDetection FPN ``add_extra_convs='on_input'`` with an optional norm: P6 = N(conv(C5)),
    P7 = N(conv(P6)), no ReLU; GroupNorm under ``p6_norm`` / ``p7_norm``."""

    def __init__(self, c5: int, out: int, gn: bool = True) -> None:
        super().__init__()
        self.p6 = nn.Conv2d(c5, out, 3, 2, 1, bias=not gn)
        self.p7 = nn.Conv2d(out, out, 3, 2, 1, bias=not gn)
        for conv in (self.p6, self.p7):
            nn.init.xavier_uniform_(conv.weight)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        self.p6_norm = nn.GroupNorm(min(32, out), out) if gn else nn.Identity()
        self.p7_norm = nn.GroupNorm(min(32, out), out) if gn else nn.Identity()

    def forward(
        self, p: list[Tensor], c: list[Tensor], names: list[str]
    ) -> tuple[list[Tensor], list[str]]:
        p6 = self.p6_norm(self.p6(c[-1]))
        p7 = self.p7_norm(self.p7(p6))
        return [*p, p6, p7], [*names, "p6", "p7"]


class RepPointsHead(nn.Module):
    """The RepPoints head on every level: returns per level (cls logits (B, K, H, W),
    init points (B, 18, H, W), refined points (B, 18, H, W)), y-first, stride units."""

    def __init__(
        self,
        channels: int,
        num_classes: int,
        num_points: int = 9,
        stacked_convs: int = 3,
        gradient_mul: float = 0.1,
        moment_mul: float = 0.01,
        gn: bool = True,
    ) -> None:
        super().__init__()
        kernel = int(math.isqrt(num_points))
        if kernel * kernel != num_points or kernel % 2 == 0:
            raise ValueError(f"num_points must be an odd square, got {num_points}")
        self.gradient_mul, self.moment_mul = gradient_mul, moment_mul
        n = stacked_convs
        self.cls_convs = nn.ModuleList(ConvNorm(channels, channels, gn) for _ in range(n))
        self.reg_convs = nn.ModuleList(ConvNorm(channels, channels, gn) for _ in range(n))
        pad = (kernel - 1) // 2
        self.reppoints_cls_conv = DeformConv(channels, channels, kernel, 1, pad)
        self.reppoints_cls_out = nn.Conv2d(channels, num_classes, 1)
        self.reppoints_pts_init_conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.reppoints_pts_init_out = nn.Conv2d(channels, 2 * num_points, 1)
        self.reppoints_pts_refine_conv = DeformConv(channels, channels, kernel, 1, pad)
        self.reppoints_pts_refine_out = nn.Conv2d(channels, 2 * num_points, 1)
        self.moment_transfer = nn.Parameter(torch.zeros(2))
        # the regular kernel grid as (y, x) pairs, row-major: (-1,-1), (-1,0), ... (1,1)
        r = torch.arange(-pad, pad + 1, dtype=torch.float32)
        base = torch.stack([r.repeat_interleave(kernel), r.repeat(kernel)], dim=1)
        self.register_buffer("dcn_base_offset", base.reshape(1, -1, 1, 1), persistent=False)
        for conv in (self.reppoints_cls_out, self.reppoints_pts_init_conv,
                     self.reppoints_pts_init_out, self.reppoints_pts_refine_out):  # fmt: skip
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.reppoints_cls_out.bias, -math.log((1 - 0.01) / 0.01))

    def forward_level(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        cls_feat, pts_feat = x, x
        for conv in self.cls_convs:
            cls_feat = conv(cls_feat)
        for conv in self.reg_convs:
            pts_feat = conv(pts_feat)
        init = self.reppoints_pts_init_out(torch.relu(self.reppoints_pts_init_conv(pts_feat)))
        # the deformable convs see the points with a 0.1-scaled gradient (gradient_mul)
        offset = scaled_grad(init, self.gradient_mul) - self.dcn_base_offset.to(init.dtype)
        cls = self.reppoints_cls_out(torch.relu(self.reppoints_cls_conv(cls_feat, offset)))
        refine = self.reppoints_pts_refine_out(
            torch.relu(self.reppoints_pts_refine_conv(pts_feat, offset))
        )
        return cls, init, refine + init.detach()

    def forward(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        outs = [self.forward_level(x) for x in feats]
        return [o[0] for o in outs], [o[1] for o in outs], [o[2] for o in outs]

    def transfer(self) -> Tensor:
        """``moment_transfer`` with its gradient scaled by ``moment_mul`` (MMDetection)."""
        return scaled_grad(self.moment_transfer, self.moment_mul)


class RepPointsDetector(DetectorMixin, nn.Module):
    """Backbone+FPN -> :class:`RepPointsHead`, the dfmsd one-pass contract."""

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        strides: tuple[int, ...] = REPPOINTS_STRIDES,
        gn: bool = True,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        topk_candidates: int = 1000,
        point_base_scale: float = 4.0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = RepPointsHead(backbone.out_channels, num_classes, gn=gn)
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.topk_candidates = topk_candidates
        self.point_base_scale = point_base_scale
        self.init_contract(num_classes, strides)
        self.logit_anchors = 1

    def forward_head(
        self,
        image_list: ImageList,
        features: dict[int, Tensor],
        targets: list[dict[str, Tensor]] | None,
    ) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
        cls_out, pts_init, pts_refine = self.head(list(features.values()))
        self.keep_logits(cls_out)
        if self.training:
            assert targets is not None
            losses = reppoints_loss(
                cls_out, pts_init, pts_refine, self.strides, targets, self.head.transfer(),
                point_base_scale=self.point_base_scale,
            )  # fmt: skip
            return losses, []
        return {}, self.predict(cls_out, pts_refine, image_list.image_sizes)

    def predict(
        self, cls_out: list[Tensor], pts_refine: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """MMDetection ``RepPointsHead._predict_by_feat_single`` + ``_bbox_post_process``."""
        transfer = self.head.moment_transfer.detach().float()
        per_level = []
        points = grid_points(cls_out, self.strides)
        for c, p, s, xy in zip(cls_out, pts_refine, self.strides, points, strict=True):
            xs, ys = split_yx(p.float())
            box = moment_box(xs, ys, transfer) * s  # (B, HW, 4) relative to the location
            loc = torch.cat([xy, xy], dim=1)  # (HW, 4): x, y, x, y
            per_level.append((c.float().flatten(2).transpose(1, 2).sigmoid(), box + loc))
        results = []
        for i, (h_img, w_img) in enumerate(image_sizes):
            boxes_l, scores_l, labels_l = [], [], []
            for scores, boxes in per_level:
                flat = scores[i].reshape(-1)
                keep = torch.where(flat > self.score_thresh)[0]
                sc = flat[keep]
                if sc.numel() > self.topk_candidates:
                    sc, order = sc.topk(self.topk_candidates)
                    keep = keep[order]
                loc = keep // self.num_classes
                bx = boxes[i][loc]
                bx = torch.stack(
                    [bx[:, 0].clamp(0, w_img), bx[:, 1].clamp(0, h_img),
                     bx[:, 2].clamp(0, w_img), bx[:, 3].clamp(0, h_img)], dim=1,
                )  # fmt: skip
                boxes_l.append(bx)
                scores_l.append(sc)
                labels_l.append(keep % self.num_classes + 1)
            results.append(
                class_nms(torch.cat(boxes_l), torch.cat(scores_l), torch.cat(labels_l),
                          self.nms_thresh, self.detections_per_img, True)
            )  # fmt: skip
        return results


def build_reppoints(
    backbone: nn.Module,
    num_classes: int,
    strides: tuple[int, ...] = REPPOINTS_STRIDES,
    gn: bool = True,
    **options,
) -> RepPointsDetector:
    """``reppoints_{backbone}``: the FPN rebuilt with MMDetection's GN convs and on-input
    P6/P7 (same C3-C5 inputs and widths as the backbone's own FPN)."""
    old = backbone.fpn
    cins = [block[0].in_channels for block in old.inner_blocks]
    out = backbone.out_channels
    norm = partial(nn.GroupNorm, min(32, out)) if gn else None
    backbone.fpn = FeaturePyramidNetwork(
        cins, out, extra_blocks=ExtraConvsOnInput(cins[-1], out, gn), norm_layer=norm
    )
    return RepPointsDetector(backbone, num_classes, strides, gn=gn, **options)


def add_dcn(trunk: nn.Module, stages: tuple[int, ...] = (2, 3, 4)) -> None:
    """MMDetection ``dcn=dict(type='DCN', deform_groups=1, fallback_on_stride=False)`` with
    ``stage_with_dcn=(False, True, True, True)``: every bottleneck's 3x3 ``conv2`` in C3-C5
    becomes a :class:`DeformConvPack` (same weight, stride and groups)."""
    for s in stages:
        for block in getattr(trunk, f"layer{s}"):
            conv = block.conv2
            dcn = DeformConvPack(conv.in_channels, conv.out_channels, conv.stride[0], conv.groups)
            dcn.to(device=conv.weight.device).requires_grad_(conv.weight.requires_grad)
            with torch.no_grad():
                if not conv.weight.is_meta:
                    dcn.weight.copy_(conv.weight)
            block.conv2 = dcn


def build_reppoints_dcn(
    arch: str, num_classes: int, norm: str = "frozen_bn", frozen_stages: int = 1, **options
) -> RepPointsDetector:
    """``reppoints_{r101,x101_32x4d}_dcn``: the DCN-backbone configs (c3-c5)."""
    backbone = build_resnet_fpn(arch, REPPOINTS_STRIDES, "p6p7", norm, frozen_stages)
    add_dcn(backbone.body)
    return build_reppoints(backbone, num_classes, **options)


def build_reppoints_plain(
    arch: str, num_classes: int, norm: str = "frozen_bn", frozen_stages: int = 1, **options
) -> RepPointsDetector:
    """``reppoints_r50_nogn``: ``reppoints-moment_r50_fpn_1x_coco`` (``gn=False``)."""
    backbone = build_resnet_fpn(arch, REPPOINTS_STRIDES, "p6p7", norm, frozen_stages)
    return build_reppoints(backbone, num_classes, gn=False, **options)


register_head(
    "reppoints",
    build_reppoints,
    strides=REPPOINTS_STRIDES,
    extra="p6p7",
    description="RepPoints (moment, GN neck+head, 9 points), MMDetection layout",
    family="one_stage",
)
# MMDetection configs/reppoints/README.md (COCO val2017 box AP, the model files it links)
_FILES = "reppoints_moment_{}_fpn{}gn-neck+head_{}_coco_{}.pth"
for _arch, _ap, _file in (
    ("r101", 42.9, _FILES.format("r101", "_dconv_c3-c5_", "2x", "20200329-3309fbf2")),
    ("x101_32x4d", 44.2, _FILES.format("x101", "_dconv_c3-c5_", "2x", "20200329-f87da1ea")),
):
    register_model(
        f"reppoints_{_arch}_dcn",
        partial(build_reppoints_dcn, _arch),
        head="reppoints",
        backbone=f"{_arch}_dcn",
        strides=REPPOINTS_STRIDES,
        channels=256,
        description=f"RepPoints / {_arch} with DCN in C3-C5 FPN, MMDetection layout",
        published_ap=_ap,
        checkpoint=_file,
        family="one_stage",
    )
register_model(
    "reppoints_r50_nogn",
    partial(build_reppoints_plain, "r50"),
    head="reppoints",
    backbone="r50",
    strides=REPPOINTS_STRIDES,
    channels=256,
    description="RepPoints without GroupNorm in neck and head / ResNet-50 FPN, MMDetection layout",
    published_ap=37.0,
    checkpoint="reppoints_moment_r50_fpn_1x_coco_20200330-b73db8d1.pth",
    family="one_stage",
)
for _name, _ap, _file in (
    ("reppoints_r50", 38.1, _FILES.format("r50", "_", "1x", "20200329-4b38409a")),
    ("reppoints_r101", 40.5, _FILES.format("r101", "_", "2x", "20200329-4fbc7310")),
):
    annotate_model(_name, published_ap=_ap, checkpoint=_file)

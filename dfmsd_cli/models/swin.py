"""Swin Transformer backbones (``swin_t``, ``swin_s``) with an FPN, for every head.

Liu et al. 2021, "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows".
The trunk is torchvision's ``swin_t``/``swin_s`` ``features`` (patch embedding, 4 stages of
shifted-window blocks, 3 patch mergings). Like MMDetection's ``SwinTransformer`` with
``out_indices=(0, 1, 2, 3)``, the outputs of stages 1/3/5/7 (NHWC, strides 4/8/16/32, channels
96/192/384/768) each pass one LayerNorm (MMDetection's ``norm0..norm3``) and are permuted to
NCHW before the FPN. ``dfmsd convert mmdet`` maps MMDetection Swin checkpoints onto
``backbone.body.features.*`` / ``backbone.body.norms.*``, restoring the patch-merging order.

FPN levels follow the head's ``extra`` exactly as the ResNet backbones do (``maxpool``: P2-P6
from C2-C5; ``p6p7``: P3-P7 from C3-C5).
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial

from torch import Tensor, nn
from torchvision.models import swin_s, swin_t
from torchvision.ops.feature_pyramid_network import (
    FeaturePyramidNetwork,
    LastLevelMaxPool,
    LastLevelP6P7,
)

from dfmsd_cli.models.backbones import fpn_levels
from dfmsd_cli.models.registry import register_backbone

# torchvision's stochastic depth 0.2 (T) / 0.3 (S) equals MMDetection's drop_path_rate
SWINS = {"swin_t": (swin_t, "Swin-T"), "swin_s": (swin_s, "Swin-S")}
SWIN_CHANNELS = (96, 192, 384, 768)


class SwinBody(nn.Module):
    """torchvision Swin ``features`` -> ``OrderedDict`` of normalised NCHW maps C2..C5."""

    def __init__(self, arch: str = "swin_t", stages: tuple[int, ...] = (1, 2, 3, 4)) -> None:
        super().__init__()
        ctor, _ = SWINS[arch]
        self.features = ctor(weights=None).features
        self.norms = nn.ModuleList(nn.LayerNorm(c) for c in SWIN_CHANNELS)
        self.stages = tuple(stages)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        out: OrderedDict[str, Tensor] = OrderedDict()
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i % 2 == 1:  # features 1/3/5/7 end stages 1..4
                stage = (i + 1) // 2
                if stage in self.stages:
                    y = self.norms[stage - 1](x).permute(0, 3, 1, 2).contiguous()
                    out[str(len(out))] = y
            if (i + 1) // 2 >= max(self.stages) and i % 2 == 1:
                break
        return out


class SwinFPN(nn.Module):
    """``body`` (:class:`SwinBody`) + torchvision ``FeaturePyramidNetwork`` as ``fpn``."""

    def __init__(
        self, arch: str, strides: tuple[int, ...], extra: str, out_channels: int = 256
    ) -> None:
        super().__init__()
        stages = fpn_levels(strides, extra)
        self.body = SwinBody(arch, tuple(stages))
        blocks = (
            LastLevelP6P7(out_channels, out_channels) if extra == "p6p7" else LastLevelMaxPool()
        )
        self.fpn = FeaturePyramidNetwork(
            [SWIN_CHANNELS[s - 1] for s in stages], out_channels, extra_blocks=blocks
        )
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(self.body(x))


def build_swin_fpn(arch: str, strides: tuple[int, ...], extra: str) -> SwinFPN:
    return SwinFPN(arch, strides, extra)


for _name, (_, _desc) in SWINS.items():
    register_backbone(
        _name, partial(build_swin_fpn, _name), channels=256, description=f"{_desc} FPN"
    )
# The public MMDetection Swin Mask R-CNN checkpoints (box AP 42.7 / 48.2) are annotated on
# ``mmmrcnn_swin_t/s`` (mmrcnn.py), the models that reproduce them; ``mrcnn_swin_*`` do not.

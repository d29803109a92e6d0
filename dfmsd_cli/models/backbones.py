"""ResNet / ResNeXt / tiny backbones with an FPN, in torchvision's module layout.

The layout is torchvision's ``BackboneWithFPN`` (``body`` = the ResNet trunk through
``IntermediateLayerGetter``, ``fpn`` = ``FeaturePyramidNetwork``) so torchvision and converted
MMDetection weights load by key. Conventions follow MMDetection's ResNet (He et al. 2016,
Lin et al. 2017 "Feature Pyramid Networks"):

* ``norm="frozen_bn"`` (default): BatchNorm with frozen statistics and affine parameters
  (MMDetection ``norm_eval=True``; torchvision ``FrozenBatchNorm2d``), and
  ``frozen_stages=1``: the stem and ``layer1`` get no gradient. This is right for
  ImageNet-pretrained or converted weights.
* Training from scratch: frozen BN of a random network never normalises anything, so use
  ``norm="gn"`` (GroupNorm, 32 groups; works at batch 2) or ``norm="bn"`` (needs large
  batches), with ``frozen_stages=-1``. The ``tiny`` backbone always uses GroupNorm and
  freezes nothing.

FPN levels (``extra``): ``"p6p7"`` -> P3..P7 from C3..C5, P6 = conv(P5), P7 = conv(relu(P6))
(torchvision RetinaNet/FCOS v1 layout); ``"maxpool"`` -> P2..P6 from C2..C5, P6 = max-pool(P5)
(Faster/Mask R-CNN). Map sizes are ``ceil(H / stride)`` for inputs padded to 32.
"""

from __future__ import annotations

from functools import partial

from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from dfmsd_cli.errors import UserError
from dfmsd_cli.models.registry import register_backbone

NORMS = ("frozen_bn", "bn", "gn")

# name -> (block, layers, groups, width_per_group, description)
RESNETS: dict[str, tuple[type[nn.Module], list[int], int, int, str]] = {
    "r18": (tv_resnet.BasicBlock, [2, 2, 2, 2], 1, 64, "ResNet-18"),
    "r34": (tv_resnet.BasicBlock, [3, 4, 6, 3], 1, 64, "ResNet-34"),
    "r50": (tv_resnet.Bottleneck, [3, 4, 6, 3], 1, 64, "ResNet-50"),
    "r101": (tv_resnet.Bottleneck, [3, 4, 23, 3], 1, 64, "ResNet-101"),
    "x101": (tv_resnet.Bottleneck, [3, 4, 23, 3], 64, 4, "ResNeXt-101 64x4d"),
    "x101_32x4d": (tv_resnet.Bottleneck, [3, 4, 23, 3], 32, 4, "ResNeXt-101 32x4d"),
}


def norm_layer(norm: str) -> type[nn.Module] | partial:
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "gn":
        return partial(nn.GroupNorm, 32)
    raise UserError(f"unknown norm '{norm}': use one of {', '.join(NORMS)}")


def fpn_levels(strides: tuple[int, ...], extra: str) -> list[int]:
    """Which trunk stages (1..4 = C2..C5) feed the FPN, checked against the head's strides."""
    if extra == "p6p7":
        stages = [2, 3, 4]
        expected = (8, 16, 32, 64, 128)
    elif extra == "maxpool":
        stages = [1, 2, 3, 4]
        expected = (4, 8, 16, 32, 64)
    else:
        raise ValueError(f"unknown FPN extra levels {extra!r}")
    if tuple(strides) != expected:
        raise ValueError(f"FPN extra={extra!r} gives strides {expected}, head wants {strides}")
    return stages


def fpn_backbone(
    trunk: nn.Module,
    stage_channels: list[int],
    strides: tuple[int, ...],
    extra: str,
    out_channels: int = 256,
) -> BackboneWithFPN:
    """Wrap a trunk with children ``layer1..layer4`` (C2..C5) into torchvision's FPN backbone."""
    stages = fpn_levels(strides, extra)
    blocks = LastLevelP6P7(out_channels, out_channels) if extra == "p6p7" else LastLevelMaxPool()
    return BackboneWithFPN(
        trunk,
        return_layers={f"layer{s}": str(i) for i, s in enumerate(stages)},
        in_channels_list=[stage_channels[s - 1] for s in stages],
        out_channels=out_channels,
        extra_blocks=blocks,
    )


def freeze_stages(trunk: nn.Module, frozen_stages: int) -> None:
    """MMDetection ``frozen_stages``: -1 none, 0 the stem, k the stem and layer1..layerk."""
    if not -1 <= frozen_stages <= 4:
        raise UserError(f"frozen_stages must be in -1..4, got {frozen_stages}: e.g. 1 or -1")
    frozen = [] if frozen_stages < 0 else ["conv1", "bn1"]
    frozen += [f"layer{i}" for i in range(1, frozen_stages + 1)]
    for name in frozen:
        for p in getattr(trunk, name).parameters():
            p.requires_grad_(False)


def build_resnet_fpn(
    arch: str,
    strides: tuple[int, ...],
    extra: str,
    norm: str = "frozen_bn",
    frozen_stages: int = 1,
) -> BackboneWithFPN:
    block, layers, groups, width, _ = RESNETS[arch]
    trunk = tv_resnet.ResNet(
        block, layers, groups=groups, width_per_group=width, norm_layer=norm_layer(norm)
    )
    freeze_stages(trunk, frozen_stages)
    expansion = block.expansion
    channels = [64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion]
    return fpn_backbone(trunk, channels, strides, extra)


class TinyBlock(nn.Module):
    """A ResNet basic block (two 3x3 convs + identity/1x1 shortcut) with GroupNorm."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.gn1 = nn.GroupNorm(min(8, cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.gn2 = nn.GroupNorm(min(8, cout), cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.GroupNorm(min(8, cout), cout)
            )

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        out = self.relu(self.gn1(self.conv1(x)))
        out = self.gn2(self.conv2(out))
        return self.relu(out + identity)


class TinyResNet(nn.Module):
    """A ~0.3 M-parameter ResNet-style trunk (widths 16/32/64/128, one block per stage) with
    GroupNorm, so it trains from scratch at batch 2 on CPU. C2..C5 at strides 4..32."""

    widths = (16, 32, 64, 128)

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 2, 1, bias=False)
        self.bn1 = nn.GroupNorm(8, 16)
        self.relu = nn.ReLU(inplace=True)
        cin = 16
        for i, w in enumerate(self.widths, start=1):
            setattr(self, f"layer{i}", TinyBlock(cin, w, 2))
            cin = w
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def build_tiny_fpn(strides: tuple[int, ...], extra: str, fpn_channels: int = 64) -> BackboneWithFPN:
    return fpn_backbone(TinyResNet(), list(TinyResNet.widths), strides, extra, fpn_channels)


def _register() -> None:
    for arch, (_, _, _, _, desc) in RESNETS.items():
        builder = partial(build_resnet_fpn, arch)
        register_backbone(arch, builder, channels=256, description=f"{desc} FPN")
    register_backbone(
        "tiny",
        build_tiny_fpn,
        channels=64,
        description="tiny GN ResNet FPN (CPU tests/demo)",
        # keep the heads proportionate to a 64-channel FPN (torchvision defaults are for 256)
        # RoI sampling: 128 per image instead of 512, torchvision's CPU RoIAlign backward
        # dominates a tiny R-CNN step otherwise (4x slower at 96x128 px)
        head_defaults={
            "representation_size": 256,
            "mask_layers": (64, 64, 64, 64),
            "head_norm": "gn",
            "box_batch_size_per_image": 128,
        },
    )


_register()

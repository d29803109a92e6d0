"""MMDetection-faithful RetinaNet (``mmretina_*``), for MMDetection RetinaNet checkpoints.

torchvision's RetinaNet (``retina_*``) differs from MMDetection's ``retinanet_*_fpn`` configs in
three places that change the outputs of converted weights (see the team notes on MMDetection):

* P6 is a 3x3 stride-2 conv of **C5** (``add_extra_convs='on_input'``), not of P5;
* there is **no ReLU before P7** (``relu_before_extra_convs=False``);
* anchor sizes are ``4 * stride * 2^(i/3)`` **unrounded** (torchvision truncates them with
  ``int()`` and rounds the base anchors).

``mmretina_{backbone}`` is torchvision's RetinaNet head (identical to MMDetection's
``RetinaHead``: 4 convs, no norm, sigmoid focal loss) on these FPN levels and anchors; its
state-dict keys equal ``retina_*``'s, with ``backbone.fpn.extra_blocks.p6`` taking C5 channels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

from dfmsd_cli.models.cascade import ExactAnchorGenerator
from dfmsd_cli.models.dense import DENSE_STRIDES, RetinaDetector
from dfmsd_cli.models.registry import annotate_model, register_head


class MMDetExtraConvs(ExtraFPNBlock):
    """MMDetection ``FPN`` extra levels P6/P7 as two 3x3 stride-2 convs (names ``p6``/``p7``).

    ``source="input"``: P6 = conv(C5) (``add_extra_convs='on_input'``, RetinaNet);
    ``source="output"``: P6 = conv(P5) (``'on_output'``, FCOS, GFL). ``relu_before``
    (``relu_before_extra_convs``; FCOS True, RetinaNet/GFL False) applies a ReLU before the
    *second and later* extra convs only, as ``mmdet.models.necks.FPN.forward`` does:
    P6 = conv(source), P7 = conv(relu(P6)). The first extra conv never sees a ReLU.
    """

    def __init__(
        self, in_channels: int, out_channels: int, source: str = "input", relu_before: bool = False
    ) -> None:
        super().__init__()
        if source not in ("input", "output"):
            raise ValueError(f"source must be 'input' or 'output', got {source!r}")
        self.source = source
        self.relu_before = relu_before
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, 2, 1)
        for conv in (self.p6, self.p7):
            nn.init.xavier_uniform_(conv.weight)  # MMDetection ConvModule in FPN: xavier
            nn.init.zeros_(conv.bias)

    def forward(
        self, p: list[Tensor], c: list[Tensor], names: list[str]
    ) -> tuple[list[Tensor], list[str]]:
        p6 = self.p6(c[-1] if self.source == "input" else p[-1])
        p7 = self.p7(torch.relu(p6) if self.relu_before else p6)
        return [*p, p6, p7], [*names, "p6", "p7"]


def build_mmretina(
    backbone: nn.Module, num_classes: int, strides: tuple[int, ...] = DENSE_STRIDES, **options
) -> RetinaDetector:
    """RetinaNet with MMDetection's FPN extra levels and unrounded octave anchors."""
    c5 = backbone.fpn.inner_blocks[-1][0].in_channels
    backbone.fpn.extra_blocks = MMDetExtraConvs(c5, backbone.out_channels, source="input")
    model = RetinaDetector(backbone, num_classes, strides, **options)
    octaves = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
    sizes = tuple(tuple(4 * s * o for o in octaves) for s in strides)
    model.anchor_generator = ExactAnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(strides), strides)
    return model


register_head(
    "mmretina",
    build_mmretina,
    strides=DENSE_STRIDES,
    extra="p6p7",
    description="RetinaNet, MMDetection layout (P6 from C5, no ReLU before P7, exact anchors)",
    family="one_stage",
)
# MMDetection 3.3 model zoo, COCO val2017 box AP of the public checkpoints
for _name, _ap, _file in (
    ("mmretina_r50", 37.4, "retinanet_r50_fpn_2x_coco_20200131-fdb43119.pth"),
    ("mmretina_r101", 38.9, "retinanet_r101_fpn_2x_coco_20200131-5560aee8.pth"),
    ("mmretina_x101", 41.0, "retinanet_x101_64x4d_fpn_1x_coco_20200130-366f5af1.pth"),
):
    annotate_model(_name, published_ap=_ap, checkpoint=_file)

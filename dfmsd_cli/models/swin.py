"""Swin Transformer backbones (``swin_t``, ``swin_s``) with an FPN, for every head.

Liu et al. 2021, "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows".
The trunk is torchvision's ``swin_t``/``swin_s`` ``features`` (patch embedding, 4 stages of
shifted-window blocks, 3 patch mergings). Like MMDetection's ``SwinTransformer`` with
``out_indices=(0, 1, 2, 3)``, the outputs of stages 1/3/5/7 (NHWC, strides 4/8/16/32, channels
96/192/384/768) each pass one LayerNorm (MMDetection's ``norm0..norm3``) and are permuted to
NCHW before the FPN. ``dfmsd convert mmdet`` maps MMDetection Swin checkpoints onto
``backbone.body.features.*`` / ``backbone.body.norms.*``, restoring the patch-merging order.

Every block's attention is :class:`MMDetShiftedWindowAttention`: torchvision's
``shifted_window_attention`` drops the cyclic shift when a padded stage map is no larger than
the 7x7 window (small inputs, the last stages), MMDetection's ``ShiftWindowMSA`` always shifts
the odd blocks; dfmsd shifts as MMDetection does, so converted weights compute the same at
every input size.

FPN levels follow the head's ``extra`` exactly as the ResNet backbones do (``maxpool``: P2-P6
from C2-C5; ``p6p7``: P3-P7 from C3-C5).
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import swin_s, swin_t
from torchvision.models.swin_transformer import ShiftedWindowAttention
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


def shift_mask(
    pad_hw: tuple[int, int], window: tuple[int, int], shift: tuple[int, int], device=None
) -> Tensor:
    """SW-MSA mask (windows, N, N): 0 within a region, -100 across the regions the cyclic
    shift brings together (``ShiftWindowMSA``: slices ``[0, -ws)``, ``[-ws, -s)``, ``[-s, end)``
    per axis, numbered row-major)."""
    (ph, pw), (wh, ww), (sh, sw) = pad_hw, window, shift
    region = torch.zeros(ph, pw, device=device)
    count = 0
    for h in (slice(0, -wh), slice(-wh, -sh), slice(-sh, None)):
        for w in (slice(0, -ww), slice(-ww, -sw), slice(-sw, None)):
            region[h, w] = count
            count += 1
    region = region.view(ph // wh, wh, pw // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    diff = region[:, None, :] - region[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


def mmdet_shifted_window_attention(
    x: Tensor,
    qkv_weight: Tensor,
    proj_weight: Tensor,
    relative_position_bias: Tensor,
    window_size: list[int],
    num_heads: int,
    shift_size: list[int],
    attention_dropout: float = 0.0,
    dropout: float = 0.0,
    qkv_bias: Tensor | None = None,
    proj_bias: Tensor | None = None,
    training: bool = True,
) -> Tensor:
    """(S)W-MSA of Liu et al. 2021 as MMDetection 3.3's ``ShiftWindowMSA`` computes it.

    ``x`` (B, H, W, C) is zero-padded to multiples of the window, rolled by ``-shift``,
    split into windows of N = wh*ww tokens; per head
    ``softmax(q k^T / sqrt(C / heads) + B_rel + M) v`` with the relative position bias
    ``B_rel`` and the shift mask ``M`` (:func:`shift_mask`), then projected, merged, rolled
    back and cropped. Unlike torchvision's ``shifted_window_attention`` the shift is kept when
    the padded map is no larger than the window.
    """
    b, h, w, c = x.shape
    wh, ww = window_size
    x = F.pad(x, (0, 0, 0, (-w) % ww, 0, (-h) % wh))
    ph, pw = x.shape[1:3]
    sh, sw = shift_size
    shifted = sh > 0 or sw > 0
    if shifted:
        x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
    nh, nw, n = ph // wh, pw // ww, wh * ww
    x = x.view(b, nh, wh, nw, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, n, c)
    qkv = F.linear(x, qkv_weight, qkv_bias).reshape(-1, n, 3, num_heads, c // num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    attn = (q * (c // num_heads) ** -0.5) @ k.transpose(-2, -1) + relative_position_bias
    if shifted:
        mask = shift_mask((ph, pw), (wh, ww), (sh, sw), x.device).to(attn.dtype)
        attn = (attn.view(b, nh * nw, num_heads, n, n) + mask[None, :, None]).view(
            -1, num_heads, n, n
        )
    attn = F.dropout(attn.softmax(dim=-1), p=attention_dropout, training=training)
    x = (attn @ v).transpose(1, 2).reshape(-1, n, c)
    x = F.dropout(F.linear(x, proj_weight, proj_bias), p=dropout, training=training)
    x = x.view(b, nh, nw, wh, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c)
    if shifted:
        x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
    return x[:, :h, :w, :].contiguous()


class MMDetShiftedWindowAttention(ShiftedWindowAttention):
    """torchvision's ``ShiftedWindowAttention`` (same parameters and buffers) computing
    :func:`mmdet_shifted_window_attention`."""

    @classmethod
    def adopt(cls, attn: ShiftedWindowAttention) -> MMDetShiftedWindowAttention:
        """Re-class ``attn`` in place: no new state, so its parameters, buffers, their
        initialisation and their state-dict keys stay torchvision's."""
        attn.__class__ = cls
        return attn

    def forward(self, x: Tensor) -> Tensor:
        return mmdet_shifted_window_attention(
            x,
            self.qkv.weight,
            self.proj.weight,
            self.get_relative_position_bias(),
            self.window_size,
            self.num_heads,
            self.shift_size,
            attention_dropout=self.attention_dropout,
            dropout=self.dropout,
            qkv_bias=self.qkv.bias,
            proj_bias=self.proj.bias,
            training=self.training,
        )


class SwinBody(nn.Module):
    """torchvision Swin ``features`` -> ``OrderedDict`` of normalised NCHW maps C2..C5."""

    def __init__(self, arch: str = "swin_t", stages: tuple[int, ...] = (1, 2, 3, 4)) -> None:
        super().__init__()
        ctor, _ = SWINS[arch]
        self.features = ctor(weights=None).features
        for stage in self.features[1::2]:  # features 1/3/5/7: the blocks
            for block in stage:
                MMDetShiftedWindowAttention.adopt(block.attn)
        # one LayerNorm per output stage, as MMDetection's norm{i} for i in out_indices; a
        # stage that feeds no FPN level (stage 1 under P3-P7 heads) has none
        self.norms = nn.ModuleList(
            nn.LayerNorm(c) if i + 1 in stages else nn.Identity()
            for i, c in enumerate(SWIN_CHANNELS)
        )
        self.stages = tuple(stages)
        self._register_load_state_dict_pre_hook(self._drop_unused_norms)

    def _drop_unused_norms(self, state_dict, prefix, *args) -> None:
        """Checkpoints written before unused norms were dropped still load: their (never
        applied) ``norms.{i}`` tensors are discarded."""
        for i, norm in enumerate(self.norms):
            if isinstance(norm, nn.Identity):
                for leaf in ("weight", "bias"):
                    state_dict.pop(f"{prefix}norms.{i}.{leaf}", None)

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

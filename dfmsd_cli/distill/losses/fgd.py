"""FGD: Focal and Global Distillation (Yang et al., CVPR 2022; official code yzd-v/FGD,
mmdet/distillation/losses/fgd.py), vectorised over boxes and restricted to the valid region.

Per matched FPN level, student S (1×1 align conv when channels differ, resized to the teacher's
size), teacher T, (B, C, H, W), valid cells V, temperature T_a (0.5; 0.8 for FCOS):

* attention of a feature F: ``A^s(F) = n_valid · softmax(mean_c|F| / T_a)`` over V,
  ``A^c(F) = C · softmax(mean_V|F| / T_a)`` over channels;
* foreground mask M_fg: each GT box (resized-image xyxy) divided by the stride, cells
  ``floor(y1)..ceil(y2)`` × ``floor(x1)..ceil(x2)`` (clamped to the map); each cell gets the max
  over boxes of ``1 / (box area in cells)``; background mask M_bg = 1 on valid cells with
  M_fg = 0, divided by their count (per image);
* focal loss ``α·Σ M_fg·A^s_T·A^c_T·(S − T)² / B + β·Σ M_bg·A^s_T·A^c_T·(S − T)² / B``;
* attention-mask loss ``γ·(Σ|A^c_S − A^c_T| + Σ|A^s_S − A^s_T|) / B``;
* global relation loss ``λ·Σ_V (GC_S(S) − GC_T(T))² / B`` with a GcBlock on each side
  (Cao et al. GCNet): context = Σ softmax(conv1×1(F))·F over V, then
  F + conv1×1(ReLU(LayerNorm(conv1×1(context)))) with a C/2 bottleneck, last conv zero-initialised.

Weights: one-stage α=1e-3, β=5e-4, γ=5e-4, λ=5e-6; two-stage α=5e-5, β=2.5e-5, γ=5e-5, λ=5e-7.
The official code builds M_fg with a Python loop per box (yzd-v/FGD issue 43); here it is one
broadcast comparison of all boxes against the cell grid.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dfmsd_cli.distill.losses.common import (
    LevelwiseLoss,
    align_conv,
    channel_attention,
    masked_softmax,
    raw_statistics,
    resize_to,
    spatial_attention,
    zero_loss,
)


def pad_boxes(boxes: list[Tensor], device=None) -> tuple[Tensor, Tensor]:
    """Stack per-image (n_i, 4) boxes into (B, n_max, 4) with a (B, n_max) bool presence mask."""
    n = max([int(b.shape[0]) for b in boxes] + [1])
    out = torch.zeros((len(boxes), n, 4), device=device)
    present = torch.zeros((len(boxes), n), dtype=torch.bool, device=device)
    for i, b in enumerate(boxes):
        out[i, : b.shape[0]] = b.to(device=device, dtype=torch.float32)
        present[i, : b.shape[0]] = True
    return out, present


def foreground_background_masks(
    boxes: Tensor, present: Tensor, valid: Tensor, stride: int
) -> tuple[Tensor, Tensor]:
    """FGD's M_fg and M_bg, (B, H, W) each, for (B, n, 4) xyxy ``boxes`` in image pixels."""
    b, h, w = valid.shape
    cells = boxes / float(stride)
    x1 = cells[..., 0].floor().clamp(0, w - 1)
    y1 = cells[..., 1].floor().clamp(0, h - 1)
    x2 = cells[..., 2].ceil().clamp(0, w - 1)
    y2 = cells[..., 3].ceil().clamp(0, h - 1)
    area = (y2 + 1 - y1) * (x2 + 1 - x1)  # (B, n) cells covered
    ys = torch.arange(h, device=boxes.device, dtype=boxes.dtype)
    xs = torch.arange(w, device=boxes.device, dtype=boxes.dtype)
    in_y = (ys >= y1[..., None]) & (ys <= y2[..., None])  # (B, n, H)
    in_x = (xs >= x1[..., None]) & (xs <= x2[..., None])  # (B, n, W)
    inside = in_y[..., :, None] & in_x[..., None, :] & present[..., None, None]
    fg = (inside.float() / area[..., None, None]).amax(dim=1) * valid
    bg = ((fg == 0) & valid).float()
    bg = bg / bg.flatten(1).sum(dim=1).clamp_min(1.0)[:, None, None]
    return fg, bg


class ContextBlock(nn.Module):
    """GcBlock (Cao et al., GCNet 2019) as in FGD: attention pooling + channel-add transform."""

    def __init__(self, channels: int, ratio: float = 0.5) -> None:
        super().__init__()
        planes = max(1, int(channels * ratio))
        self.conv_mask = nn.Conv2d(channels, 1, kernel_size=1)
        self.channel_add = nn.Sequential(
            nn.Conv2d(channels, planes, kernel_size=1),
            nn.LayerNorm([planes, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, channels, kernel_size=1),
        )
        nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.conv_mask.bias)
        nn.init.zeros_(self.channel_add[-1].weight)  # FGD: last_zero_init
        nn.init.zeros_(self.channel_add[-1].bias)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        b, c, h, w = x.shape
        logits = self.conv_mask(x).reshape(b, h * w)
        p = masked_softmax(logits, valid.reshape(b, h * w))  # (B, HW)
        context = torch.einsum("bn,bcn->bc", p, x.reshape(b, c, h * w))[..., None, None]
        return x + self.channel_add(context)


class FGDLevel(nn.Module):
    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        temperature: float = 0.5,
        alpha_fg: float = 1e-3,
        beta_bg: float = 5e-4,
        gamma_mask: float = 5e-4,
        lambda_rela: float = 5e-6,
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.alpha_fg, self.beta_bg = alpha_fg, beta_bg
        self.gamma_mask, self.lambda_rela = gamma_mask, lambda_rela
        self.align = align_conv(student_channels, teacher_channels)
        self.gc_s = ContextBlock(teacher_channels)
        self.gc_t = ContextBlock(teacher_channels)

    def attention(self, feature: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """(A^s, A^c) of a feature; differentiable, so the student's enters the mask loss."""
        spatial, channel = raw_statistics(feature, valid)
        return (
            spatial_attention(spatial, valid, self.temperature),
            channel_attention(channel, self.temperature),
        )

    def forward(
        self,
        student: Tensor,
        teacher: Tensor,
        valid: Tensor,
        boxes: Tensor,
        present: Tensor,
        stride: int,
    ) -> Tensor:
        s = resize_to(self.align(student), teacher.shape[-2:]).float()
        t = teacher.float()
        n = s.shape[0]
        sa_t, ca_t = self.attention(t, valid)
        sa_s, ca_s = self.attention(s, valid)
        fg, bg = foreground_background_masks(boxes, present, valid, stride)
        weight = sa_t[:, None] * ca_t[:, :, None, None]  # teacher attention weights both sides
        sq = (s - t) ** 2 * weight
        fg_loss = (sq * fg[:, None]).sum() / n
        bg_loss = (sq * bg[:, None]).sum() / n
        mask_loss = ((ca_s - ca_t).abs().sum() + (sa_s - sa_t).abs().sum()) / n
        rela = (self.gc_s(s, valid) - self.gc_t(t, valid)) ** 2
        rela_loss = (rela * valid[:, None]).sum() / n
        return (
            self.alpha_fg * fg_loss
            + self.beta_bg * bg_loss
            + self.gamma_mask * mask_loss
            + self.lambda_rela * rela_loss
        )


class FGDLoss(LevelwiseLoss):
    """Σ over matched levels of :class:`FGDLevel`; the four weights are inside (FGD's configs
    set them per loss, so the outer weight of ``--method fgd`` is 1)."""

    def __init__(self, levels, student_channels, teacher_channels, **level_kwargs) -> None:
        super().__init__(
            levels,
            student_channels,
            teacher_channels,
            lambda cs, ct: FGDLevel(cs, ct, **level_kwargs),
        )

    def forward(self, student, teacher, valid, stats=None, targets=None) -> Tensor:
        if targets is None:
            raise ValueError("FGD needs the ground-truth boxes (targets)")
        total = zero_loss(student)
        ref = next(iter(student.values()))
        boxes, present = pad_boxes([t["boxes"] for t in targets], ref.device)
        for s, mod, fs, ft, v in self._levels(student, teacher, valid):
            total = total + mod(fs, ft, v, boxes, present, s)
        return total

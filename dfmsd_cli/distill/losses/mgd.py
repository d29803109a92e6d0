"""MGD: Masked Generative Distillation (Yang et al., ECCV 2022; official code yzd-v/MGD,
det/mmdet/distillation/losses/mgd.py).

Per matched FPN level, teacher T (B, C, H, W), valid cells V:

* student S → 1×1 align conv when channels differ (→ bilinear resize to T's size);
* random spatial mask shared over channels: each cell is zeroed with probability λ
  (official ``rand > 1 − λ``), λ = 0.65 for one-stage students, 0.45 for two-stage;
* generation block ``G = conv3×3(ReLU(conv3×3(S ⊙ M)))``;
* ``L = Σ_{C,H,W ∈ V} (G − T)² / B`` (official: MSE sum / N over the whole map; we restrict the sum
  to the image region so the store's zero padding is never a target).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dfmsd_cli.distill.losses.common import (
    GenerationBlock,
    LevelwiseLoss,
    align_conv,
    generation_loss,
    resize_to,
    zero_loss,
)


def random_spatial_mask(shape: tuple[int, int, int], lam: float, device=None) -> Tensor:
    """Bool (B, H, W), True = masked, each cell independently with probability ``lam``."""
    return torch.rand(shape, device=device) > 1.0 - lam


class MGDLevel(nn.Module):
    def __init__(self, student_channels: int, teacher_channels: int, lam: float = 0.65) -> None:
        super().__init__()
        self.lam = lam
        self.align = align_conv(student_channels, teacher_channels)
        self.generation = GenerationBlock(teacher_channels)

    def forward(self, student: Tensor, teacher: Tensor, valid: Tensor) -> Tensor:
        s = resize_to(self.align(student), teacher.shape[-2:])
        masked = random_spatial_mask(tuple(valid.shape), self.lam, s.device)
        g = self.generation(s * (~masked)[:, None].to(s.dtype))
        return generation_loss(g, teacher, valid)


class MGDLoss(LevelwiseLoss):
    """Σ over matched levels of :class:`MGDLevel`."""

    def __init__(self, levels, student_channels, teacher_channels, lam: float = 0.65) -> None:
        super().__init__(
            levels, student_channels, teacher_channels, lambda cs, ct: MGDLevel(cs, ct, lam)
        )

    def forward(self, student, teacher, valid, stats=None, targets=None) -> Tensor:
        total = zero_loss(student)
        for _s, mod, fs, ft, v in self._levels(student, teacher, valid):
            total = total + mod(fs, ft, v)
        return total

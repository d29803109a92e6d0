"""SFA: semantic feature alignment (DFMSD) = PKD's Pearson-correlation feature loss
(Cao et al., NeurIPS 2022; official code open-mmlab/mmrazor, mmrazor/models/losses/pkd_loss.py).

Per matched FPN level, student S (after a 1×1 align conv when channels differ and a bilinear
resize to the teacher's size) and teacher T, both (B, C, H, W), valid cells V:

* each channel c is standardised over the batch's valid cells (not per image, as PKD):
  ``Ŝ_c = (S_c − μ_c) / (σ_c + ε)`` with μ_c, σ_c the mean and unbiased std of S_c over
  {(b, h, w) ∈ V}, ε = 1e-6 (PKD's constant); same for T;
* ``L = mean_{c, (b,h,w) ∈ V} (Ŝ − T̂)² / 2``.

Difference from the official code: PKD's statistics include the padding cells; a letterboxed
store pads with zeros, so we use the valid cells only (docs/method.md). Because of the
standardisation, L is invariant to a per-channel affine map x ↦ a_c·x + b_c (a_c > 0) of either
feature (up to ε).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dfmsd_cli.distill.losses.common import LevelwiseLoss, align_conv, resize_to, zero_loss


def standardize_valid(x: Tensor, valid: Tensor, eps: float = 1e-6) -> Tensor:
    """(C, N) values of x at the valid cells, standardised per channel over the batch."""
    c = x.shape[1]
    values = x.float().permute(1, 0, 2, 3)[:, valid]  # (C, N_valid)
    if values.shape[1] < 2:
        return torch.zeros_like(values)
    mean = values.mean(dim=1, keepdim=True)
    std = values.std(dim=1, keepdim=True)
    return ((values - mean) / (std + eps)).reshape(c, -1)


def pkd_level_loss(student: Tensor, teacher: Tensor, valid: Tensor, eps: float = 1e-6) -> Tensor:
    """mean (Ŝ − T̂)² / 2 over channels and valid cells (see the module docstring)."""
    s = standardize_valid(student, valid, eps)
    t = standardize_valid(teacher, valid, eps)
    if s.numel() == 0:
        return student.float().sum() * 0.0
    return ((s - t) ** 2).mean() / 2.0


class SFALevel(nn.Module):
    def __init__(self, student_channels: int, teacher_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.align = align_conv(student_channels, teacher_channels)

    def forward(self, student: Tensor, teacher: Tensor, valid: Tensor) -> Tensor:
        s = resize_to(self.align(student), teacher.shape[-2:])
        return pkd_level_loss(s, teacher, valid, self.eps)


class SFALoss(LevelwiseLoss):
    """The PKD loss over matched levels: summed (``--method pkd``, as PKD's configs weight each
    level) or averaged (``average=True``: DFMSD's L_SFA, Eq. 5 normalises by the number of
    aligned levels, ``L = (1/L) Σ_l pkd_l``).

    ``levels`` are the aligned strides (DFMSD: the three finest shared levels, Table 9's best
    "P1 to P3"; :func:`finest_levels`).
    """

    def __init__(
        self, levels, student_channels, teacher_channels, eps: float = 1e-6, average: bool = False
    ) -> None:
        super().__init__(
            levels, student_channels, teacher_channels, lambda cs, ct: SFALevel(cs, ct, eps)
        )
        self.average = average

    def forward(self, student, teacher, valid, stats=None, targets=None) -> Tensor:
        total, count = zero_loss(student), 0
        for _s, mod, fs, ft, v in self._levels(student, teacher, valid):
            total, count = total + mod(fs, ft, v), count + 1
        return total / max(count, 1) if self.average else total


def finest_levels(levels: list[int], count: int | None) -> list[int]:
    """The ``count`` smallest strides of ``levels`` (all of them for None): DFMSD's SFA aligns
    "each FPN layer from P1 to P3", the finest levels teacher and student share (Table 9)."""
    ordered = sorted(int(s) for s in levels)
    return ordered if count is None else ordered[:count]

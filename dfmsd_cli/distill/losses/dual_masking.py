"""Dual feature masking (DMKD core of DFMSD) — our documented formulation.

Sources: DFMSD (Zhang et al., arXiv 2407.13147) inherits the dual masking of DMKD (same authors);
neither has public code and their equations were not recoverable, so the formulation below is
ours, assembled from the published descriptions (AMD: attention-guided spatial masking + an SE
channel module; DMKD: spatial- and channel-attention guided masking in two branches fused by
self-adjustable weights) and MGD's generation block and loss (Yang et al., ECCV 2022). It is
written out in docs/method.md; every constant is a constructor argument.

Per matched FPN level, with teacher feature T (B, C, H, W) and valid cells V:

* teacher attention from the raw stored statistics, over V only (τ = 0.5):
  ``A_s = n_valid · softmax(mean_c |T| / τ)``, ``A_c = C · softmax(mean_{hw∈V} |T| / τ)``;
* student feature S → 1×1 align conv when channels differ → bilinear resize to T's size;
* spatial branch: a fraction λ_s of the valid cells is chosen by ``rule`` from A_s and zeroed
  (shared over channels): ``G_s = Gen_s(S ⊙ (1 − M_s))``;
* channel branch: a fraction λ_c of the channels is chosen by ``rule`` from A_c and zeroed
  (shared over positions), then an SE block: ``G_c = Gen_c(SE(S ⊙ (1 − M_c)))``;
* fusion with learnable weights ``(w_s, w_c) = softmax(θ)``, θ initialised to 0:
  ``G = w_s·G_s + w_c·G_c``;
* loss ``Σ_{C,H,W ∈ V} (G − T)² / B`` for L_stage (DFMSD Eq. 7, MGD's reduction); for L_ME
  the mean over the level's valid elements, ``Σ (G − T)² / (C·|V|)`` (DFMSD Eq. 8,
  ``reduction="mean"``). Both sum over the matched levels.

``rule``: ``sample`` (cells/channels drawn without replacement with probability ∝ attention),
``top`` (the highest-attention fraction), ``random`` (uniform; with λ_c = 0 this is MGD with an
exact-count mask).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dfmsd_cli.distill.losses.common import (
    MASK_RULES,
    GenerationBlock,
    LevelwiseLoss,
    SEBlock,
    align_conv,
    channel_attention,
    generation_loss,
    raw_statistics,
    resize_to,
    select_fraction,
    spatial_attention,
    zero_loss,
)


def dual_masks(
    spatial_stat: Tensor,
    channel_stat: Tensor,
    valid: Tensor,
    lambda_s: float,
    lambda_c: float,
    tau: float = 0.5,
    rule: str = "sample",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """The two masks of one level from raw teacher statistics.

    ``spatial_stat`` (B, H, W) = mean_c|T|, ``channel_stat`` (B, C) = valid-region mean of |T|.
    Returns ``(M_s (B, H, W) bool, M_c (B, C) bool)``, True = masked; M_s is False off ``valid``.
    """
    b, h, w = spatial_stat.shape
    a_s = spatial_attention(spatial_stat, valid, tau).reshape(b, h * w)
    m_s = select_fraction(a_s, valid.reshape(b, h * w), lambda_s, rule, generator)
    a_c = channel_attention(channel_stat, tau)
    all_channels = torch.ones_like(a_c, dtype=torch.bool)
    m_c = select_fraction(a_c, all_channels, lambda_c, rule, generator)
    return m_s.reshape(b, h, w), m_c


class DualMaskingLevel(nn.Module):
    """One FPN level of the dual-masking generation loss (see the module docstring)."""

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        lambda_s: float = 0.65,
        lambda_c: float = 0.5,
        tau: float = 0.5,
        rule: str = "sample",
        se_reduction: int = 16,
        reduction: str = "batch",
    ) -> None:
        super().__init__()
        if reduction not in ("batch", "mean"):
            raise ValueError(f"unknown reduction {reduction!r}: use 'batch' or 'mean'")
        self.reduction = reduction
        if rule not in MASK_RULES:
            raise ValueError(f"unknown mask rule {rule!r}: use one of {', '.join(MASK_RULES)}")
        self.lambda_s, self.lambda_c, self.tau, self.rule = lambda_s, lambda_c, tau, rule
        self.align = align_conv(student_channels, teacher_channels)
        self.gen_s = GenerationBlock(teacher_channels)
        self.se = SEBlock(teacher_channels, se_reduction)
        self.gen_c = GenerationBlock(teacher_channels)
        self.fuse_logits = nn.Parameter(torch.zeros(2))

    def reconstruct(self, student: Tensor, m_s: Tensor, m_c: Tensor, valid: Tensor) -> Tensor:
        """G = w_s·Gen_s(S ⊙ (1−M_s)) + w_c·Gen_c(SE(S ⊙ (1−M_c))) on an aligned student map."""
        keep_s = (~m_s)[:, None].to(student.dtype)
        keep_c = (~m_c)[:, :, None, None].to(student.dtype)
        g_s = self.gen_s(student * keep_s)
        g_c = self.gen_c(self.se(student * keep_c, valid))
        w = torch.softmax(self.fuse_logits, dim=0)
        return w[0] * g_s + w[1] * g_c

    def forward(
        self,
        student: Tensor,
        teacher: Tensor,
        valid: Tensor,
        spatial_stat: Tensor | None = None,
        channel_stat: Tensor | None = None,
    ) -> Tensor:
        s = resize_to(self.align(student), teacher.shape[-2:])
        if spatial_stat is None or channel_stat is None:
            spatial_stat, channel_stat = raw_statistics(teacher.detach(), valid)
        m_s, m_c = dual_masks(
            spatial_stat, channel_stat, valid, self.lambda_s, self.lambda_c, self.tau, self.rule
        )
        generated = self.reconstruct(s, m_s, m_c, valid)
        return generation_loss(generated, teacher, valid, self.reduction)


class DualMaskingLoss(LevelwiseLoss):
    """Σ over matched levels of :class:`DualMaskingLevel` (DFMSD's L_stage and L_ME).

    ``level_cls`` is the per-level module; a loss with the same call and statistics (SAMKD's
    SFD) subclasses this with its own level."""

    level_cls: type[nn.Module] = DualMaskingLevel

    def __init__(self, levels, student_channels, teacher_channels, **level_kwargs) -> None:
        level_cls = self.level_cls
        super().__init__(
            levels,
            student_channels,
            teacher_channels,
            lambda cs, ct: level_cls(cs, ct, **level_kwargs),
        )

    def forward(
        self,
        student: dict[int, Tensor],
        teacher: dict[int, Tensor],
        valid: dict[int, Tensor],
        stats: dict | None = None,
        targets: list | None = None,
    ) -> Tensor:
        total = zero_loss(student)
        for s, mod, fs, ft, v in self._levels(student, teacher, valid):
            sp = stats["spatial"].get(s) if stats else None
            ch = stats["channel"].get(s) if stats else None
            total = total + mod(fs, ft, v, sp, ch)
        return total

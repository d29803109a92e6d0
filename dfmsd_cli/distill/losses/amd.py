"""AMD: Adaptive Masked Distillation (Yang, Tang, Li, Xu, Wan; IJCNN 2023, arXiv 2301.13538) —
our documented formulation (docs/method.md, "AMD").

AMD is the single-branch predecessor of DMKD/DFMSD (same group). Its published description:
MGD's masked generation, but the spatial mask is guided by the teacher's attention instead of
being random, plus "a simple and efficient module" that makes the student's channels adaptive
(an SE block). No code is public and the equations were not readable, so every choice below
that is not MGD's or FGD's is ours (marked in docs/method.md).

Per matched FPN level, teacher T (B, C, H, W), valid cells V:

* teacher spatial attention over V from the raw statistic ``a_s = mean_c |T|`` (stored, or
  computed from T): ``A_s = n_valid · softmax(a_s / τ)`` (FGD Eq. 2 on the valid region), τ = 0.5;
* student S → 1×1 align conv when channels differ → bilinear resize to T's size: S';
* spatial mask M (True = masked): ``k = round(λ · n_valid)`` valid cells per image chosen from
  A_s by ``rule`` (``sample`` ∝ attention, our choice; ``top``; ``random``), shared over channels;
* channel-adaptive module then MGD's generation block: ``G = Gen(SE(S' ⊙ (1 − M)))``;
* ``L = Σ_{C, (h,w)∈V} (G − T)² / B`` (MGD Eq. 4's reduction, summed over matched levels).

Difference from :mod:`dual_masking` (DMKD): one branch, a spatial mask only (no channel mask),
the SE block on that single branch, no learnable fusion.
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
    generation_loss,
    raw_statistics,
    resize_to,
    select_fraction,
    spatial_attention,
    zero_loss,
)

# Defaults per student family for a method registration (the loss's outer weight α and the
# constructor kwargs). AMD publishes none readable; it compares in MGD's settings, so MGD's
# official α and λ are our choice (docs/method.md, "AMD").
AMD_DEFAULTS: dict[str, dict[str, float]] = {
    "one_stage": {"alpha": 2e-5, "lam": 0.65},
    "two_stage": {"alpha": 5e-7, "lam": 0.45},
}


def attention_spatial_mask(
    spatial_stat: Tensor,
    valid: Tensor,
    lam: float,
    tau: float = 0.5,
    rule: str = "sample",
    generator: torch.Generator | None = None,
) -> Tensor:
    """AMD's spatial mask (B, H, W) bool, True = masked, from the raw stat ``mean_c |T|``.

    ``round(lam · n_valid)`` valid cells per image, chosen from ``A_s`` by ``rule``;
    always False outside ``valid``.
    """
    b, h, w = spatial_stat.shape
    a_s = spatial_attention(spatial_stat, valid, tau).reshape(b, h * w)
    return select_fraction(a_s, valid.reshape(b, h * w), lam, rule, generator).reshape(b, h, w)


class AMDLevel(nn.Module):
    """One FPN level of AMD (see the module docstring)."""

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        lam: float = 0.65,
        tau: float = 0.5,
        rule: str = "sample",
        se_reduction: int = 16,
    ) -> None:
        super().__init__()
        if rule not in MASK_RULES:
            raise ValueError(f"unknown mask rule {rule!r}: use one of {', '.join(MASK_RULES)}")
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"mask ratio lam={lam} is outside [0, 1]: use e.g. 0.65")
        self.lam, self.tau, self.rule = lam, tau, rule
        self.align = align_conv(student_channels, teacher_channels)
        self.se = SEBlock(teacher_channels, se_reduction)
        self.generation = GenerationBlock(teacher_channels)

    def reconstruct(self, student: Tensor, mask: Tensor, valid: Tensor) -> Tensor:
        """``G = Gen(SE(S' ⊙ (1 − M)))`` on an aligned student map."""
        keep = (~mask)[:, None].to(student.dtype)
        return self.generation(self.se(student * keep, valid))

    def forward(
        self,
        student: Tensor,
        teacher: Tensor,
        valid: Tensor,
        spatial_stat: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        s = resize_to(self.align(student), teacher.shape[-2:])
        if spatial_stat is None:
            spatial_stat = raw_statistics(teacher.detach(), valid)[0]
        mask = attention_spatial_mask(spatial_stat, valid, self.lam, self.tau, self.rule, generator)
        return generation_loss(self.reconstruct(s, mask, valid), teacher, valid)


class AMDLoss(LevelwiseLoss):
    """Σ over matched levels of :class:`AMDLevel`; weight it by α (:data:`AMD_DEFAULTS`).

    Uses the stored raw spatial statistic ``stats["spatial"][stride]`` when given (the same one
    DFM uses), else computes it from the teacher feature.
    """

    def __init__(self, levels, student_channels, teacher_channels, **level_kwargs) -> None:
        super().__init__(
            levels,
            student_channels,
            teacher_channels,
            lambda cs, ct: AMDLevel(cs, ct, **level_kwargs),
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
            total = total + mod(fs, ft, v, sp)
        return total

"""SAMKD's SFD: spatially hierarchical (spatial-pyramid) dual feature masking — our formulation.

Source: SAMKD (Zhang, Li et al., arXiv 2501.07101; v1 "Dual Scale-aware Adaptive Masked
Knowledge Distillation"). No code or equations are public; the abstracts describe coarse-to-fine
feature masking guided by the teacher's spatial + channel attention at several granularities
(v2) and multi-scale pooling of both maps before masked reconstruction with adaptive weights
(v1). Everything below not in that sentence is our choice, written out in docs/method.md.

Per matched FPN level, with aligned student S' = resize(align(S)) and teacher T, for each grid
g in ``grids`` (default 1, 2, 4; windows as in :mod:`.windows`):

* ``A_s^g = n_w · softmax_{window}(mean_c|T| / τ)`` — a window's weights sum to its valid cells;
* spatial mask ``M_s^g``: ``round(λ_s · n_w)`` valid cells per window, chosen by ``rule``;
* channel mask ``M_c^g``: per window, ``round(λ_c · C)`` channels chosen by ``rule`` from
  ``A_c^w = C · softmax_c(mean_{window}|T| / τ)``, applied on that window's cells;
* reconstruction with DFM's blocks (one set per level, shared by the scales):
  ``G^g = w_s·Gen_s(S' ⊙ (1−M_s^g)) + w_c·Gen_c(SE(S' ⊙ (1−M_c^g)))``, ``(w_s, w_c) = softmax(θ)``;
* ``L^g = Σ_{C,(h,w)∈V} (G^g − T)² / B`` (``reduction="batch"``, DFMSD Eq. 7 / MGD) or the
  per-element mean (``"mean"``);
* ``L_SFD = Σ_levels Σ_g ω_g L^g`` with fixed ``scale_weights`` (default ``"uniform"``, 1/n
  each) or ``"learnable"``: ``ω = softmax(φ)``, φ initialised to 0. A learnable mixture of
  *losses* is minimised by moving all weight to the smallest L^g (∂/∂φ_g = ω_g(L^g − L̄)): it
  collapses onto the easiest scale (within 100 SGD steps on fixed tensors,
  examples/samkd_scale_weights.py) — hence uniform by default.

``pool=True`` (v1): scale g works on both maps max-pooled (over valid cells) by
``f_g = max(grids) / g`` — the global 1×1 window on a coarse map, the finest windows at full
resolution; its statistics are recomputed from the pooled teacher. Its Σ/B runs over the pooled
cells, uncompensated — a coarse scale weighs less, as a coarse FPN level does in MGD's sum.
With ``grids=(1,)`` and ``pool=False`` SFD is DFM's dual masking: the same masks on the valid
cells (DFM's channel mask also zeroes padding cells, SFD's windows have none).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfmsd_cli.distill.losses.common import (
    generation_loss,
    raw_statistics,
    resize_to,
)
from dfmsd_cli.distill.losses.dual_masking import DualMaskingLevel, DualMaskingLoss
from dfmsd_cli.distill.losses.windows import (
    windowed_channel_mask,
    windowed_channel_stat,
    windowed_spatial_attention,
    windowed_spatial_mask,
)


def max_pool_valid(x: Tensor, valid: Tensor, factor: int) -> tuple[Tensor, Tensor]:
    """Max-pool (B, C, H, W) by ``factor`` (kernel = stride, ceil mode) over valid cells only.

    A pooled cell is valid when its window holds a valid cell; it takes the max over those
    cells (padding never wins), and is 0 when invalid. Returns (pooled map, pooled valid).
    """
    if factor == 1:
        return x, valid
    lowest = torch.finfo(x.dtype).min
    pooled = F.max_pool2d(x.masked_fill(~valid[:, None], lowest), factor, factor, ceil_mode=True)
    pv = F.max_pool2d(valid[:, None].to(x.dtype), factor, factor, ceil_mode=True)[:, 0] > 0
    return pooled.masked_fill(~pv[:, None], 0.0), pv


class SFDLevel(nn.Module):
    """One FPN level of SFD (see the module docstring); DFM's blocks live in ``self.dfm``."""

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        grids: tuple[int, ...] = (1, 2, 4),
        lambda_s: float = 0.65,
        lambda_c: float = 0.5,
        tau: float = 0.5,
        rule: str = "sample",
        se_reduction: int = 16,
        reduction: str = "batch",
        pool: bool = False,
        scale_weights: str | tuple[float, ...] = "uniform",
    ) -> None:
        super().__init__()
        self.grids = tuple(int(g) for g in grids)
        if not self.grids or min(self.grids) < 1:
            raise ValueError(f"grids must be positive integers, got {grids!r}")
        top = max(self.grids)
        if pool and any(top % g for g in self.grids):
            raise ValueError(f"pool needs every grid to divide the largest, got {grids!r}")
        self.pool = pool
        self.dfm = DualMaskingLevel(
            student_channels,
            teacher_channels,
            lambda_s=lambda_s,
            lambda_c=lambda_c,
            tau=tau,
            rule=rule,
            se_reduction=se_reduction,
            reduction=reduction,
        )
        if scale_weights == "learnable":
            self.scale_logits = nn.Parameter(torch.zeros(len(self.grids)))
        else:
            if scale_weights == "uniform":
                scale_weights = (1.0 / len(self.grids),) * len(self.grids)
            fixed = torch.as_tensor(scale_weights, dtype=torch.float32)
            if fixed.shape != (len(self.grids),):
                raise ValueError(f"scale_weights needs one weight per grid {self.grids}")
            self.register_buffer("fixed_weights", fixed)
            self.scale_logits = None

    def scale_weights(self) -> Tensor:
        """ω_g: softmax of the learnable logits, or the fixed weights."""
        if self.scale_logits is not None:
            return torch.softmax(self.scale_logits, dim=0)
        return self.fixed_weights

    def masks(
        self,
        teacher: Tensor,
        valid: Tensor,
        grid: int,
        spatial_stat: Tensor | None = None,
        channel_stat: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(M_s (B, H, W), M_c (B, C, H, W))`` of one grid (True = masked, False off V)."""
        d = self.dfm
        t = teacher.detach()
        if spatial_stat is None:
            spatial_stat, _ = raw_statistics(t, valid)
        if channel_stat is None or grid != 1:
            channel_stat = windowed_channel_stat(t.float(), valid, grid)
        a_s = windowed_spatial_attention(spatial_stat, valid, grid, d.tau)
        m_s = windowed_spatial_mask(a_s, valid, grid, d.lambda_s, d.rule)
        m_c = windowed_channel_mask(channel_stat, valid, grid, d.lambda_c, d.tau, d.rule)
        return m_s, m_c

    def reconstruct(self, student: Tensor, m_s: Tensor, m_c: Tensor, valid: Tensor) -> Tensor:
        """DFM's fused reconstruction with a per-window channel mask (B, C, H, W)."""
        d = self.dfm
        g_s = d.gen_s(student * (~m_s)[:, None].to(student.dtype))
        g_c = d.gen_c(d.se(student * (~m_c).to(student.dtype), valid))
        w = torch.softmax(d.fuse_logits, dim=0)
        return w[0] * g_s + w[1] * g_c

    def scale_losses(
        self,
        student: Tensor,
        teacher: Tensor,
        valid: Tensor,
        spatial_stat: Tensor | None = None,
        channel_stat: Tensor | None = None,
    ) -> Tensor:
        """(len(grids),) float32: L^g for every grid, unweighted."""
        s = resize_to(self.dfm.align(student), teacher.shape[-2:])
        out = []
        for g in self.grids:
            factor = max(self.grids) // g if self.pool else 1
            if factor > 1:
                s_g, _ = max_pool_valid(s, valid, factor)
                t_g, v_g = max_pool_valid(teacher, valid, factor)
                sp, ch = None, None  # the stored statistics are full-resolution
            else:
                s_g, t_g, v_g, sp, ch = s, teacher, valid, spatial_stat, channel_stat
            m_s, m_c = self.masks(t_g, v_g, g, sp, ch)
            generated = self.reconstruct(s_g, m_s, m_c, v_g)
            out.append(generation_loss(generated, t_g, v_g, self.dfm.reduction))
        return torch.stack(out)

    def forward(
        self,
        student: Tensor,
        teacher: Tensor,
        valid: Tensor,
        spatial_stat: Tensor | None = None,
        channel_stat: Tensor | None = None,
    ) -> Tensor:
        losses = self.scale_losses(student, teacher, valid, spatial_stat, channel_stat)
        return (self.scale_weights().to(losses.dtype) * losses).sum()


class SFDLoss(DualMaskingLoss):
    """Σ over matched levels of :class:`SFDLevel` (SAMKD's L_SFD); same call as DFM's loss."""

    level_cls = SFDLevel

    @torch.no_grad()
    def aligned(self, student: dict[int, Tensor], teacher: dict[int, Tensor]) -> dict[int, Tensor]:
        """S' = resize(align(S)) per matched level, detached — the feature SLD's weight uses
        (SLD has no align conv of its own: a conv behind a detached weight would never train)."""
        out = {}
        for s in self.levels:
            if s in student and s in teacher:
                conv = self.per_level[str(s)].dfm.align
                out[s] = resize_to(conv(student[s]), teacher[s].shape[-2:])
        return out

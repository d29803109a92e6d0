"""FKD: attention-guided and non-local distillation (Zhang & Ma, "Improve Object Detection with
Feature-based Knowledge Distillation: Towards Accurate and Efficient Detectors", ICLR 2021).

Official code: the OpenReview supplementary linked from
ArchipLab-LinfengZhang/Object-Detection-Knowledge-Distillation-ICLR2021 (mmdet
``single_stage.py`` / ``two_stage.py``; read in public copies of those files and in MMRazor's
port ``mmrazor/models/losses/fbkd_loss.py``). Written from the math, restricted to the valid
region (docs/method.md, "FKD").

Per matched FPN level, teacher T (B, C, H, W), student S resized to T's size, valid cells V,
temperature τ, student ratio r (1 in the official code):

* attentions of a map F: ``A_s(F) = n_valid · softmax_V(mean_c |F| / τ)`` (B, H, W) and
  ``A_c(F) = C · softmax_c(mean_V |F| / τ)`` (B, C) — the code's ``H·W·softmax`` on V;
* masks, teacher and student averaged and detached:
  ``M_s = (A_s(T) + r·A_s(S)) / (1 + r)``, ``M_c = (A_c(T) + r·A_c(S)) / (1 + r)``
  (A(S) on the student's own channels when C_s = C_t, else on f(S), below; ours);
* attention-masked feature loss with f = 1×1 adaptation conv (always present, C_s → C_t):
  ``L_feat = (Σ_{B,C,V} M_s · M_c · (T − f(S))²)^{1/2}`` (``M_c`` only with ``channel_mask``;
  the official two-stage code leaves it out);
* attention transfer, L2 norms (``torch.dist``), not squared:
  ``L_chan = ‖ mean_V T − W_c · mean_V S ‖₂`` over (B, C) with W_c a linear C_s → C_t;
  ``L_spat = ‖ mean_c T − conv3×3(mean_c S) ‖₂`` over (B, V), conv 1 → 1 channel;
* non-local distillation with a relation block R (below) on each side, P a 1×1 conv:
  ``L_nl = ‖ R_T(T) − P(R_S(S)) ‖₂`` over (B, C, V);
* ``L = w_feat·L_feat + w_chan·L_chan + w_spat·L_spat + w_nl·L_nl``, summed over levels.

Relation block (Wang et al., "Non-local Neural Networks", CVPR 2018, dot-product form, as in
FKD): ``θ, φ, g`` 1×1 convs to ``C_i`` channels, φ and g max-pooled by p;
``y = (θᵀφ / N) g``, N pooled positions; ``R(x) = x + BN(W y)`` with BN's weight and bias 0 at
init. FKD's per-level sizes: the first matched level ``C_i = C/4, p = 8``, the second
``C/4, 4``, the rest ``C/2, 2``. Both maps enter with the padding outside V zeroed (ours).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfmsd_cli.distill.losses.common import (
    LevelwiseLoss,
    channel_attention,
    raw_statistics,
    resize_to,
    spatial_attention,
    zero_loss,
)

# Defaults per student family (weights are inside the loss, so a method's outer weight is 1).
# one_stage: official single_stage.py (RetinaNet): τ = 0.1, weights 7e-5·6, 4e-3·6, 4e-3·6,
# 7e-5·6, both masks in L_feat. two_stage: official two_stage.py (Faster R-CNN) and MMRazor's
# FBKD port: τ = 0.5, 7e-5, 4e-3, 4e-3, 7e-5, spatial mask only.
FKD_DEFAULTS: dict[str, dict[str, float | bool]] = {
    "one_stage": {
        "temperature": 0.1,
        "feat_weight": 4.2e-4,
        "channel_weight": 2.4e-2,
        "spatial_weight": 2.4e-2,
        "nonlocal_weight": 4.2e-4,
        "channel_mask": True,
    },
    "two_stage": {
        "temperature": 0.5,
        "feat_weight": 7e-5,
        "channel_weight": 4e-3,
        "spatial_weight": 4e-3,
        "nonlocal_weight": 7e-5,
        "channel_mask": False,
    },
}


def l2_norm(x: Tensor) -> Tensor:
    """``‖x‖₂`` over every element (``torch.dist``); its gradient at x = 0 is 0, not NaN."""
    return torch.linalg.vector_norm(x.float().flatten())


def fkd_masks(
    teacher: Tensor, student: Tensor, valid: Tensor, tau: float, ratio: float = 1.0
) -> tuple[Tensor, Tensor]:
    """FKD's detached masks ``(M_s (B, H, W), M_c (B, C))`` from teacher and student maps."""
    with torch.no_grad():
        ts, tc = raw_statistics(teacher, valid)
        ss, sc = raw_statistics(student, valid)
        m_s = (spatial_attention(ts, valid, tau) + ratio * spatial_attention(ss, valid, tau)) / (
            1.0 + ratio
        )
        m_c = (channel_attention(tc, tau) + ratio * channel_attention(sc, tau)) / (1.0 + ratio)
    return m_s, m_c


def valid_mean(x: Tensor, valid: Tensor) -> Tensor:
    """Mean of (B, C, H, W) over the valid cells of each image -> (B, C); signed (not |x|)."""
    v = valid[:, None].to(x.dtype)
    return (x * v).sum(dim=(2, 3)) / v.sum(dim=(2, 3)).clamp_min(1.0)


class RelationBlock(nn.Module):
    """Non-local block, dot-product form (Wang et al. 2018; FKD's relation module)."""

    def __init__(self, channels: int, inter_channels: int, pool: int) -> None:
        super().__init__()
        self.pool = pool
        self.theta = nn.Conv2d(channels, inter_channels, kernel_size=1)
        self.phi = nn.Conv2d(channels, inter_channels, kernel_size=1)
        self.g = nn.Conv2d(channels, inter_channels, kernel_size=1)
        self.w = nn.Conv2d(inter_channels, channels, kernel_size=1)
        self.bn = nn.BatchNorm2d(channels)
        nn.init.zeros_(self.bn.weight)  # R(x) = x at init, as FKD (and the non-local paper)
        nn.init.zeros_(self.bn.bias)

    def _pooled(self, x: Tensor) -> Tensor:
        # a map smaller than the pool window is pooled by its own size (ours: small demo maps)
        k = max(1, min(self.pool, x.shape[-2], x.shape[-1]))
        return F.max_pool2d(x, kernel_size=k, stride=k, ceil_mode=True).flatten(2)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        theta = self.theta(x).flatten(2)  # (B, Ci, HW)
        phi = self._pooled(self.phi(x))  # (B, Ci, N)
        g = self._pooled(self.g(x))  # (B, Ci, N)
        f = torch.einsum("bcq,bcn->bqn", theta, phi) / phi.shape[-1]
        y = torch.einsum("bqn,bcn->bcq", f, g).reshape(b, -1, h, w)
        z = self.w(y)
        if self.training and b * h * w == 1:
            # one value per channel (batch 1 on a 1×1 level, e.g. P7 of a small image) has no
            # batch variance: normalise with the running statistics instead (ours)
            bn = self.bn
            z = F.batch_norm(
                z, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps
            )
            return x + z
        return x + self.bn(z)


def relation_size(index: int, channels: int) -> tuple[int, int]:
    """FKD's (inter channels, pool) for the ``index``-th matched level (0 = finest)."""
    if index == 0:
        return max(1, channels // 4), 8
    if index == 1:
        return max(1, channels // 4), 4
    return max(1, channels // 2), 2


class FKDLevel(nn.Module):
    """One FPN level of FKD (see the module docstring); returns the weighted sum of 4 terms."""

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        index: int = 0,
        temperature: float = 0.1,
        feat_weight: float = 4.2e-4,
        channel_weight: float = 2.4e-2,
        spatial_weight: float = 2.4e-2,
        nonlocal_weight: float = 4.2e-4,
        channel_mask: bool = True,
        student_ratio: float = 1.0,
    ) -> None:
        super().__init__()
        self.temperature, self.ratio, self.channel_mask = temperature, student_ratio, channel_mask
        self.weights = (feat_weight, channel_weight, spatial_weight, nonlocal_weight)
        self.same_channels = student_channels == teacher_channels
        self.adapt = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
        self.channel_adapt = nn.Linear(student_channels, teacher_channels)
        self.spatial_adapt = nn.Conv2d(1, 1, kernel_size=3, padding=1)
        ci_s, p = relation_size(index, student_channels)
        ci_t, _ = relation_size(index, teacher_channels)
        self.relation_s = RelationBlock(student_channels, ci_s, p)
        self.relation_t = RelationBlock(teacher_channels, ci_t, p)
        self.relation_adapt = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)

    def terms(self, student: Tensor, teacher: Tensor, valid: Tensor) -> dict[str, Tensor]:
        """The four unweighted terms ``feat``, ``channel``, ``spatial``, ``nonlocal``."""
        v = valid[:, None].float()
        s = resize_to(student.float(), teacher.shape[-2:]) * v  # padding zeroed (ours)
        t = teacher.float() * v
        fs = self.adapt(s)
        own = s if self.same_channels else fs  # the student's attention needs C_t channels
        m_s, m_c = fkd_masks(t, own, valid, self.temperature, self.ratio)
        weight = m_s[:, None] * (m_c[:, :, None, None] if self.channel_mask else 1.0) * v
        feat = l2_norm((t - fs) * weight.sqrt())
        channel = l2_norm(valid_mean(t, valid) - self.channel_adapt(valid_mean(s, valid)))
        spatial = l2_norm((t.mean(dim=1, keepdim=True) - self.spatial_adapt(s.mean(1, True))) * v)
        rel = self.relation_t(t) - self.relation_adapt(self.relation_s(s))
        return {"feat": feat, "channel": channel, "spatial": spatial, "nonlocal": l2_norm(rel * v)}

    def forward(self, student: Tensor, teacher: Tensor, valid: Tensor) -> Tensor:
        terms = self.terms(student, teacher, valid)
        w_feat, w_chan, w_spat, w_nl = self.weights
        return (
            w_feat * terms["feat"]
            + w_chan * terms["channel"]
            + w_spat * terms["spatial"]
            + w_nl * terms["nonlocal"]
        )


class FKDLoss(LevelwiseLoss):
    """Σ over matched levels of :class:`FKDLevel`; the four weights are inside (FKD's code sets
    them per term, so a method's outer weight is 1). Needs only the FPN features."""

    def __init__(self, levels, student_channels, teacher_channels, **level_kwargs) -> None:
        strides = [int(s) for s in levels]
        rank = {s: i for i, s in enumerate(sorted(strides))}  # 0 = finest matched level
        pending = iter(strides)  # LevelwiseLoss builds one level per stride, in this order

        def make_level(cs: int, ct: int) -> FKDLevel:
            return FKDLevel(cs, ct, index=rank[next(pending)], **level_kwargs)

        super().__init__(levels, student_channels, teacher_channels, make_level)

    def forward(self, student, teacher, valid, stats=None, targets=None) -> Tensor:
        total = zero_loss(student)
        for _s, mod, fs, ft, v in self._levels(student, teacher, valid):
            total = total + mod(fs, ft, v)
        return total

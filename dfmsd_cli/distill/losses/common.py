"""Shared pieces of the feature-distillation losses: level matching, channel/spatial alignment,
teacher attention from raw statistics, attention-guided mask selection, and the masked
generation loss.

Conventions (every loss in :mod:`dfmsd_cli.distill.losses`):

* features are ``{stride: (B, C, H, W)}``; ``valid`` is ``{stride: (B, H, W) bool}``, True on the
  cells that cover the image (not the zero padding of the batch or of the store's canvas);
* a student level with no teacher level of the same stride is skipped (heterogeneous pairs, e.g.
  a RetinaNet student P3–P7 against a Cascade Mask R-CNN teacher P2–P6 matches P3–P6);
* the student map goes through a 1×1 align conv when channel counts differ (MGD, FGD), and is
  resized bilinearly to the teacher's size when spatial sizes differ (PKD, ``resize_stu``);
* losses are computed in float32 whatever the autocast dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfmsd_cli.store.statistics import raw_statistics  # noqa: F401  the one definition

MASK_RULES: tuple[str, ...] = ("sample", "top", "random")


def match_levels(student_strides: list[int] | tuple[int, ...], teacher_strides) -> list[int]:
    """Strides present on both sides, in the student's order (the levels that are distilled)."""
    teacher = {int(s) for s in teacher_strides}
    return [int(s) for s in student_strides if int(s) in teacher]


def align_conv(student_channels: int, teacher_channels: int) -> nn.Module:
    """1×1 conv from student to teacher channels when they differ, identity otherwise (MGD/FGD)."""
    if student_channels == teacher_channels:
        return nn.Identity()
    return nn.Conv2d(student_channels, teacher_channels, kernel_size=1, stride=1, padding=0)


def resize_to(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Bilinear resize of a (B, C, H, W) map to ``size`` when it differs (PKD's ``resize_stu``)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def masked_softmax(logits: Tensor, valid: Tensor) -> Tensor:
    """Softmax over dim 1 of (B, N) restricted to ``valid`` (exact zeros elsewhere)."""
    logits = logits.masked_fill(~valid, float("-inf"))
    out = torch.softmax(logits, dim=1)
    return torch.nan_to_num(out, nan=0.0)  # an image with no valid cell gives all zeros


def spatial_attention(spatial_stat: Tensor, valid: Tensor, tau: float) -> Tensor:
    """A_s = n·softmax(S / τ) over the valid cells of each image (0 outside), (B, H, W).

    ``S = mean_c |T|``; ``n`` is the number of valid cells, so A_s averages 1 over the image
    (FGD's ``H·W·softmax`` restricted to the valid region; FGD, Yang et al. CVPR 2022, Eq. 2).
    """
    b, h, w = spatial_stat.shape
    flat_valid = valid.reshape(b, h * w)
    p = masked_softmax(spatial_stat.float().reshape(b, h * w) / tau, flat_valid)
    n = flat_valid.sum(dim=1, keepdim=True).float()
    return (p * n).reshape(b, h, w)


def channel_attention(channel_stat: Tensor, tau: float) -> Tensor:
    """A_c = C·softmax(mean_hw |T| / τ) over channels, (B, C) (FGD Eq. 3, valid-region mean)."""
    c = channel_stat.shape[1]
    return c * torch.softmax(channel_stat.float() / tau, dim=1)


def select_fraction(
    scores: Tensor,
    valid: Tensor,
    fraction: float,
    rule: str = "sample",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Choose ``round(fraction · n_valid)`` valid entries per row of (B, N) ``scores``.

    Rules (our documented formulation of DMKD's attention-guided masking, docs/method.md):

    * ``sample`` – sample without replacement with probability ∝ score (Gumbel-top-k:
      keys = log s + Gumbel(0, 1), keep the k largest; Efraimidis & Spirakis 2006);
    * ``top`` – the k highest-scoring entries (ties broken by index);
    * ``random`` – k entries uniformly at random (scores ignored).

    Returns a bool (B, N) mask, True on the chosen entries, always False outside ``valid``.
    """
    if rule not in MASK_RULES:
        raise ValueError(f"unknown mask rule {rule!r}: use one of {', '.join(MASK_RULES)}")
    b, n = scores.shape
    k = torch.round(valid.sum(dim=1).float() * fraction).long()  # (B,)
    if rule == "top":
        keys = scores.float().clone()
    else:
        u = torch.rand((b, n), generator=generator, device=scores.device)
        gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))
        keys = gumbel if rule == "random" else torch.log(scores.float().clamp_min(1e-30)) + gumbel
    keys = keys.masked_fill(~valid, float("-inf"))
    order = torch.sort(keys, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=scores.device).expand(b, n))
    return (rank < k[:, None]) & valid


def generation_loss(
    generated: Tensor, teacher: Tensor, valid: Tensor, reduction: str = "batch"
) -> Tensor:
    """Squared error between a reconstruction and the teacher over the valid positions.

    ``reduction="batch"``: ``Σ_{B,C,H,W∈V} (G − T)² / B`` — MGD's loss (Eq. 4 of Yang et al.
    ECCV 2022: sum reduction divided by the batch), DFMSD's L_stage (Eq. 7 sums over C, H, W).
    ``reduction="mean"``: ``Σ_{B,C,H,W∈V} (G − T)² / (C · |V|)`` with |V| the valid cells of
    the batch — DFMSD's L_ME (Eq. 8: "the total number of elements in the feature map at layer
    l used for normalization"), a mean per level.
    """
    diff = (generated.float() - teacher.float()) ** 2
    total = (diff * valid[:, None].to(diff.dtype)).sum()
    if reduction == "batch":
        return total / generated.shape[0]
    if reduction == "mean":
        elements = valid.sum().to(diff.dtype) * generated.shape[1]
        return total / elements.clamp_min(1.0)
    raise ValueError(f"unknown reduction {reduction!r}: use 'batch' or 'mean'")


class GenerationBlock(nn.Sequential):
    """MGD's generation block: 3×3 conv → ReLU → 3×3 conv, teacher channels in and out."""

    def __init__(self, channels: int) -> None:
        super().__init__(
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
        )


class SEBlock(nn.Module):
    """Squeeze-and-excitation (Hu et al. CVPR 2018): x · σ(W2 ReLU(W1 avgpool(x))).

    The channel-adaptive module of AMD/DMKD's channel branch; the pool runs over valid cells.
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(4, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1)

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        if valid is None:
            pooled = x.mean(dim=(2, 3), keepdim=True)
        else:
            v = valid[:, None].to(x.dtype)
            count = v.sum(dim=(2, 3), keepdim=True).clamp_min(1.0)
            pooled = (x * v).sum(dim=(2, 3), keepdim=True) / count
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(pooled))))


class LevelwiseLoss(nn.Module):
    """Sum of one per-level loss module over the strides shared by student and teacher.

    ``levels`` are the matched strides (:func:`match_levels`); ``make_level(cs, ct)`` builds the
    per-level module. Subclasses call :meth:`_levels` and add their per-level terms.
    """

    def __init__(self, levels, student_channels, teacher_channels, make_level) -> None:
        super().__init__()
        self.levels = [int(s) for s in levels]
        if not self.levels:
            raise ValueError("no FPN level is shared by student and teacher")
        cs = _per_level(student_channels, self.levels)
        ct = _per_level(teacher_channels, self.levels)
        self.per_level = nn.ModuleDict({str(s): make_level(cs[s], ct[s]) for s in self.levels})

    def _levels(self, student: dict, teacher: dict, valid: dict):
        for s in self.levels:
            if s in student and s in teacher:
                yield s, self.per_level[str(s)], student[s], teacher[s], valid[s]


def _per_level(channels, levels: list[int]) -> dict[int, int]:
    if isinstance(channels, int):
        return {s: channels for s in levels}
    return {s: int(channels[s]) for s in levels}


def zero_loss(ref: dict[int, Tensor]) -> Tensor:
    """A differentiable float32 zero on the device of the features (no shared level)."""
    t = next(iter(ref.values()))
    return t.new_zeros((), dtype=torch.float32) + 0.0 * t.float().sum()

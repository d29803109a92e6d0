"""The raw attention statistics of a teacher feature map, as the store keeps them.

One function for both sides: ``precompute`` writes them per image and level (``att_s``,
``att_c``), and the losses (DFM, FGD) and ``--online`` compute the same numbers from features
in the batch, so a stored and a recomputed statistic are equal to the bit.
"""

from __future__ import annotations

import torch
from torch import Tensor


def raw_statistics(feature: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Raw attention statistics of a (B, C, H, W) feature (FGD, yzd-v/FGD ``fgd.py``, before
    the softmax with temperature):

    spatial: ``S = mean_c |F|`` -> (B, H, W), zero outside ``valid``;
    channel: ``C = mean over the valid positions of |F|`` -> (B, C).

    ``valid`` is (B, H, W) bool (None: every position). Differentiable (FGD's student attention
    needs the gradient); detach for teacher-side use. Computed in float32.
    """
    return _of_abs(feature.abs().float(), valid)


def teacher_statistics(feature: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``raw_statistics(feature)`` of a teacher batch whose every position is valid (precompute
    batches images of one padded shape), plus each image's peak ``max |F|`` (B,), all from one
    ``|F|`` pass on the feature's device. The peak is NaN or inf when the image holds one
    (``amax`` propagates both): the store's float16 range check reads it."""
    a = feature.detach().abs().float()
    spatial, channel = _of_abs(a, None)
    return spatial, channel, a.flatten(1).amax(dim=1)


def _of_abs(a: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    """The statistics of ``a = |F|`` (float32)."""
    if valid is None:
        valid = torch.ones(a.shape[0], *a.shape[-2:], dtype=torch.bool, device=a.device)
    v = valid.to(a.dtype)
    spatial = a.mean(dim=1) * v
    count = v.flatten(1).sum(dim=1).clamp_min(1.0)
    channel = (a * v[:, None]).flatten(2).sum(dim=2) / count[:, None]
    return spatial, channel

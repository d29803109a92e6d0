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
    a = feature.abs().float()
    if valid is None:
        valid = torch.ones(a.shape[0], *a.shape[-2:], dtype=torch.bool, device=a.device)
    v = valid.to(a.dtype)
    spatial = a.mean(dim=1) * v
    count = v.flatten(1).sum(dim=1).clamp_min(1.0)
    channel = (a * v[:, None]).flatten(2).sum(dim=2) / count[:, None]
    return spatial, channel

"""Window partitions of an FPN level for SAMKD's spatial pyramid (docs/method.md, SAMKD).

A ``grid`` g splits each image's *valid extent* (the bounding box of its valid cells, so a
letterboxed image's padding never forms windows of its own) into g×g windows. Along an axis of
n cells, window i covers the cells ``[floor(i·n/g), floor((i+1)·n/g))`` — every cell belongs to
exactly one window and window sizes differ by at most one cell when g does not divide n (the
larger windows come last); when n < g some windows are empty (no cell, no mask, no weight).
Our choice: the paper names a "spatial pyramid" without the partition rule; this one is
exhaustive, non-overlapping and needs no resizing.

The windowed attention and masks reuse the DFM building blocks of :mod:`.common` unchanged,
applied to B·g² rows whose valid region is one window each.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dfmsd_cli.distill.losses.common import channel_attention, select_fraction, spatial_attention


def _axis_windows(valid_any: Tensor, grid: int) -> Tensor:
    """Window index along one axis, (B, n) long; cell r' of the extent goes to
    ``floor(((r'+1)·g − 1) / n_ext)`` (the i with floor(i·n/g) ≤ r' < floor((i+1)·n/g))."""
    n = valid_any.shape[1]
    idx = torch.arange(n, device=valid_any.device)
    first = torch.where(valid_any, idx, n).min(dim=1).values
    last = torch.where(valid_any, idx, -1).max(dim=1).values
    extent = (last - first + 1).clamp_min(1)
    rel = idx[None, :] - first[:, None]
    win = torch.div((rel + 1) * grid - 1, extent[:, None], rounding_mode="floor")
    return win.clamp(0, grid - 1)


def window_ids(valid: Tensor, grid: int) -> Tensor:
    """(B, H, W) long: window index ``row·g + col`` of every valid cell, −1 on padding."""
    if grid < 1:
        raise ValueError(f"grid must be a positive integer, got {grid}")
    rows = _axis_windows(valid.any(dim=2), grid)  # (B, H)
    cols = _axis_windows(valid.any(dim=1), grid)  # (B, W)
    ids = rows[:, :, None] * grid + cols[:, None, :]
    return torch.where(valid, ids, torch.full_like(ids, -1))


def window_masks(valid: Tensor, grid: int) -> Tensor:
    """(B, g², H, W) bool: window k's valid cells (one True per valid cell across k)."""
    ids = window_ids(valid, grid)
    k = torch.arange(grid * grid, device=valid.device)
    return ids[:, None] == k[None, :, None, None]


def windowed_spatial_attention(
    spatial_stat: Tensor, valid: Tensor, grid: int, tau: float = 0.5
) -> Tensor:
    """A_s^g = n_w · softmax_{(h,w) ∈ window}(a_s / τ) per window, (B, H, W), 0 off ``valid``.

    ``a_s = mean_c |T|`` (B, H, W); n_w is the window's number of valid cells, so a window's
    weights sum to n_w (FGD's ``H·W·softmax`` inside each window; grid 1 is
    :func:`.common.spatial_attention`).
    """
    b, h, w = spatial_stat.shape
    wv = window_masks(valid, grid)  # (B, G, H, W)
    g2 = wv.shape[1]
    stat = spatial_stat[:, None].expand(b, g2, h, w).reshape(b * g2, h, w)
    att = spatial_attention(stat, wv.reshape(b * g2, h, w), tau)
    return att.reshape(b, g2, h, w).sum(dim=1)


def windowed_spatial_mask(
    attention: Tensor,
    valid: Tensor,
    grid: int,
    fraction: float,
    rule: str = "sample",
    generator: torch.Generator | None = None,
) -> Tensor:
    """(B, H, W) bool: ``round(fraction · n_w)`` valid cells chosen by ``rule`` in every window.

    :func:`.common.select_fraction` on one row per (image, window), so each window keeps an
    exact count and padding is never chosen.
    """
    b, h, w = attention.shape
    wv = window_masks(valid, grid)
    g2 = wv.shape[1]
    scores = attention[:, None].expand(b, g2, h, w).reshape(b * g2, h * w)
    m = select_fraction(scores, wv.reshape(b * g2, h * w), fraction, rule, generator)
    return m.reshape(b, g2, h, w).any(dim=1)


def windowed_channel_stat(feature: Tensor, valid: Tensor, grid: int) -> Tensor:
    """(B, g², C): ``mean_{(h,w) ∈ window} |T|`` per window (0 for an empty window)."""
    wv = window_masks(valid, grid).to(feature.dtype).flatten(2)  # (B, G, N)
    a = feature.abs().flatten(2)  # (B, C, N)
    count = wv.sum(dim=2).clamp_min(1.0)
    return torch.einsum("bgn,bcn->bgc", wv, a) / count[:, :, None]


def windowed_channel_mask(
    channel_stat: Tensor,
    valid: Tensor,
    grid: int,
    fraction: float,
    tau: float = 0.5,
    rule: str = "sample",
    generator: torch.Generator | None = None,
) -> Tensor:
    """(B, C, H, W) bool: per window, ``round(fraction · C)`` channels chosen by ``rule`` from
    ``A_c^w = C·softmax_c(a_c^w / τ)`` and applied to that window's valid cells only.

    ``channel_stat`` is (B, g², C) (:func:`windowed_channel_stat`) or (B, C) for grid 1.
    """
    b = valid.shape[0]
    stat = channel_stat.reshape(b, grid * grid, -1).float()
    c = stat.shape[2]
    a_c = channel_attention(stat.reshape(b * grid * grid, c), tau)
    every = torch.ones_like(a_c, dtype=torch.bool)
    m = select_fraction(a_c, every, fraction, rule, generator).reshape(b, grid * grid, c)
    wv = window_masks(valid, grid).to(torch.float32)
    return torch.einsum("bghw,bgc->bchw", wv, m.to(torch.float32)) > 0.5

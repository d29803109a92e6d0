"""Overlay math: FPN-level maps onto the resized image, and the shared PCA colour basis.

A level map at stride ``s`` for an image resized to ``(h, w)`` and padded to ``(H, W)`` has
``(ceil(H/s), ceil(W/s))`` cells (the store's ``valid`` size); cell ``(i, j)`` covers pixels
``[i·s, (i+1)·s) × [j·s, (j+1)·s)`` of the padded input. To draw it over the image:

* the map is upsampled by pixel repetition (each cell becomes an ``s × s`` block — the exact
  receptive cell, no smoothing that would leak padding values into the image);
* the result is cropped to the resized extent ``(h, w)``: the padding is never drawn;
* colour limits are taken over the cells that overlap the image, ``image_cells(size, s)`` =
  ``(ceil(h/s), ceil(w/s))``, so pure-padding cells never set the scale;
* a map stored transposed (the store's landscape canvas holds portrait images as ``(W, H)``)
  is turned back first with ``transposed=True``; a map whose shape cannot cover the extent
  raises instead of being drawn misaligned.

PCA RGB (``pca_basis``/``pca_rgb``): the first three principal components of the reference
(teacher) feature's channel vectors over its image cells; every panel (teacher and students) is
projected onto that one basis and scaled by the reference projections' 1st–99th percentiles
(our choice), so equal colours mean equal features across panels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def image_cells(size: tuple[int, int], stride: int) -> tuple[int, int]:
    """(rows, cols) of the cells at ``stride`` that overlap the resized image ``size = (h, w)``."""
    h, w = size
    return math.ceil(h / stride), math.ceil(w / stride)


def orient(level_map: np.ndarray, transposed: bool = False) -> np.ndarray:
    """The map in image orientation: ``(..., rows, cols)``; swaps the last two axes if stored
    transposed."""
    a = np.asarray(level_map)
    return np.swapaxes(a, -1, -2) if transposed else a


def upsample_to_extent(
    level_map: np.ndarray, stride: int, size: tuple[int, int], transposed: bool = False
) -> np.ndarray:
    """A (rows, cols[, k]) level map as an (h, w[, k]) image-aligned array (see module doc).

    Raises ``ValueError`` when the map has fewer cells than the image needs at this stride.
    """
    a = orient(level_map, transposed) if np.ndim(level_map) == 2 else np.asarray(level_map)
    h, w = size
    need = image_cells(size, stride)
    if a.shape[0] < need[0] or a.shape[1] < need[1]:
        raise ValueError(
            f"a {a.shape[0]}x{a.shape[1]} map at stride {stride} cannot cover a {h}x{w} image "
            f"(needs {need[0]}x{need[1]} cells): is it transposed?"
        )
    a = a[: need[0], : need[1]]
    up = np.repeat(np.repeat(a, stride, axis=0), stride, axis=1)
    return up[:h, :w]


def display_limits(
    level_map: np.ndarray, stride: int, size: tuple[int, int]
) -> tuple[float, float]:
    """(min, max) of the map over the cells that overlap the image (padding cells excluded);
    a constant map gets a range around its value (one cell with A_s = 1 -> (0.5, 1.5))."""
    r, c = image_cells(size, stride)
    inside = np.asarray(level_map)[:r, :c]
    lo, hi = float(inside.min()), float(inside.max())
    if hi > lo:
        return lo, hi
    pad = 0.5 * max(abs(lo), 1e-6)
    return lo - pad, hi + pad


def level_vectors(feature: np.ndarray, stride: int, size: tuple[int, int]) -> np.ndarray:
    """(N, C) channel vectors of a (C, rows, cols) feature at the cells overlapping the image."""
    r, c = image_cells(size, stride)
    f = np.asarray(feature, dtype=np.float64)[:, :r, :c]
    return f.reshape(f.shape[0], -1).T


@dataclass(frozen=True)
class PCABasis:
    """Mean (C,), components (3, C) and per-component display limits lo/hi (3,)."""

    mean: np.ndarray
    components: np.ndarray
    lo: np.ndarray
    hi: np.ndarray


def pca_basis(vectors: np.ndarray, k: int = 3) -> PCABasis:
    """Top-``k`` principal directions of (N, C) ``vectors`` (SVD of the centred data); signs
    fixed so each component's largest-magnitude loading is positive (deterministic colours).
    Fewer than ``k`` directions with variance are padded with zero components."""
    x = np.asarray(vectors, dtype=np.float64)
    mean = x.mean(axis=0)
    _, sv, vt = np.linalg.svd(x - mean, full_matrices=False)
    comps = np.zeros((k, x.shape[1]))
    # directions without variance are arbitrary: left as zero components (constant colour)
    n = min(k, int((sv > 1e-12 * max(float(sv[0]) if sv.size else 0.0, 1e-300)).sum()))
    comps[:n] = vt[:n]
    for i in range(n):
        if comps[i, np.argmax(np.abs(comps[i]))] < 0:
            comps[i] = -comps[i]
    proj = (x - mean) @ comps.T
    lo, hi = np.percentile(proj, 1, axis=0), np.percentile(proj, 99, axis=0)
    hi = np.where(hi > lo, hi, lo + 1e-12)
    return PCABasis(mean, comps, lo, hi)


def pca_rgb(feature: np.ndarray, basis: PCABasis) -> np.ndarray:
    """(rows, cols, 3) RGB in [0, 1] of a (C, rows, cols) feature projected on ``basis``."""
    f = np.asarray(feature, dtype=np.float64)
    c, r, w = f.shape
    proj = (f.reshape(c, -1).T - basis.mean) @ basis.components.T
    rgb = (proj - basis.lo) / (basis.hi - basis.lo)
    return np.clip(rgb, 0.0, 1.0).reshape(r, w, 3)

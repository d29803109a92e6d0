"""``dfmsd viz store``: what the teacher attends to on one stored image.

Top row: the input the teacher saw (with its stored top-K boxes and scores), then per stored
level the spatial attention ``A_s = n·softmax(mean_c|T| / τ)`` over the image's valid cells
(:func:`dfmsd_cli.distill.losses.common.spatial_attention`, the function the losses use),
upsampled to the resized extent (:mod:`dfmsd_cli.viz.overlay`). Bottom row: the original
image (for the ``me`` view with the crop box drawn and the enhancement named) and per level the
channel attention ``A_c = C·softmax(a_c / τ)`` as a bar strip.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dfmsd_cli.distill.losses.common import channel_attention, spatial_attention
from dfmsd_cli.viz.common import category_names, clean, draw_boxes, image_hwc, new_figure
from dfmsd_cli.viz.overlay import display_limits, upsample_to_extent

HEAT = "inferno"


def attention_maps(
    record: dict, tau: float, levels=None
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """``{stride: (A_s (rows, cols), A_c (C,))}`` of a record, by the losses' own functions."""
    out = {}
    for s in levels or record["att_spatial"]:
        sp = record["att_spatial"][s].float()[None]
        valid = torch.ones_like(sp, dtype=torch.bool)  # the stored map is the valid extent
        a_s = spatial_attention(sp, valid, tau)[0].numpy()
        a_c = channel_attention(record["att_channel"][s].float()[None], tau)[0].numpy()
        out[int(s)] = (a_s, a_c)
    return out


def canvas(image: Any, size: tuple[int, int]) -> np.ndarray:
    """The image as (h, w, 3) uint8, or a grey canvas of ``size`` when no pixels are given."""
    if image is None:
        return np.full((*size, 3), 210, dtype=np.uint8)
    return image_hwc(image)


def heat_overlay(ax: Any, base: np.ndarray, level_map: np.ndarray, stride: int, size, cmap=HEAT):
    """Grey image with ``level_map`` (rows, cols) drawn over its resized extent."""
    grey = base.mean(axis=2)
    ax.imshow(grey, cmap="gray", vmin=0, vmax=255)
    lo, hi = display_limits(level_map, stride, size)
    up = upsample_to_extent(level_map, stride, size)
    im = ax.imshow(up, cmap=cmap, alpha=0.6, vmin=lo, vmax=hi, interpolation="nearest")
    clean(ax)
    return im


def store_figure(
    record: dict,
    image: Any = None,
    original: Any = None,
    *,
    tau: float = 0.5,
    categories: list[dict] | None = None,
    levels=None,
    topk: int = 10,
    title: str = "",
    caption: str = "",
):
    """The figure of one record (see the module doc); returns a matplotlib Figure."""
    size = tuple(record["size"])
    maps = attention_maps(record, tau, levels)
    fig, axes = new_figure(1 + len(maps), 2)
    base = canvas(image, size)
    ax = axes[0, 0]
    ax.imshow(base)
    n = min(topk, len(record["scores"]))
    draw_boxes(
        ax,
        record["boxes"][:n],
        category_names(categories, record["labels"][:n]),
        scores=record["scores"][:n],
    )
    clean(ax)
    ax.set_title(f"{record['view']} input, top-{n} boxes", fontsize=8)
    for j, (s, (a_s, a_c)) in enumerate(maps.items(), start=1):
        im = heat_overlay(axes[0, j], base, a_s, s, size)
        axes[0, j].set_title(f"A_s stride {s} (τ={tau:g})", fontsize=8)
        fig.colorbar(im, ax=axes[0, j], shrink=0.7)
        ax = axes[1, j]
        ax.bar(np.arange(len(a_c)), a_c, width=1.0, color="tab:orange")
        ax.axhline(1.0, color="k", lw=0.6, ls=":")  # A_c averages 1
        ax.set_xlim(-0.5, len(a_c) - 0.5)
        ax.set_title(f"A_c stride {s} ({len(a_c)} ch.)", fontsize=8)
        ax.tick_params(labelsize=6)
    ax = axes[1, 0]
    if original is not None:
        ax.imshow(image_hwc(original))
        e = record.get("enhance") or {}
        if e.get("kind") == "crop":
            draw_boxes(ax, [e["crop_box"]], ["crop"], color="cyan", linestyle="--")
        ax.set_title("original", fontsize=8)
        clean(ax)
    else:
        ax.axis("off")
    if caption:
        ax.text(0.0, -0.08, caption, transform=ax.transAxes, fontsize=7, va="top", wrap=True)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig

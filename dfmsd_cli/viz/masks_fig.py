"""``dfmsd viz masks``: the masks each method would apply on one image, per level.

The masks are computed by the functions the losses call (never re-implemented here):

* ``dfm`` (dfmsd, dmkd): :func:`dfmsd_cli.distill.losses.dual_masks` for every rule of
  :data:`dfmsd_cli.distill.losses.common.MASK_RULES` (``sample``, ``top``, ``random``), spatial
  M_s and channel M_c with the method's λ_s, λ_c and τ;
* ``mgd``: :func:`dfmsd_cli.distill.losses.mgd.random_spatial_mask` with the method's λ;
* ``fgd``: :func:`dfmsd_cli.distill.losses.fgd.foreground_background_masks` from the
  ground-truth boxes, and the attention weight A_s·A_c at FGD's temperature;
* ``pkd``: no mask (the whole valid region, standardised).

A method is drawn by the *masker* registered for its stage loss (``MethodConfig.stage_loss``);
a later method plugs in with :func:`register_masker`. Each masker returns ``MaskPanel`` rows.
Random rules are drawn with a seeded generator (``--seed``), so a figure is reproducible.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dfmsd_cli.distill.losses.common import MASK_RULES, channel_attention, spatial_attention
from dfmsd_cli.errors import UserError
from dfmsd_cli.viz.common import clean, new_figure
from dfmsd_cli.viz.overlay import upsample_to_extent
from dfmsd_cli.viz.store_fig import canvas, heat_overlay


@dataclass
class MaskPanel:
    """One mask of one level: ``spatial`` (rows, cols) bool (True = masked) or float weight,
    ``channel`` (C,) bool/float or None."""

    label: str
    spatial: np.ndarray | None
    channel: np.ndarray | None = None
    soft: bool = False  # a weight map (heat), not a binary mask


@dataclass
class LevelInput:
    """What a masker gets for one level of one image (batch of one, as the losses see it)."""

    stride: int
    spatial_stat: torch.Tensor  # (1, rows, cols) mean_c |T|
    channel_stat: torch.Tensor  # (1, C) valid-region mean |T|
    valid: torch.Tensor  # (1, rows, cols) bool
    gt_boxes: torch.Tensor  # (n, 4) xyxy in the view's resized pixels
    generator: torch.Generator


Masker = Callable[[LevelInput, dict[str, Any]], list[MaskPanel]]
MASKERS: dict[str, Masker] = {}


def register_masker(stage_loss: str, fn: Masker) -> None:
    """Draw the masks of methods whose ``stage_loss`` is ``stage_loss`` with ``fn``."""
    MASKERS[stage_loss] = fn


def _dfm(x: LevelInput, kw: dict[str, Any]) -> list[MaskPanel]:
    from dfmsd_cli.distill.losses import dual_masks

    a_s = spatial_attention(x.spatial_stat, x.valid, kw["tau"])[0].numpy()
    a_c = channel_attention(x.channel_stat, kw["tau"])[0].numpy()
    out = [MaskPanel(f"A_s, A_c (τ={kw['tau']:g})", a_s, a_c, soft=True)]
    for rule in MASK_RULES:
        m_s, m_c = dual_masks(
            x.spatial_stat,
            x.channel_stat,
            x.valid,
            kw["lambda_s"],
            kw["lambda_c"],
            kw["tau"],
            rule,
            x.generator,
        )
        out.append(MaskPanel(rule, m_s[0].numpy(), m_c[0].numpy()))
    return out


def _mgd(x: LevelInput, kw: dict[str, Any]) -> list[MaskPanel]:
    from dfmsd_cli.distill.losses.mgd import random_spatial_mask

    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=x.generator))
    with torch.random.fork_rng(devices=[]):  # MGD draws from the global RNG
        torch.manual_seed(seed)
        m = random_spatial_mask(tuple(x.valid.shape), kw.get("lam", 0.65))
    return [MaskPanel(f"random λ={kw.get('lam', 0.65):g}", (m & x.valid)[0].numpy())]


def _fgd(x: LevelInput, kw: dict[str, Any]) -> list[MaskPanel]:
    from dfmsd_cli.distill.losses.fgd import foreground_background_masks

    tau = kw.get("temperature", 0.5)
    boxes = x.gt_boxes.float().reshape(1, -1, 4)
    present = torch.ones(boxes.shape[:2], dtype=torch.bool)
    fg, bg = foreground_background_masks(boxes, present, x.valid, x.stride)
    a_s = spatial_attention(x.spatial_stat, x.valid, tau)[0].numpy()
    a_c = channel_attention(x.channel_stat, tau)[0].numpy()
    return [
        MaskPanel("M_fg (GT boxes)", fg[0].numpy(), soft=True),
        MaskPanel("M_bg", bg[0].numpy(), soft=True),
        MaskPanel(f"A_s, A_c (T={tau:g})", a_s, a_c, soft=True),
    ]


def _pkd(x: LevelInput, kw: dict[str, Any]) -> list[MaskPanel]:
    return [MaskPanel("no mask (all valid cells)", np.zeros(tuple(x.valid.shape[1:]), bool))]


for _name, _fn in (("dfm", _dfm), ("mgd", _mgd), ("fgd", _fgd), ("pkd", _pkd)):
    register_masker(_name, _fn)


def method_masks(
    record: dict,
    method: str,
    student: str = "retina_r50",
    gt_boxes: torch.Tensor | None = None,
    seed: int = 0,
    levels=None,
    overrides: dict[str, Any] | None = None,
) -> dict[int, list[MaskPanel]]:
    """``{stride: [MaskPanel, ...]}`` of ``method`` (defaults for ``student``'s family)."""
    from dfmsd_cli.distill.methods import method_config

    cfg = method_config(method, student, **(overrides or {}))
    if cfg.stage_loss is None:
        raise UserError(f"method '{method}' applies no feature mask: pick a distilling --method")
    if cfg.stage_loss not in MASKERS:
        raise UserError(
            f"no mask drawing for method '{method}' (stage loss '{cfg.stage_loss}'): "
            f"use one of the methods with {', '.join(sorted(MASKERS))} losses"
        )
    g = torch.Generator().manual_seed(seed)
    boxes = gt_boxes if gt_boxes is not None else torch.zeros(0, 4)
    out = {}
    for s in levels or record["att_spatial"]:
        sp = record["att_spatial"][s].float()[None]
        x = LevelInput(
            int(s),
            sp,
            record["att_channel"][s].float()[None],
            torch.ones_like(sp, dtype=torch.bool),
            boxes,
            g,
        )
        out[int(s)] = MASKERS[cfg.stage_loss](x, dict(cfg.loss_kwargs))
    return out


def _mask_overlay(ax: Any, base: np.ndarray, mask: np.ndarray, stride: int, size) -> None:
    """Masked cells in red over the grey image (within the resized extent only)."""
    ax.imshow(base.mean(axis=2), cmap="gray", vmin=0, vmax=255)
    up = upsample_to_extent(mask.astype(np.float32), stride, size)
    rgba = np.zeros((*up.shape, 4), dtype=np.float32)
    rgba[..., 0] = 1.0
    rgba[..., 3] = 0.55 * up
    ax.imshow(rgba, interpolation="nearest")
    clean(ax)


def masks_figure(
    panels: dict[int, list[MaskPanel]], image: Any, size: tuple[int, int], title: str = ""
):
    """Rows = levels; columns = the method's masks, then one channel strip (when any)."""
    base = canvas(image, size)
    n_sp = max(len(v) for v in panels.values())
    has_ch = any(p.channel is not None for v in panels.values() for p in v)
    fig, axes = new_figure(n_sp + int(has_ch), len(panels), panel=(2.4, 2.0))
    for r, (s, row) in enumerate(panels.items()):
        for j, p in enumerate(row):
            ax = axes[r, j]
            if p.soft:
                heat_overlay(ax, base, p.spatial, s, size, cmap="viridis")
                ax.set_title(f"s{s} {p.label}", fontsize=7)
            else:
                _mask_overlay(ax, base, p.spatial, s, size)
                r_, c_ = p.spatial.shape
                ax.set_title(f"s{s} {p.label}: {int(p.spatial.sum())}/{r_ * c_} cells", fontsize=7)
        for j in range(len(row), n_sp):
            axes[r, j].axis("off")
        if has_ch:
            ax = axes[r, -1]
            rows = [(p.label, p.channel) for p in row if p.channel is not None]
            strip = np.stack([np.asarray(c, dtype=np.float32) for _, c in rows])
            strip = strip / np.maximum(strip.max(axis=1, keepdims=True), 1e-12)  # rows in [0, 1]
            ax.imshow(strip, aspect="auto", cmap="Reds", interpolation="nearest")
            ax.set_yticks(range(len(rows)), [lab for lab, _ in rows], fontsize=6)
            ax.set_xlabel("channel", fontsize=6)
            ax.tick_params(labelsize=6)
            hard = [p for p in row if p.channel is not None and not p.soft]
            what = f"masked {int(hard[0].channel.sum())}/{strip.shape[1]}" if hard else "weights"
            ax.set_title(f"s{s} channels {what}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig

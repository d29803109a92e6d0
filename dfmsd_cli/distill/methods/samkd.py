"""``samkd``: L_det + α·L_SFD, one stage with the last teacher (SAMKD, arXiv 2501.07101).

L_SFD (``distill/losses/sfd.py``; our formulation, docs/method.md "SAMKD"): DFM's dual masking
at several granularities — the teacher's attention normalised within each window of a grid
pyramid (default 1×1, 2×2, 4×4 per FPN level), masks drawn per window, DFM's generation
blocks, the per-scale losses averaged (``scale_weights="uniform"``). Defaults (our choices):

* α = 5e-5 (DFM's weight, the loss has DFM's scale), both student families;
* λ_s = 0.65, λ_c = 0.5, τ = 0.5, rule ``sample`` (DFM's), grids 1,2,4, no pooling.

SLD (the masking logit distillation, ``distill/losses/sld.py``) needs the teacher's per-level
classification logits in the store, which this version does not store (issue 14 item 3): the
method runs SFD alone, says so at start and records it in the resolved config (``notes``).

Options: ``--samkd-grids`` (e.g. ``1,2,4``), ``--samkd-pool`` (v1's multi-scale max-pooling of
both maps before reconstruction; every grid must divide the largest), and DFM's ``--lambda-s``,
``--lambda-c``, ``--tau``, ``--mask-rule``.
"""

from __future__ import annotations

from typing import Any

from dfmsd_cli.distill.methods.dmkd import DFM_DEFAULTS, DFM_OPTIONS
from dfmsd_cli.distill.methods.registry import (
    LossTerm,
    MethodConfig,
    MethodOption,
    MethodSpec,
    StoreNeeds,
    register_method,
)
from dfmsd_cli.errors import UserError

SLD_NOTE = (
    "SAMKD runs SFD alone: SLD (masking logit distillation) needs the teachers' classification "
    "logits in the store, which this version of precompute does not store"
)


def parse_grids(value: Any) -> list[int]:
    """``--samkd-grids``: ``1,2,4`` → [1, 2, 4] (distinct positive integers, in order)."""
    text = ",".join(str(v) for v in value) if isinstance(value, list | tuple) else str(value)
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise UserError(
            f"--samkd-grids must be positive window counts per side separated by commas, e.g. "
            f"1,2,4, got '{value}'"
        )
    grids = [int(p) for p in parts]
    if len(set(grids)) != len(grids):
        raise UserError(f"--samkd-grids lists a grid twice ('{value}'): give each once")
    return grids


def build_sfd(cfg, levels, student_channels, teacher_channels):
    from dfmsd_cli.distill.losses import SFDLoss

    kw = dict(cfg.loss_kwargs)
    kw["grids"] = tuple(kw["grids"])
    return SFDLoss(levels, student_channels, teacher_channels, **kw)


def _set_grids(cfg: MethodConfig, value: Any) -> MethodConfig:
    from dataclasses import replace

    return replace(cfg, loss_kwargs={**cfg.loss_kwargs, "grids": parse_grids(value)})


def _check(cfg: MethodConfig, given: dict[str, Any]) -> MethodConfig:
    grids = cfg.loss_kwargs["grids"]
    if cfg.loss_kwargs.get("pool") and any(max(grids) % g for g in grids):
        raise UserError(
            f"--samkd-pool needs every grid to divide the largest, got --samkd-grids "
            f"{','.join(map(str, grids))}: use e.g. 1,2,4 or drop --samkd-pool"
        )
    return cfg


OPTIONS = (
    MethodOption("samkd_grids", str, None, "samkd: SFD's window grids per FPN level, coarse to "
                 "fine (1,2,4: 1×1, 2×2 and 4×4 windows).", "the SFD window grids",
                 apply=_set_grids),
    MethodOption("samkd_pool", bool, None, "samkd: max-pool both maps by max(grid)/g before each "
                 "scale's reconstruction (SAMKD v1; off by default).", "SFD's pooling",
                 target="pool", kwarg=True),
    *DFM_OPTIONS,
)  # fmt: skip

_DEFAULTS = {
    "alpha": 5e-5,
    "loss_kwargs": {**DFM_DEFAULTS, "grids": [1, 2, 4], "pool": False, "scale_weights": "uniform"},
    "notes": (SLD_NOTE,),
}

register_method(
    MethodSpec(
        "samkd",
        "L_det + α·L_SFD (windowed dual masking; SLD needs stored logits), one stage "
        "(SAMKD, arXiv 2501.07101)",
        terms=(LossTerm("loss_kd", "stage", build_sfd, "alpha"),),
        defaults={"one_stage": _DEFAULTS, "two_stage": _DEFAULTS},
        store=StoreNeeds(attention=True),
        stage_loss="sfd",
        options=OPTIONS,
        check=_check,
    )
)

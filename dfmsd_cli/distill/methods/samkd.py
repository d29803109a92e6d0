"""``samkd``: L_det + α·L_SFD, one stage with the last teacher (SAMKD, arXiv 2501.07101).

L_SFD (``distill/losses/sfd.py``; our formulation, docs/method.md "SAMKD"): DFM's dual masking
at several granularities — the teacher's attention normalised within each window of a grid
pyramid (default 1×1, 2×2, 4×4 per FPN level), masks drawn per window, DFM's generation
blocks, the per-scale losses averaged (``scale_weights="uniform"``). Defaults (our choices):

* α = 5e-5 (DFM's weight, the loss has DFM's scale), both student families;
* λ_s = 0.65, λ_c = 0.5, τ = 0.5, rule ``sample`` (DFM's), grids 1,2,4, no pooling.

SLD (the masking logit distillation, ``distill/losses/sld.py``): ``+ w·L_SLD`` (w = 1, τ = 1,
the weight map on SFD's finest grid: our choices) when the last stage's teacher gives its class
logits — its store holds them (``precompute --store-logits``) or, with ``--online``, the live
teacher computes them (``OnlineTeacher(logits=True)``) — and the heads match (same K classes,
A anchors per position, sigmoid/softmax kind); otherwise — an older store, a two-stage teacher,
another head — SFD runs alone. Either way the run says at start which parts run and records it
in the resolved config (``notes``). ``--no-sld`` is the ablation.

Options: ``--no-sld``, ``--sld-weight``, ``--sld-tau``, ``--samkd-grids`` (e.g. ``1,2,4``),
``--samkd-pool`` (v1's multi-scale max-pooling of both maps before reconstruction; every grid
must divide the largest), and DFM's ``--lambda-s``, ``--lambda-c``, ``--tau``, ``--mask-rule``.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    "SAMKD runs SFD alone: SLD (masking logit distillation) needs the teacher's classification "
    "logits in the last stage's store (dfmsd precompute --store-logits) and matching heads"
)
SLD_WEIGHT, SLD_TAU = 1.0, 1.0  # our choices (docs/method.md, SAMKD)
# loss_kwargs that are not SFDLoss kwargs
_SFD_ONLY = ("sld", "sld_active", "sld_weight", "sld_tau", "sld_anchors", "sld_kind")


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

    kw = {k: v for k, v in cfg.loss_kwargs.items() if k not in _SFD_ONLY}
    kw["grids"] = tuple(kw["grids"])
    return SFDLoss(levels, student_channels, teacher_channels, **kw)


def build_sld(cfg, levels, student_channels, teacher_channels):
    from dfmsd_cli.distill.losses.sld import SLDLoss

    kw = cfg.loss_kwargs
    tau = kw.get("sld_tau", SLD_TAU)
    return SLDLoss(levels, kw["sld_anchors"], kw["sld_kind"], tau, grid=max(kw["grids"]))


def call_sld(mod, feats, teacher, targets, logits=None, peers=None):
    """``L_SLD(z_S, z_T, S', T, valid)``: the student's logits of this forward, the stored
    teacher logits, and S' = SFD's aligned student features (``SFDLoss.aligned``)."""
    aligned = peers["stage"].aligned(feats, teacher.features)
    return mod(logits, teacher.logits, aligned, teacher.features, teacher.valid)


def sld_problem(student, have: dict | None, source: str) -> str | None:
    """Why SLD cannot run with ``student`` against a teacher whose logits ``have`` the layout
    ``{anchors, classes, kind}`` (None: it can); ``source`` names the teacher side."""
    if not have:
        return source
    a, k = getattr(student, "logit_anchors", None), student.num_classes
    kind = getattr(student, "logit_kind", None)
    want = (a, k, kind)
    stored = (int(have["anchors"]), int(have["classes"]), have["kind"])
    if want != stored:
        return (
            f"the heads differ (student: {a} anchors × {k} classes, {kind}; teacher: "
            f"{stored[0]} anchors × {stored[1]} classes, {stored[2]})"
        )
    return None


def logit_source(
    student, stores, online: bool, teachers: Sequence[str] = ()
) -> tuple[dict | None, str, str]:
    """Where the last stage's teacher logits come from: ``(layout, source, missing)`` — the
    layout ``{anchors, classes, kind}`` of its store (``--store-logits``) or, with ``--online``,
    of the live teacher ``teachers[-1]`` read from its architecture (None when it has none),
    a name for it, and why there are none. Shared by samkd's SLD and gdetkd's L_cls."""
    if online:
        if not teachers:
            return None, "", "no teacher"
        from dfmsd_cli.distill.online import teacher_logit_layout

        name = teachers[-1]
        have = teacher_logit_layout(name, student.num_classes)
        return (
            have,
            f"the live teacher {name}",
            f"teacher {name} has no dense classification head (two-stage)",
        )
    last = stores[-1] if stores else None
    if last is None:
        return None, "", "no store"
    source = f"store {last.store.path}"
    missing = (
        f"{source} holds no teacher logits: precompute it with --store-logits (dense teachers only)"
    )
    return last.store.meta.logits, source, missing


def with_stores(
    cfg: MethodConfig, student, stores, online: bool, teachers: Sequence[str] = ()
) -> MethodConfig:
    """Turn SLD on when the last stage's teacher gives logits of a matching head — its store
    (``--store-logits``) or, with ``--online``, the live teacher ``teachers[-1]`` — and say at
    start which parts run (``notes``)."""
    from dataclasses import replace

    if not cfg.loss_kwargs.get("sld", True):
        return replace(cfg, notes=("SAMKD runs SFD alone: SLD is off (--no-sld)",))
    have, source, missing = logit_source(student, stores, online, teachers)
    problem = sld_problem(student, have, missing)
    if problem is not None:
        return replace(cfg, notes=(f"{SLD_NOTE}: {problem}",))
    kw = {**cfg.loss_kwargs, "sld_active": True, "sld_anchors": int(have["anchors"]),
          "sld_kind": have["kind"]}  # fmt: skip
    runs = (
        f"SAMKD runs SFD + SLD (w={kw['sld_weight']:g}, τ={kw['sld_tau']:g}; {have['kind']} "
        f"logits, {int(have['anchors'])} anchor(s) × {int(have['classes'])} classes, from "
        f"{source})"
    )
    return replace(cfg, loss_kwargs=kw, notes=(runs,))


def _nonnegative(v: Any) -> str | None:
    return None if float(v) >= 0 else f"must be 0 or more, got {v}"


def _positive(v: Any) -> str | None:
    return None if float(v) > 0 else f"must be positive, got {v}"


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
    MethodOption("sld", bool, True, "samkd: add L_SLD when the last teacher's logits (its "
                 "store's, or live with --online) come from a matching head (--no-sld: SFD "
                 "alone, the ablation).",
                 "SLD", target="sld", kwarg=True),
    MethodOption("sld_weight", float, None, f"samkd: weight w of L_SLD (default {SLD_WEIGHT:g}).",
                 "SLD's weight", check=_nonnegative, target="sld_weight", kwarg=True),
    MethodOption("sld_tau", float, None, f"samkd: SLD's logit temperature τ (default "
                 f"{SLD_TAU:g}).", "SLD's temperature", check=_positive, target="sld_tau",
                 kwarg=True),
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
    "loss_kwargs": {
        **DFM_DEFAULTS,
        "grids": [1, 2, 4],
        "pool": False,
        "scale_weights": "uniform",
        "sld": True,
        "sld_weight": SLD_WEIGHT,
        "sld_tau": SLD_TAU,
    },
    "notes": (SLD_NOTE,),
}

register_method(
    MethodSpec(
        "samkd",
        "L_det + α·L_SFD (windowed dual masking) + L_SLD (with stored teacher logits), one "
        "stage (SAMKD, arXiv 2501.07101)",
        terms=(
            LossTerm("loss_kd", "stage", build_sfd, "alpha"),
            LossTerm(
                "loss_sld",
                "sld",
                build_sld,
                lambda c: c.loss_kwargs.get("sld_weight", 0.0),
                call=call_sld,
                logits=True,
                enabled=lambda c: bool(c.loss_kwargs.get("sld_active")),
            ),
        ),  # fmt: skip
        defaults={"one_stage": _DEFAULTS, "two_stage": _DEFAULTS},
        store=StoreNeeds(attention=True),
        stage_loss="sfd",
        options=OPTIONS,
        check=_check,
        with_stores=with_stores,
    )
)

"""``gdetkd``: L_det + α·L_feat (SGFI) + w_ckd·L_ckd (CKD), one stage with the last teacher
(G-DetKD, Yao et al., ICCV 2021, arXiv 2108.07482; no official code is public).

The general pipeline's heterogeneous form, for every student: regions are the GT boxes and the
teacher's stored top-K detections of the drawn view (1:3 positives:negatives), the teacher's
RoI features are RoIAligned from its stored FPN maps (no teacher runs), the student's from
every one of its levels (:mod:`dfmsd_cli.distill.losses.gdetkd`). The homogeneous two-stage
extras (class-aware localisation KD, head transfer) are not implemented.

Defaults (both families; every one is our choice, unmeasured: the paper's public text gives no
values we could read): α = 1 for L_feat (a per-element MSE), w_ckd = 0.1, γ = 0.07 (MoCo/CRD's
temperature), a queue of 4096 teacher embeddings, near-duplicates at IoU ≥ 0.5 (the positive
threshold: two regions of one object are never pushed apart).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from dfmsd_cli.distill.methods.registry import (
    LossTerm,
    MethodConfig,
    MethodOption,
    MethodSpec,
    StoreNeeds,
    register_method,
)
from dfmsd_cli.errors import UserError

GDETKD_DEFAULTS = {"ckd_weight": 0.1, "ckd_gamma": 0.07, "ckd_queue": 4096, "ckd_iou": 0.5}


def call_regions(mod, feats, teacher, targets):
    """``mod(S, T, det_boxes, det_scores, targets)``: features plus the view's stored
    detections (the regions) and the ground truth."""
    return mod(feats, teacher.features, teacher.boxes, teacher.scores, targets)


def _build_sgfi(cfg: MethodConfig, levels, student_channels, teacher_channels):
    from dfmsd_cli.distill.losses.gdetkd import SGFILoss

    return SGFILoss(student_channels, teacher_channels)


def _build_ckd(cfg: MethodConfig, levels, student_channels, teacher_channels):
    from dfmsd_cli.distill.losses.gdetkd import CKDLoss

    kw = cfg.loss_kwargs
    return CKDLoss(
        student_channels,
        teacher_channels,
        gamma=kw["ckd_gamma"],
        queue_size=kw["ckd_queue"],
        dup_iou=kw["ckd_iou"],
    )


def _positive(v: Any) -> str | None:
    return None if float(v) > 0 else f"must be positive, got {v}"


def _non_negative(v: Any) -> str | None:
    return None if float(v) >= 0 else f"must be ≥ 0, got {v}"


def _queue(v: Any) -> str | None:
    return None if int(v) >= 0 else f"must be 0 (no queue) or a number of embeddings, got {v}"


def _iou(v: Any) -> str | None:
    return None if 0.0 < float(v) <= 1.0 else f"must be in (0, 1], got {v}"


def _switch(name: str):
    return lambda cfg, v: replace(cfg, loss_kwargs={**cfg.loss_kwargs, name: bool(v)})


HETEROGENEOUS = "heterogeneous form: no class-aware localisation KD, no head transfer"


def _check(cfg: MethodConfig, given: dict[str, Any]) -> MethodConfig:
    """Both switches off is an error; ``parts`` says which terms run (the start summary)."""
    kw = cfg.loss_kwargs
    if not kw["sgfi"] and not kw["ckd"]:
        raise UserError("--no-sgfi with --no-ckd leaves gdetkd no loss: use --method none")
    terms = [n for n, on in (("L_feat", kw["sgfi"]), ("L_ckd", kw["ckd"])) if on]
    return replace(cfg, loss_kwargs={**kw, "parts": f"{'+'.join(terms)} ({HETEROGENEOUS})"})


_WHAT = "G-DetKD's contrastive term"
OPTIONS = (
    MethodOption("sgfi", bool, True, "gdetkd: semantic-guided feature imitation L_feat (off: "
                 "none).", apply=_switch("sgfi")),
    MethodOption("ckd", bool, True, "gdetkd: contrastive region distillation L_ckd (off: none).",
                 apply=_switch("ckd")),
    MethodOption("ckd_weight", float, None, "gdetkd: weight of L_ckd (0.1).", _WHAT,
                 _non_negative, kwarg=True),
    MethodOption("ckd_gamma", float, None, "gdetkd: temperature γ of L_ckd (0.07).", _WHAT,
                 _positive, kwarg=True),
    MethodOption("ckd_queue", int, None, "gdetkd: queue of earlier teacher embeddings (4096).",
                 _WHAT, _queue, kwarg=True),
    MethodOption("ckd_iou", float, None, "gdetkd: regions of one image at this IoU or more are "
                 "not each other's negatives (0.5).", _WHAT, _iou, kwarg=True),
)  # fmt: skip

_DEFAULTS = {"alpha": 1.0, "loss_kwargs": {"sgfi": True, "ckd": True, **GDETKD_DEFAULTS}}

register_method(
    MethodSpec(
        "gdetkd",
        "L_det + α·L_feat (SGFI) + w·L_ckd (CKD), heterogeneous form, one stage "
        "(G-DetKD, arXiv 2108.07482)",
        terms=(
            LossTerm(
                "loss_kd",
                "stage",
                _build_sgfi,
                "alpha",
                call=call_regions,
                enabled=lambda c: c.loss_kwargs["sgfi"],
            ),
            LossTerm(
                "loss_ckd",
                "ckd",
                _build_ckd,
                lambda c: c.loss_kwargs["ckd_weight"],
                call=call_regions,
                enabled=lambda c: c.loss_kwargs["ckd"],
            ),
        ),  # fmt: skip
        defaults={"one_stage": _DEFAULTS, "two_stage": _DEFAULTS},
        store=StoreNeeds(boxes=True),
        stage_loss="sgfi",
        options=OPTIONS,
        check=_check,
    )
)

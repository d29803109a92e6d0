"""``gdetkd``: L_det + α·L_feat (SGFI) + w_ckd·L_ckd (CKD) [+ w_cls·L_cls], one stage with the
last teacher (G-DetKD, Yao et al., ICCV 2021, arXiv 2108.07482; no official code is public).

The general pipeline's heterogeneous form, for every student: regions are the GT boxes and the
teacher's stored top-K detections of the drawn view (1:3 positives:negatives), the teacher's
RoI features are RoIAligned from its stored FPN maps (no teacher runs), the student's from
every one of its levels (:mod:`dfmsd_cli.distill.losses.gdetkd`). ``--online``: the live
teacher's maps and top-K detections instead (``distill/online.py``).

Homogeneous extra, dense pairs: ``+ w_cls·L_cls``, class-aware region KD on the teacher's stored
class logits (:mod:`dfmsd_cli.distill.losses.gdetkd_cls`), when the last store holds them
(``precompute --store-logits``) and the heads match (anchors per position, classes,
sigmoid/softmax); otherwise the run says at start why it is off (``notes``, ``parts``).
``--no-class-kd`` is its ablation. Not done: box-offset KD and head transfer (two-stage pairs).

Defaults (both families; every one is our choice, unmeasured: the paper's public text gives no
values we could read): α = 1 for L_feat (a per-element MSE), w_ckd = 0.1, γ = 0.07 (MoCo/CRD's
temperature), a queue of 4096 teacher embeddings, near-duplicates at IoU ≥ 0.5 (the positive
threshold: two regions of one object are never pushed apart), w_cls = 1.
"""

from __future__ import annotations

from collections.abc import Sequence
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
CLASS_KD_WEIGHT = 1.0  # w_cls: our choice (L_cls is a per-region mean of SLD's logit KD)


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


def _build_cls(cfg: MethodConfig, levels, student_channels, teacher_channels):
    from dfmsd_cli.distill.losses.gdetkd_cls import ClassKDLoss

    kw = cfg.loss_kwargs
    return ClassKDLoss(levels, kw["class_kd_anchors"], kw["class_kd_kind"])


def call_class_kd(mod, feats, teacher, targets, logits=None, peers=None):
    """``mod(z_S, z_T, valid, det_boxes, det_scores, targets)``: the student's class logits of
    this forward, the stored teacher logits, and the regions' sources."""
    return mod(logits, teacher.logits, teacher.valid, teacher.boxes, teacher.scores, targets)


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
CLASS_KD = "class-aware KD on the stored teacher logits; no box-offset KD, no head transfer"
CLASS_KD_OFF = "G-DetKD runs without class-aware KD (L_cls)"


def _parts(kw: dict[str, Any], cls: bool) -> str:
    terms = [n for n, on in (("L_feat", kw["sgfi"]), ("L_ckd", kw["ckd"]), ("L_cls", cls)) if on]
    return f"{'+'.join(terms)} ({CLASS_KD if cls else HETEROGENEOUS})"


def _check(cfg: MethodConfig, given: dict[str, Any]) -> MethodConfig:
    """Both feature switches off is an error; ``parts`` says which terms run (the start
    summary; :func:`with_stores` adds L_cls when the store allows it)."""
    kw = cfg.loss_kwargs
    if not kw["sgfi"] and not kw["ckd"]:
        raise UserError("--no-sgfi with --no-ckd leaves gdetkd no loss: use --method none")
    return replace(cfg, loss_kwargs={**kw, "parts": _parts(kw, False)})


def class_kd_problem(student, have: dict | None, missing: str) -> str | None:
    """Why L_cls cannot run for ``student`` against a teacher whose logits ``have`` the layout
    ``{anchors, classes, kind}`` (None: it can; ``missing`` says why there are none)."""
    from dfmsd_cli.distill.methods.samkd import sld_problem  # the same head-matching rule

    if getattr(student, "logit_anchors", None) is None:
        return f"the student {student.name} has no dense classification head"
    return sld_problem(student, have, missing)


def with_stores(
    cfg: MethodConfig, student, stores, online: bool, teachers: Sequence[str] = ()
) -> MethodConfig:
    """Turn L_cls on when the last stage's teacher gives logits of a matching head — its store
    (``--store-logits``) or, with ``--online``, the live teacher ``teachers[-1]`` — else say
    why (``notes``: printed at start and kept in the resolved config)."""
    kw = cfg.loss_kwargs
    if not kw["class_kd"]:
        return replace(cfg, notes=(f"{CLASS_KD_OFF}: --no-class-kd",))
    from dfmsd_cli.distill.methods.samkd import logit_source

    have, _, missing = logit_source(student, stores, online, teachers)
    problem = class_kd_problem(student, have, missing)
    if problem is not None:
        return replace(cfg, notes=(f"{CLASS_KD_OFF}: {problem}",))
    kw = {**kw, "class_kd_active": True, "class_kd_anchors": int(have["anchors"]),
          "class_kd_kind": have["kind"], "parts": _parts(kw, True)}  # fmt: skip
    return replace(cfg, loss_kwargs=kw, notes=())


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
    MethodOption("class_kd", bool, True, "gdetkd: class-aware region KD L_cls on the stored "
                 "teacher logits when the dense heads match (off: none).",
                 apply=_switch("class_kd")),
    MethodOption("class_kd_weight", float, None, "gdetkd: weight of L_cls (1).",
                 "G-DetKD's class-aware KD", _non_negative, kwarg=True),
)  # fmt: skip

_DEFAULTS = {
    "alpha": 1.0,
    "loss_kwargs": {
        "sgfi": True,
        "ckd": True,
        **GDETKD_DEFAULTS,
        "class_kd": True,
        "class_kd_weight": CLASS_KD_WEIGHT,
    },
    "notes": (f"{CLASS_KD_OFF} (no store checked yet)",),
}

register_method(
    MethodSpec(
        "gdetkd",
        "L_det + α·L_feat (SGFI) + w·L_ckd (CKD) [+ w_cls·L_cls on stored logits of a matching "
        "head], one stage (G-DetKD, arXiv 2108.07482)",
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
            LossTerm(
                "loss_cls_kd",  # not loss_cls: the detectors' own classification loss
                "cls",
                _build_cls,
                lambda c: c.loss_kwargs["class_kd_weight"],
                call=call_class_kd,
                logits=True,
                enabled=lambda c: bool(c.loss_kwargs.get("class_kd_active")),
            ),
        ),  # fmt: skip
        defaults={"one_stage": _DEFAULTS, "two_stage": _DEFAULTS},
        store=StoreNeeds(boxes=True),
        stage_loss="sgfi",
        options=OPTIONS,
        check=_check,
        with_stores=with_stores,
    )
)

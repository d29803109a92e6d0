"""``dmkd``: L_det + α·L_DFM, one stage with the last teacher, no ME, no SFA (the DMKD core).

DFM = dual-masked feature generation (DMKD, Yang et al., arXiv 2309.02719; docs/method.md).

Defaults and where they come from:

* α = 5e-5: DFMSD's "5.0×" with the exponent lost; FGD's two-stage configs use exactly 5e-5,
  the most likely reading (unverified). Same for both student families.
* DFM masks λ_s = 0.65 (MGD's one-stage ratio), λ_c = 0.5, τ = 0.5 (FGD's temperature), rule
  ``sample``: our choices where DMKD publishes none.

The dual-masking options (``DFM_OPTIONS``) are shared with ``dfmsd``.
"""

from __future__ import annotations

from typing import Any

from dfmsd_cli.distill.methods.registry import (
    LossTerm,
    MethodOption,
    MethodSpec,
    StoreNeeds,
    register_method,
)

DFM_DEFAULTS = {"lambda_s": 0.65, "lambda_c": 0.5, "tau": 0.5, "rule": "sample"}


def build_dfm(cfg, levels, student_channels, teacher_channels, reduction: str | None = None):
    """The DFM loss with the config's mask constants (``reduction="mean"``: Eq. 8's ME form)."""
    from dfmsd_cli.distill.losses import DualMaskingLoss

    kw = dict(cfg.loss_kwargs)
    if reduction is not None:
        kw["reduction"] = reduction
    return DualMaskingLoss(levels, student_channels, teacher_channels, **kw)


def _fraction(v: Any) -> str | None:
    return None if 0.0 <= float(v) < 1.0 else f"must be in [0, 1), got {v}"


def _positive(v: Any) -> str | None:
    return None if float(v) > 0 else f"must be positive, got {v}"


def _rule(v: Any) -> str | None:
    from dfmsd_cli.distill.losses.common import MASK_RULES

    return None if v in MASK_RULES else f"'{v}' is unknown: use one of {', '.join(MASK_RULES)}"


_WHAT = "the dual masking"
DFM_OPTIONS = (
    MethodOption("lambda_s", float, None, "Dual masking: fraction of valid cells masked (0.65).",
                 _WHAT, _fraction, kwarg=True),
    MethodOption("lambda_c", float, None, "Dual masking: fraction of channels masked (0.5).",
                 _WHAT, _fraction, kwarg=True),
    MethodOption("tau", float, None, "Attention temperature (0.5).", _WHAT, _positive,
                 kwarg=True),
    MethodOption("mask_rule", str, None, "Mask selection: sample (∝ attention), top, or random.",
                 _WHAT, _rule, target="rule", kwarg=True),
)  # fmt: skip

DFM_TERM = LossTerm("loss_kd", "stage", build_dfm, "alpha")
_DEFAULTS = {"alpha": 5e-5, "loss_kwargs": DFM_DEFAULTS}

register_method(
    MethodSpec(
        "dmkd",
        "L_det + α·L_DFM, one stage (the DMKD core, arXiv 2309.02719)",
        terms=(DFM_TERM,),
        defaults={"one_stage": _DEFAULTS, "two_stage": _DEFAULTS},
        store=StoreNeeds(attention=True),
        stage_loss="dfm",
        options=DFM_OPTIONS,
    )
)

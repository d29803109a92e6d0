"""``dfmsd``: L_det + α·L_DFM (each stage, SAL) + β·L_ME (last stage) + γ·L_SFA (arXiv 2407.13147).

Optionally + w_adv·L_adv on the stored adversarial view (last stage, when the store has it).
Defaults (both student families) and where they come from (docs/method.md):

* α = 5e-5: the paper prints "5.0×" with the exponent lost; FGD's two-stage configs use
  exactly 5e-5, the most likely reading (unverified).
* β = 0.25 ("2.5×" in the paper) for L_ME as Eq. 8's per-level mean, chosen by the sweep in
  docs/method.md (demo seeds 7 and 8); also the default weight w_adv of L_adv.
* γ = 6: the paper gives no SFA weight; PKD's weight for heterogeneous and two-stage pairs.
  SFA aligns the 3 finest shared levels, averaged (Eq. 5, Table 9); γ is our choice.
* DFM masks λ_s = 0.65, λ_c = 0.5, τ = 0.5, rule ``sample`` (as ``dmkd``; our choices).
* ``kd_warmup`` (every method): every distillation weight ramps linearly from 0 over the
  first N iterations of each stage (``--kd-warmup``; 0 = off, the default).

``--no-sal``/``--no-me``/``--no-sfa``/``--no-adv`` are the paper's Tables 8–11 ablations.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from dfmsd_cli.distill.methods.dmkd import DFM_DEFAULTS, DFM_OPTIONS, DFM_TERM, build_dfm
from dfmsd_cli.distill.methods.registry import (
    LossTerm,
    MethodConfig,
    MethodOption,
    MethodSpec,
    StoreNeeds,
    call_features,
    register_method,
)
from dfmsd_cli.errors import UserError

# β of L_ME (Eq. 8's per-level mean); also the default weight of L_adv. See docs/method.md's
# β sweep for how it was chosen.
DFMSD_BETA = 0.25


def parse_sfa_levels(value: str | int) -> int | None:
    """``--sfa-levels``: ``all`` (None) or N ≥ 1, the N finest levels shared by both sides."""
    text = str(value).strip().lower()
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise UserError(
            f"--sfa-levels must be 'all' or a positive number of finest levels (3: P3-P5 of a "
            f"RetinaNet student, the paper's 'P1 to P3'), got '{value}'"
        )
    return int(text)


def stage_has_adv(cfg: MethodConfig, stage: int, num_stages: int) -> bool:
    """Whether stage ``stage`` (0-based) adds L_adv: the last one (as ME's best setting)."""
    return cfg.adv and stage == num_stages - 1


def stage_has_me(cfg: MethodConfig, stage: int, num_stages: int) -> bool:
    """Whether stage ``stage`` (0-based) adds L_ME: the last, or all with ``--me-stages all``."""
    if not cfg.me:
        return False
    return cfg.me_stages == "all" or stage == num_stages - 1


def _build_mean_dfm(cfg, levels, student_channels, teacher_channels):
    """L_ME / L_adv: their own DFM modules (separate generation blocks: reconstructing the
    enhanced or perturbed view is a different task), Eq. 8's per-level mean."""
    return build_dfm(cfg, levels, student_channels, teacher_channels, reduction="mean")


def _build_sfa(cfg, levels, student_channels, teacher_channels):
    """Eq. 5: the average over the finest shared levels (Table 9: P1-P3)."""
    from dfmsd_cli.distill.losses import SFALoss, finest_levels

    sfa_levels = finest_levels(levels, cfg.sfa_levels)
    return SFALoss(sfa_levels, student_channels, teacher_channels, average=True)


def _set_adv(cfg: MethodConfig, value: Any) -> MethodConfig:
    return replace(cfg, adv=bool(value), adv_required=bool(value))


def _me_stages(v: Any) -> str | None:
    return None if v in ("last", "all", "none") else f"must be last, all or none, got '{v}'"


def _check(cfg: MethodConfig, given: dict[str, Any]) -> MethodConfig:
    if "adv_weight" in given and not cfg.adv:
        raise UserError("--adv-weight weights dfmsd's adversarial-view loss: drop it here")
    if cfg.me_stages == "none":
        cfg = replace(cfg, me=False)
    return cfg


OPTIONS = (
    MethodOption("sal", bool, True, "dfmsd: stage-wise over every teacher in order (off: one "
                 "stage, the last teacher)."),
    MethodOption("me", bool, True, "dfmsd: the masking-enhancement loss L_ME (off: none)."),
    MethodOption("sfa", bool, True, "dfmsd: semantic feature alignment L_SFA (off: none)."),
    MethodOption("adv", bool, None, "dfmsd: L_adv on the stored adversarial view in the last "
                 "stage (default: when the store has it; --adv requires it, --no-adv is the "
                 "ablation).", apply=_set_adv),
    MethodOption("adv_weight", float, None, "dfmsd: weight of L_adv (default: β's default).",
                 "the adversarial-view weight"),
    MethodOption("me_stages", str, "last", "dfmsd: stages with L_ME: last, all or none.",
                 "the ME stages", _me_stages),
    MethodOption("sfa_levels", str, None, "dfmsd: SFA on the N finest shared levels, averaged "
                 "(Eq. 5; default 3, the paper's P1-P3), or 'all'.", "the SFA levels",
                 apply=lambda cfg, v: replace(cfg, sfa_levels=parse_sfa_levels(v))),
    *DFM_OPTIONS,
)  # fmt: skip

_DEFAULTS = {
    "alpha": 5e-5, "beta": DFMSD_BETA, "gamma": 6.0, "me": True, "sfa": True,
    "adv": True, "adv_weight": DFMSD_BETA, "loss_kwargs": DFM_DEFAULTS,
}  # fmt: skip

register_method(
    MethodSpec(
        "dfmsd",
        "L_det + α·L_DFM (SAL) + β·L_ME + γ·L_SFA (DFMSD, arXiv 2407.13147)",
        terms=(
            DFM_TERM,
            LossTerm("loss_me", "me", _build_mean_dfm, "beta", "me", enabled=lambda c: c.me),
            LossTerm(
                "loss_adv", "adv", _build_mean_dfm, "adv_weight", "adv", enabled=lambda c: c.adv
            ),
            LossTerm(
                "loss_sfa", "sfa", _build_sfa, "gamma", call=call_features, enabled=lambda c: c.sfa
            ),
        ),  # fmt: skip
        defaults={"one_stage": _DEFAULTS, "two_stage": _DEFAULTS},
        store=StoreNeeds(attention=True, views=("me", "adv")),
        sal=True,
        stage_loss="dfm",
        options=OPTIONS,
        check=_check,
    )
)

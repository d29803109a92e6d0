"""``fgd``: L_det + L_FGD (four inner weights), one stage with the last teacher (FGD, CVPR 2022).

The outer weight α is 1: FGD's configs set its four weights inside the loss. Defaults per
registered head, as yzd-v/FGD's configs:

* one-stage (RetinaNet/GFL heads): α_fg = 1e-3, β_bg = 5e-4, γ_mask = 5e-4, λ_rela = 5e-6,
  T = 0.5;
* FCOS heads (``fcos``, ``mmfcos``): α_fg = 1.6e-3, β_bg = 8e-4, γ_mask = 8e-4,
  λ_rela = 8e-6, T = 0.8;
* two-stage: α_fg = 5e-5, β_bg = 2.5e-5, γ_mask = 5e-5, λ_rela = 5e-7, T = 0.5.
"""

from __future__ import annotations

from dfmsd_cli.distill.methods.registry import LossTerm, MethodSpec, StoreNeeds, register_method


def build_fgd(cfg, levels, student_channels, teacher_channels):
    from dfmsd_cli.distill.losses import FGDLoss

    return FGDLoss(levels, student_channels, teacher_channels, **cfg.loss_kwargs)


def _inner(a: float, b: float, g: float, lam: float, t: float) -> dict:
    kw = {"alpha_fg": a, "beta_bg": b, "gamma_mask": g, "lambda_rela": lam, "temperature": t}
    return {"alpha": 1.0, "loss_kwargs": kw}


_FCOS = _inner(1.6e-3, 8e-4, 8e-4, 8e-6, 0.8)  # yzd-v/FGD's FCOS config: its own weights, T=0.8

register_method(
    MethodSpec(
        "fgd",
        "L_det + L_FGD (four inner weights), one stage (FGD, CVPR 2022)",
        terms=(LossTerm("loss_kd", "stage", build_fgd, "alpha"),),
        defaults={
            "one_stage": _inner(1e-3, 5e-4, 5e-4, 5e-6, 0.5),
            "two_stage": _inner(5e-5, 2.5e-5, 5e-5, 5e-7, 0.5),
        },
        head_defaults={"fcos": _FCOS, "mmfcos": _FCOS},
        store=StoreNeeds(attention=True),
        stage_loss="fgd",
    )
)

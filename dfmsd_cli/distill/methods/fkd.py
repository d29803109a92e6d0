"""``fkd``: L_det + L_FKD, one stage with the last teacher (FKD, Zhang & Ma, ICLR 2021).

L_FKD (``distill/losses/fkd.py``, docs/method.md "FKD"): attention-masked feature loss,
channel and spatial attention transfer and non-local distillation, each with its own weight
inside the loss, so the outer weight α is 1. Defaults per student family (``FKD_DEFAULTS``),
from the official code:

* one-stage (``single_stage.py``, RetinaNet): τ = 0.1, weights feat 4.2e-4, channel 2.4e-2,
  spatial 2.4e-2, non-local 4.2e-4, channel mask in the feature loss;
* two-stage (``two_stage.py``, Faster R-CNN; MMRazor's FBKD port): τ = 0.5, 7e-5, 4e-3, 4e-3,
  7e-5, spatial mask only.

It reads the stored FPN features and their valid cells only.
"""

from __future__ import annotations

from dfmsd_cli.distill.methods.registry import (
    LossTerm,
    MethodSpec,
    StoreNeeds,
    call_features,
    register_method,
)


def build_fkd(cfg, levels, student_channels, teacher_channels):
    from dfmsd_cli.distill.losses import FKDLoss

    return FKDLoss(levels, student_channels, teacher_channels, **cfg.loss_kwargs)


def _defaults(family: str) -> dict:
    from dfmsd_cli.distill.losses.fkd import FKD_DEFAULTS

    return {"alpha": 1.0, "loss_kwargs": dict(FKD_DEFAULTS[family])}


register_method(
    MethodSpec(
        "fkd",
        "L_det + L_FKD (attention-guided + non-local), one stage (FKD, ICLR 2021)",
        terms=(LossTerm("loss_kd", "stage", build_fkd, "alpha", call=call_features),),
        defaults={family: _defaults(family) for family in ("one_stage", "two_stage")},
        store=StoreNeeds(),
        stage_loss="fkd",
    )
)

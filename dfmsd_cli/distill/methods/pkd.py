"""``pkd``: L_det + α·L_PKD, one stage with the last teacher (PKD, NeurIPS 2022, mmrazor).

PKD's official form: the standardised MSE on every shared level, summed. Defaults: weight 10
for one-stage students (mmrazor's RetinaNet X101→R50 config), 6 for two-stage students (its
weight for heterogeneous and two-stage pairs).
"""

from __future__ import annotations

from dfmsd_cli.distill.methods.registry import (
    LossTerm,
    MethodSpec,
    StoreNeeds,
    call_features,
    register_method,
)


def build_pkd(cfg, levels, student_channels, teacher_channels):
    from dfmsd_cli.distill.losses import SFALoss

    return SFALoss(levels, student_channels, teacher_channels, **cfg.loss_kwargs)


register_method(
    MethodSpec(
        "pkd",
        "L_det + α·L_PKD, one stage (PKD, NeurIPS 2022)",
        terms=(LossTerm("loss_kd", "stage", build_pkd, "alpha", call=call_features),),
        defaults={"one_stage": {"alpha": 10.0}, "two_stage": {"alpha": 6.0}},
        store=StoreNeeds(),
        stage_loss="pkd",
    )
)

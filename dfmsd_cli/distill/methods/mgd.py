"""``mgd``: L_det + α·L_MGD, one stage with the last teacher (MGD, ECCV 2022, yzd-v/MGD).

Defaults, as yzd-v/MGD's configs: α = 2e-5 / λ = 0.65 for RetinaNet (one-stage) students,
α = 5e-7 / λ = 0.45 for two-stage students.
"""

from __future__ import annotations

from dfmsd_cli.distill.methods.registry import (
    LossTerm,
    MethodSpec,
    StoreNeeds,
    call_features,
    register_method,
)


def build_mgd(cfg, levels, student_channels, teacher_channels):
    from dfmsd_cli.distill.losses import MGDLoss

    return MGDLoss(levels, student_channels, teacher_channels, **cfg.loss_kwargs)


register_method(
    MethodSpec(
        "mgd",
        "L_det + α·L_MGD, one stage (MGD, ECCV 2022)",
        terms=(LossTerm("loss_kd", "stage", build_mgd, "alpha", call=call_features),),
        defaults={
            "one_stage": {"alpha": 2e-5, "loss_kwargs": {"lam": 0.65}},
            "two_stage": {"alpha": 5e-7, "loss_kwargs": {"lam": 0.45}},
        },
        store=StoreNeeds(),
        stage_loss="mgd",
    )
)

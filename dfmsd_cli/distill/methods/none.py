"""``none``: L_det only, the student trained alone (the baseline row); no store is read."""

from __future__ import annotations

from dfmsd_cli.distill.methods.registry import MethodSpec, register_method

register_method(
    MethodSpec(
        "none",
        "L_det only: the student alone, no store",
        defaults={"one_stage": {}, "two_stage": {}},
    )
)

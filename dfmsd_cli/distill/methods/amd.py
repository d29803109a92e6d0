"""``amd``: L_det + α·L_AMD, one stage with the last teacher (AMD, Yang et al., IJCNN 2023).

L_AMD (``distill/losses/amd.py``; our formulation, docs/method.md "AMD"): MGD's masked
generation with the spatial mask drawn from the teacher's spatial attention (the stored
statistic when the store has it, else computed from the teacher feature) and an SE block on
the single branch. No code or readable constants are public; AMD compares in MGD's settings,
so its defaults are MGD's official ones (our choice, ``AMD_DEFAULTS``):

* one-stage students: α = 2e-5, λ = 0.65; two-stage students: α = 5e-7, λ = 0.45;
* τ = 0.5 (FGD's temperature), mask rule ``sample`` (∝ attention), as DFM's.

Options: ``--lambda-s`` (λ, the masked fraction), ``--tau``, ``--mask-rule``.
"""

from __future__ import annotations

from dfmsd_cli.distill.methods.dmkd import DFM_OPTIONS, _fraction
from dfmsd_cli.distill.methods.registry import (
    LossTerm,
    MethodOption,
    MethodSpec,
    StoreNeeds,
    register_method,
)


def build_amd(cfg, levels, student_channels, teacher_channels):
    from dfmsd_cli.distill.losses import AMDLoss

    return AMDLoss(levels, student_channels, teacher_channels, **cfg.loss_kwargs)


def _defaults(family: str) -> dict:
    from dfmsd_cli.distill.losses.amd import AMD_DEFAULTS

    d = AMD_DEFAULTS[family]
    return {"alpha": d["alpha"], "loss_kwargs": {"lam": d["lam"], "tau": 0.5, "rule": "sample"}}


# τ and the mask rule are DFM's options with DFM's meaning; λ is AMD's single (spatial) ratio
OPTIONS = (
    MethodOption("lambda_s", float, None, "amd: the fraction of valid cells its one spatial mask "
                 "hides (0.65 one-stage, 0.45 two-stage).", "the masking", _fraction,
                 target="lam", kwarg=True),
    *(o for o in DFM_OPTIONS if o.name in ("tau", "mask_rule")),
)  # fmt: skip

register_method(
    MethodSpec(
        "amd",
        "L_det + α·L_AMD (attention-guided masked generation), one stage (AMD, IJCNN 2023)",
        terms=(LossTerm("loss_kd", "stage", build_amd, "alpha"),),
        defaults={family: _defaults(family) for family in ("one_stage", "two_stage")},
        store=StoreNeeds(attention=True),  # the stored spatial statistic when present
        stage_loss="amd",
        options=OPTIONS,
    )
)

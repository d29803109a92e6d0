"""Stage-wise distillation from teacher stores (DFMSD) and the baselines on the same engine.

::

    from dfmsd_cli.distill import DistillOptions, distill
    summary = distill(DistillOptions(student="retina_r50", stages=("cmr_r101", "cmr_x101"),
                                     data="coco", out="runs/dfmsd", epochs=(12, 12)))

Losses live in :mod:`dfmsd_cli.distill.losses`; formulas in docs/method.md.
"""

from dfmsd_cli.distill.methods import (
    MethodConfig,
    list_methods,
    method_config,
    register_method,
    student_family,
)
from dfmsd_cli.distill.run import DistillOptions, distill

__all__ = [
    "DistillOptions",
    "MethodConfig",
    "distill",
    "list_methods",
    "method_config",
    "register_method",
    "student_family",
]

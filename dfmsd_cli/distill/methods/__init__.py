"""The distillation methods, one module each, registered in :mod:`.registry`.

``dfmsd``, ``dmkd``, ``mgd``, ``pkd``, ``fgd``, ``none`` (each module's docstring states its
defaults and their sources). Adding a method: docs/methods_api.md.
"""

from dfmsd_cli.distill.methods.dfmsd import (
    DFMSD_BETA,
    parse_sfa_levels,
    stage_has_adv,
    stage_has_me,
)
from dfmsd_cli.distill.methods.registry import (
    COMMON_OPTIONS,
    FAMILIES,
    LossTerm,
    MethodConfig,
    MethodOption,
    MethodSpec,
    StoreNeeds,
    all_options,
    build_stage_losses,
    call_features,
    call_full,
    get_method,
    list_methods,
    method_config,
    method_help,
    options_class,
    register_method,
    stage_terms,
    student_family,
    unregister_method,
)

__all__ = [
    "COMMON_OPTIONS",
    "DFMSD_BETA",
    "FAMILIES",
    "LossTerm",
    "MethodConfig",
    "MethodOption",
    "MethodSpec",
    "StoreNeeds",
    "all_options",
    "build_stage_losses",
    "call_features",
    "call_full",
    "get_method",
    "list_methods",
    "method_config",
    "method_help",
    "options_class",
    "parse_sfa_levels",
    "register_method",
    "stage_has_adv",
    "stage_has_me",
    "stage_terms",
    "student_family",
    "unregister_method",
]

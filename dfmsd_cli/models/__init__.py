"""The detector zoo: ``build_model("{head}_{backbone}", num_classes)`` -> a Detector.

See ``registry.py`` for registering heads/backbones and ``detector.py`` for the contract.
"""

from dfmsd_cli.models.detector import DetectorMixin, DetectorOutput
from dfmsd_cli.models.registry import (
    ModelSpec,
    annotate_model,
    build_model,
    get_spec,
    list_backbones,
    list_heads,
    list_models,
    parse_options,
    register_backbone,
    register_head,
    register_model,
)

Detector = DetectorMixin  # every zoo model is an instance (isinstance checks, type hints)

__all__ = [
    "Detector",
    "DetectorMixin",
    "DetectorOutput",
    "ModelSpec",
    "annotate_model",
    "build_model",
    "get_spec",
    "list_backbones",
    "list_heads",
    "list_models",
    "parse_options",
    "register_backbone",
    "register_head",
    "register_model",
]

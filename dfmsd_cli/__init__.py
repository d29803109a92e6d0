"""dfmsd: Dual Feature Masking Stage-wise Knowledge Distillation for object detectors.

Implements DFMSD (Zhang et al., arXiv 2407.13147) on torchvision detectors, with teachers
run once into an offline zarr feature store. Data flow: ``data`` -> ``models`` -> ``store``
(precompute) -> ``distill`` -> ``eval``; ``cli`` is a thin typer layer over these.
"""

__version__ = "0.1.0"

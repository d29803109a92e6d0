"""dfmsd: Dual Feature Masking Stage-wise Knowledge Distillation for object detectors.

Implements DFMSD (Zhang et al., arXiv 2407.13147) on torchvision detectors, with teachers
run once into an offline zarr feature store. Layers, bottom to top: ``errors``/``utils``,
``data``, ``models``, ``store``, ``eval``, ``engine``, ``distill``, ``bench``/``viz``, ``demo``,
``cli`` (docs/architecture.md; ``tests/test_layering.py`` enforces them).
"""

__version__ = "0.1.0"

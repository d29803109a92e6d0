"""The model table of ``dfmsd models``: registry entries plus what ``--weights torchvision``
loads (it sits above both ``registry`` and ``pretrained``, which must not import each other)."""

from __future__ import annotations

from dfmsd_cli.errors import UserError
from dfmsd_cli.models.pretrained import torchvision_weights_kind
from dfmsd_cli.models.registry import get_spec, list_models


def describe_models(pattern: str | None = None, num_classes: int | None = 80) -> list[dict]:
    """One JSON-able dict per model (``dfmsd models``); ``num_classes=None`` skips the
    parameter counts. ``torchvision`` says which ``--weights torchvision`` exist."""
    names = list_models(pattern)
    if pattern and not names:
        raise UserError(f"no model matches '{pattern}': run 'dfmsd models' for all names")
    rows = []
    for name in names:
        spec = get_spec(name)
        row = spec.to_dict()
        if num_classes is not None:
            row["parameters"] = spec.num_parameters(num_classes)
        row["torchvision"] = torchvision_weights_kind(name, spec.backbone)
        rows.append(row)
    return rows

"""The dfmsd checkpoint: weights plus everything needed to rebuild and use the model.

A checkpoint is a dict (docs/architecture.md)::

    {"format": "dfmsd", "version": 1, "model": "retina_r50", "num_classes": K,
     "model_options": {...}, "categories": [{"id", "name"}, ...], "geometry": {...},
     "state_dict": {...}, ...training state (epoch, optimizer, ...)}

``load_weights`` is strict: every key and shape must match, and a mismatch is a one-line
UserError that names the checkpoint's architecture / class count and the first missing,
unexpected and mis-shaped keys.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dfmsd_cli.errors import UserError
from dfmsd_cli.models.state_dict import load_state_strict, unwrap
from dfmsd_cli.utils.safe_load import load_pth

FORMAT = "dfmsd"
VERSION = 1


def make_checkpoint(
    model: nn.Module,
    *,
    categories: list[dict] | None = None,
    geometry: Any = None,
    **extra: Any,
) -> dict[str, Any]:
    """The checkpoint dict of ``model`` (weights on CPU); ``extra`` adds training state."""
    if geometry is not None and hasattr(geometry, "to_dict"):
        geometry = geometry.to_dict()
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    m = unwrap(model)
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": m.name,
        "num_classes": int(m.num_classes),
        "model_options": dict(getattr(m, "options", {})),
        "categories": list(categories or []),
        "geometry": geometry,
        "state_dict": state,
        **extra,
    }


def save_checkpoint(path: str | os.PathLike, model: nn.Module, **kwargs: Any) -> Path:
    """Write ``make_checkpoint(model, **kwargs)`` atomically to ``path``."""
    from dfmsd_cli.utils.io import atomic_torch_save

    path = Path(path)
    atomic_torch_save(make_checkpoint(model, **kwargs), path)
    return path


def read_checkpoint(path: str | os.PathLike) -> Any:
    """Read a ``.pth`` on CPU with ``weights_only=True`` (``utils/safe_load.py``).

    A file that references Python objects beyond tensors and containers is refused with a
    one-line UserError (``--trust-checkpoint`` opts in for a trusted file); nothing in a
    checkpoint is ever executed by default.
    """
    return load_pth(path, what="weights file")


def is_dfmsd_checkpoint(obj: Any) -> bool:
    return isinstance(obj, Mapping) and obj.get("format") == FORMAT and "state_dict" in obj


def checkpoint_meta(obj: Mapping) -> dict[str, Any]:
    """The checkpoint without its tensors (state_dict / optimizer ...)."""
    skip = {"state_dict", "optimizer", "scaler", "scheduler", "rng"}
    return {k: v for k, v in obj.items() if k not in skip}


def _state_dict_of(obj: Any, source: str) -> dict[str, Tensor]:
    """The state dict in a dfmsd checkpoint, a plain state dict, or a {"model": sd} file."""
    if is_dfmsd_checkpoint(obj):
        state = obj["state_dict"]
    elif isinstance(obj, Mapping) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        state = obj
    elif isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        state = obj["model"]  # torchvision reference-scripts checkpoint
    elif isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        state = obj["state_dict"]
        if any(k.startswith(("neck.", "roi_head.", "bbox_head.", "rpn_head.")) for k in state):
            raise UserError(
                f"{source} is an MMDetection checkpoint: convert it first with "
                "'dfmsd convert mmdet CKPT --model NAME --out W.pth'"
            )
    else:
        raise UserError(
            f"{source} holds neither a dfmsd checkpoint nor a state dict: pass a file written "
            "by dfmsd train/convert or torch.save(model.state_dict())"
        )
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP wrapper
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def load_weights(
    model: nn.Module, spec: str | os.PathLike, *, categories: list[dict] | None = None
) -> dict[str, Any]:
    """Load ``spec`` into ``model`` strictly and return the checkpoint's metadata.

    ``spec``: a dfmsd checkpoint, a plain state dict file, or ``"torchvision"`` (pretrained
    weights, see ``pretrained.py``; ``categories`` selects the COCO classes to keep).
    """
    if str(spec) == "torchvision":
        from dfmsd_cli.models.pretrained import load_torchvision_weights

        return load_torchvision_weights(model, categories=categories)
    source = str(spec)
    obj = read_checkpoint(spec)
    m = unwrap(model)
    if isinstance(obj, Mapping) and obj.get("kind") == "trunk":  # models/trunk.py pack_trunk
        raise UserError(
            f"{source} holds only backbone + FPN weights (a trunk): add --reinit-heads to load "
            "them and start the detection heads fresh from --seed"
        )
    if is_dfmsd_checkpoint(obj):
        name, k = obj.get("model"), obj.get("num_classes")
        if name != m.name or k != m.num_classes:
            raise UserError(
                f"{source} is a checkpoint of {name} with {k} classes, but the model is "
                f"{m.name} with {m.num_classes} classes: use --model {name} (or omit --model "
                "where the checkpoint is enough) or train a matching checkpoint"
            )
    hint = None
    if is_dfmsd_checkpoint(obj) and obj.get("model_options", {}) != getattr(m, "options", {}):
        hint = (
            f"the checkpoint was built with options {obj.get('model_options')} and the model "
            f"with {getattr(m, 'options', {})}: build it with the checkpoint's options "
            "(build_from_checkpoint does)"
        )
    load_state_strict(m, _state_dict_of(obj, source), source, hint=hint)
    return checkpoint_meta(obj) if is_dfmsd_checkpoint(obj) else {"source": source}


def build_from_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the architecture recorded in a dfmsd checkpoint, load its weights strictly.

    Returns ``(model in eval mode on device, metadata)`` where metadata holds ``model``,
    ``num_classes``, ``categories``, ``geometry``, ``model_options`` and any training info.
    """
    from dfmsd_cli.models.registry import build_model

    obj = read_checkpoint(path)
    if not is_dfmsd_checkpoint(obj):
        raise UserError(
            f"{path} is a plain state dict without the model name: pass --model NAME "
            f"--weights {path} instead"
        )
    model = build_model(obj["model"], int(obj["num_classes"]), **obj.get("model_options", {}))
    load_state_strict(model, _state_dict_of(obj, str(path)), str(path))
    return model.to(device).eval(), checkpoint_meta(obj)


def load_teacher(
    name: str, num_classes: int, weights: str | None, seed: int = 0
) -> torch.nn.Module:
    """Build the teacher (random init seeded by ``seed``) and load ``weights`` strictly."""
    from dfmsd_cli.models.registry import build_model

    torch.manual_seed(seed)
    model = build_model(name, num_classes=num_classes)
    if weights:
        load_weights(model, weights)
    return model.eval()

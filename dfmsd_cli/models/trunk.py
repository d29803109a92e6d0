"""The trunk (backbone + FPN) of a detector, apart from its heads: pretrained-student init.

Every zoo detector keeps its feature extractor under ``backbone.`` (torchvision's
``BackboneWithFPN``: ``backbone.body`` + ``backbone.fpn``) and its detection heads elsewhere
(``head.`` for dense detectors; ``rpn.`` and ``roi_heads.`` for two-stage ones). Starting a
student from a pretrained trunk with fresh heads is how the paper's students start (ImageNet
backbone, new detection head) and what torchvision's ``weights_backbone`` / MMDetection's
``init_cfg=dict(type='Pretrained', checkpoint=...)`` on the backbone do.

``load_trunk`` loads the ``backbone.*`` tensors of a file strictly (every trunk key of the
model present, every shape equal) and leaves every other parameter as the model was built:
``train``/``distill`` build the model right after ``seed_everything(--seed)``, so the heads are
the seed's fresh initialisation — the same heads a from-scratch run of that seed starts with.
A *trunk file* (``pack_trunk``) holds only those tensors, in float16.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from dfmsd_cli.errors import UserError
from dfmsd_cli.models.state_dict import load_state_strict, unwrap

TRUNK_PREFIX = "backbone."  # body + FPN in every zoo detector
TRUNK_KIND = "trunk"


def trunk_keys(state: dict[str, Tensor]) -> list[str]:
    """The keys of ``state`` that belong to the trunk (backbone body + FPN)."""
    return [k for k in state if k.startswith(TRUNK_PREFIX)]


def is_trunk_file(obj: Any) -> bool:
    """A file written by :func:`pack_trunk` (backbone + FPN only)."""
    return isinstance(obj, dict) and obj.get("kind") == TRUNK_KIND and "state_dict" in obj


def load_trunk(model: nn.Module, spec: str | os.PathLike) -> dict[str, Any]:
    """Load the trunk of ``spec`` into ``model``; the heads keep their current weights.

    ``spec``: a trunk file, a dfmsd checkpoint or a plain state dict (its head tensors, if any,
    are ignored). Returns what happened: ``loaded`` (trunk tensors), ``kept`` (the model's
    other tensors, left as built), ``ignored`` (the file's non-trunk tensors), ``source``.
    """
    from dfmsd_cli.models.checkpoint import _state_dict_of, read_checkpoint

    source = str(spec)
    if source == "torchvision":
        raise UserError(
            "--reinit-heads needs a weights file, not 'torchvision': pass a trunk file "
            "(examples/pretrained_students/*.pth) or a checkpoint"
        )
    obj = read_checkpoint(spec)
    state = _state_dict_of(obj, source)
    m = unwrap(model)
    own = m.state_dict()
    trunk = {k: v for k, v in state.items() if k.startswith(TRUNK_PREFIX)}
    if not trunk:
        raise UserError(
            f"{source} holds no '{TRUNK_PREFIX}*' tensors (backbone + FPN): pass a trunk file "
            "or a checkpoint of a zoo detector"
        )
    kept = {k: v for k, v in own.items() if not k.startswith(TRUNK_PREFIX)}
    # strict on the trunk: the model's other tensors are supplied as they are
    load_state_strict(
        m,
        {**kept, **{k: v.to(own[k].dtype) if k in own else v for k, v in trunk.items()}},
        source,
        target=f"the trunk (backbone + FPN) of {m.name}",
        hint="pass the trunk of the same backbone architecture (e.g. examples/"
        f"pretrained_students/{m.name}.pth), or drop --reinit-heads for a whole checkpoint",
    )
    return {
        "source": source,
        "loaded": len(trunk),
        "kept": len(kept),
        "ignored": len(state) - len(trunk),
        "from_model": obj.get("model") if isinstance(obj, dict) else None,
    }


def init_weights(
    model: nn.Module,
    spec: str | os.PathLike,
    reinit_heads: bool = False,
    categories: list[dict] | None = None,
    say: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """``--weights`` [+ ``--reinit-heads``]: the whole checkpoint strictly (``load_weights``), or
    only its trunk with the heads left as built; ``say`` reports what was loaded."""
    from dfmsd_cli.models.checkpoint import load_weights

    if not reinit_heads:
        return load_weights(model, spec, categories=categories)
    info = load_trunk(model, spec)
    if say is not None:
        say(
            f"weights: backbone + FPN from {info['source']} ({info['loaded']} tensors); "
            f"detection heads fresh from the seed ({info['kept']} tensors)"
        )
    return info


def pack_trunk(src: str | os.PathLike, dst: str | os.PathLike) -> dict[str, Any]:
    """Write the trunk of a dfmsd checkpoint ``src`` to ``dst``: ``backbone.*`` in float16.

    The result loads with ``--weights DST --reinit-heads`` (values cast back to float32).
    Returns the file's metadata (no tensors).
    """
    from dfmsd_cli.models.checkpoint import is_dfmsd_checkpoint, read_checkpoint
    from dfmsd_cli.utils.io import atomic_torch_save

    ckpt = read_checkpoint(src)
    if not is_dfmsd_checkpoint(ckpt):
        raise UserError(f"{src} is not a dfmsd checkpoint: pass the model.pth of a dfmsd train run")
    state = {
        k: (v.half() if torch.is_floating_point(v) else v)
        for k, v in ckpt["state_dict"].items()
        if k.startswith(TRUNK_PREFIX)
    }
    meta = {
        "format": "dfmsd-trunk",
        "kind": TRUNK_KIND,
        "model": ckpt.get("model"),
        "model_options": ckpt.get("model_options", {}),
        "packed": {"dtype": "float16", "source": os.path.basename(str(src))},
    }
    atomic_torch_save({**meta, "state_dict": state}, dst)
    return meta


__all__ = [
    "TRUNK_PREFIX",
    "init_weights",
    "is_trunk_file",
    "load_trunk",
    "pack_trunk",
    "trunk_keys",
]

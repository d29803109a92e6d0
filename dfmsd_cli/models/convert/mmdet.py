"""Convert an MMDetection checkpoint into a dfmsd checkpoint for a registry model.

``convert_state_dict(src, target)`` applies the key rules of :mod:`.mmdet_keys` and checks every
tensor against the target model's state dict (built on the ``meta`` device, so even X101
teachers cost no memory). The :class:`ConversionReport` lists source keys that map nowhere,
target keys nothing maps to, and shape mismatches; a conversion with any of them is refused
unless ``allow_partial`` (then the missing tensors keep the model's initial values, and the
checkpoint records which ones). The written state dict holds every key of the built model,
derived buffers included (from the model itself, never from the source).
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dfmsd_cli.errors import UserError
from dfmsd_cli.models.convert.coco import COCO_CATEGORIES
from dfmsd_cli.models.convert.mmdet_keys import IGNORABLE, build_rules, fallback_key

# Heads whose forward reproduces MMDetection's: ``convert mmdet`` writes only these. The
# torchvision-layout heads take the same (or nearly the same) keys but compute something else.
MMDET_HEADS = ("mmretina", "mmfcos", "mmfrcnn", "mmmrcnn", "gfl", "cmr", "reppoints")
# torchvision-layout head -> (the head that reproduces MMDetection, what differs)
MMDET_VARIANTS = {
    "retina": ("mmretina", "FPN P6 from P5, rounded anchors"),
    "fcos": ("mmfcos", "head layout and regression, FPN extra levels"),
    "frcnn": ("mmfrcnn", "RoIAlign aligned=False with fixed sampling, rounded anchors"),
    "mrcnn": ("mmmrcnn", "RoIAlign aligned=False with fixed sampling, rounded anchors"),
}
# MMDetection's GN-head FCOS R50/R101 configs are caffe-style (fcos_r50-caffe_fpn_gn-head...)
CAFFE_FCOS = {"r50": "r50_caffe", "r101": "r101_caffe"}


def mmdet_equivalent(model: str) -> str | None:
    """The dfmsd model that reproduces MMDetection's forward for ``model``'s architecture;
    None when ``model`` itself does (or has no MMDetection counterpart)."""
    from dfmsd_cli.models.registry import get_spec

    spec = get_spec(model)
    if spec.head in MMDET_HEADS or spec.head not in MMDET_VARIANTS:
        return None
    backbone = spec.backbone
    if spec.head == "fcos":
        backbone = CAFFE_FCOS.get(backbone, backbone)
    return f"{MMDET_VARIANTS[spec.head][0]}_{backbone}"


def check_mmdet_target(model: str) -> None:
    """Refuse a target whose forward differs from MMDetection's, naming the one that matches.

    Such a conversion would succeed key by key and then compute something else (measured with
    ``tools/mmdet_parity.py``: ``frcnn_r50`` 0/100 detections, ``mrcnn_swin_t`` 5/100).
    """
    from dfmsd_cli.models.registry import get_spec

    spec = get_spec(model)
    if spec.head in MMDET_HEADS:
        return
    right = mmdet_equivalent(model)
    if right is None:
        heads = ", ".join(f"{h}_*" for h in MMDET_HEADS)
        raise UserError(
            f"--model {model} has no MMDetection counterpart: MMDetection checkpoints convert "
            f"only into models that reproduce MMDetection's forward ({heads})"
        )
    why = MMDET_VARIANTS[spec.head][1]
    extra = ""
    if spec.head == "fcos" and right.endswith("_caffe"):
        extra = f" (MMDetection's GN-head FCOS configs are caffe-style; {right[:-6]} for a "
        extra += "pytorch-style one)"
    raise UserError(
        f"--model {model} is torchvision's {spec.head}, whose forward differs from "
        f"MMDetection's ({why}): MMDetection weights would load but compute something else; "
        f"use --model {right}{extra}"
    )


@dataclass
class ConversionReport:
    """What a conversion did. ``ok`` iff nothing is unmapped, missing or mismatched."""

    model: str = ""
    mapped: int = 0
    unmapped: list[str] = field(default_factory=list)  # source keys with no target
    missing: list[str] = field(default_factory=list)  # target keys nothing mapped to
    mismatched: list[str] = field(default_factory=list)  # "src -> dst: (a) vs (b)"
    ignored: list[str] = field(default_factory=list)  # derived buffers (num_batches_tracked...)

    @property
    def ok(self) -> bool:
        return not (self.unmapped or self.missing or self.mismatched)

    def summary(self, limit: int = 8) -> str:
        parts = [f"{self.mapped} tensors mapped"]
        for name in ("unmapped", "missing", "mismatched"):
            items = getattr(self, name)
            if items:
                more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
                parts.append(f"{len(items)} {name}: {', '.join(items[:limit])}{more}")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


# --------------------------------------------------------------------------------- loading
class _Opaque:
    """Stand-in for every class a checkpoint's ``meta`` references beyond plain tensors and
    containers (mmengine's message hub, numpy scalars...): built without running its code."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``; globals it refuses are mapped to :class:`_Opaque`,
    so nothing outside torch's safe set ever executes (MMDetection 3.x pickles mmengine
    objects into ``meta``)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        with torch.serialization.safe_globals([(_Opaque, n) for n in names]):
            return torch.load(path, map_location="cpu", weights_only=True)


def config_text(meta: Mapping[str, Any]) -> str | None:
    """The training config MMDetection stores in a checkpoint's meta (3.x ``cfg``, 2.x
    ``config``), as text; None when absent (some published files drop it)."""
    text = meta.get("cfg") or meta.get("config")
    return text if isinstance(text, str) else None


def check_config(meta: Mapping[str, Any], model: str) -> None:
    """Refuse what the state dict cannot tell but the stored config can: a caffe-style
    ResNet (same keys as pytorch style, stride on conv1, BGR input) converted into a
    pytorch-style model or the reverse, and FCOS's ``norm_on_bbox`` / ``centerness_on_reg``
    variants (same keys, different outputs)."""
    from dfmsd_cli.models.registry import get_spec, list_models

    text = config_text(meta)
    if text is None:
        return
    spec = get_spec(model)
    style = re.search(r"style\s*[=:]\s*['\"](caffe|pytorch)['\"]", text)
    if style and spec.backbone in ("r50", "r101", "r50_caffe", "r101_caffe"):
        caffe = style.group(1) == "caffe"
        if caffe != spec.backbone.endswith("_caffe"):
            base = spec.backbone.removesuffix("_caffe")
            right = f"{spec.head}_{base}_caffe" if caffe else f"{spec.head}_{base}"
            hint = f"use --model {right}" if right in list_models() else "no dfmsd model has it"
            raise UserError(
                f"the checkpoint's config has a {style.group(1)}-style ResNet but {model} is "
                f"{'pytorch' if caffe else 'caffe'}-style (stride on a different conv, other "
                f"input normalisation): {hint}"
            )
    if spec.head == "mmfcos":
        for flag in ("norm_on_bbox", "centerness_on_reg"):
            if re.search(rf"{flag}\s*[=:]\s*True", text):
                raise UserError(
                    f"the checkpoint's FCOS config sets {flag}=True; {model} is MMDetection's "
                    "plain FCOS head (distances in pixels, centerness on the classification "
                    "branch): only the fcos_*_gn-head configs without these options convert"
                )


def load_mmdet_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read an MMDetection ``.pth``: returns (state_dict, meta). Accepts a bare state dict."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found: pass the MMDetection .pth file")
    try:
        obj = _torch_load(path)
    except Exception as exc:
        raise UserError(
            f"cannot read {path} as a PyTorch checkpoint ({type(exc).__name__}: {exc}): "
            "pass an MMDetection .pth file"
        ) from exc
    if not isinstance(obj, Mapping):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    state = obj.get("state_dict", obj)
    meta = obj.get("meta", {}) if "state_dict" in obj else {}
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"{path} has no tensor state_dict: pass an MMDetection .pth file")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    if any(k.startswith("backbone.body.") for k in state):
        raise UserError(
            f"{path} is already in dfmsd/torchvision layout: load it with --weights directly"
        )
    return dict(state), dict(meta) if isinstance(meta, Mapping) else {}


def class_names(meta: Mapping[str, Any]) -> list[str] | None:
    """Class names from MMDetection 3.x ``meta['dataset_meta']['classes']`` or 2.x ``CLASSES``."""
    ds = meta.get("dataset_meta")
    names = ds.get("classes") if isinstance(ds, Mapping) else None
    names = names or meta.get("CLASSES")
    return [str(n) for n in names] if names else None


def infer_num_classes(src: Mapping[str, Tensor]) -> int | None:
    """K from the classifier shapes: softmax heads have K+1 rows; RetinaNet 9K;
    FCOS/GFL/RepPoints K."""
    for key, t in src.items():
        if key.endswith("fc_cls.weight"):
            return t.shape[0] - 1
        if key == "bbox_head.retina_cls.weight":
            return t.shape[0] // 9
        if key in ("bbox_head.conv_cls.weight", "bbox_head.gfl_cls.weight",
                   "bbox_head.reppoints_cls_out.weight"):  # fmt: skip
            return t.shape[0]
    return None


# ------------------------------------------------------------------------------ conversion
def convert_state_dict(
    src: Mapping[str, Tensor], target: Mapping[str, Tensor], model: str = ""
) -> tuple[dict[str, Tensor], ConversionReport]:
    """Map MMDetection ``src`` onto the keys/shapes of ``target`` (a model's state dict, may be
    on the ``meta`` device). Returns the converted tensors (only mapped keys) and the report."""
    # distinct lateral indices (a GN FPN has 3 tensors per lateral conv, a plain one 2)
    num_laterals = len({k.split(".")[2] for k in src if k.startswith("neck.lateral_convs.")}) or 4
    rules = build_rules(num_laterals)
    out: dict[str, Tensor] = {}
    report = ConversionReport(model=model)
    for key, tensor in src.items():
        if IGNORABLE.search(key):
            report.ignored.append(key)  # derived buffers: the target computes its own
            continue
        dst, fn = None, None
        for pattern, repl, transform in rules:
            m = pattern.match(key)
            if m:
                dst, fn = repl(m), transform
                break
        if dst is None or dst not in target:
            alt = fallback_key(key)
            if alt in target:
                dst, fn = alt, None
        if dst is None or dst not in target:
            report.unmapped.append(key)
            continue
        want = tuple(target[dst].shape)
        value = fn(tensor, want) if fn is not None else tensor
        if tuple(value.shape) != want:
            report.mismatched.append(f"{key} -> {dst}: {tuple(tensor.shape)} vs {want}")
            continue
        if dst in out:
            report.mismatched.append(f"{key} -> {dst}: mapped twice")
            continue
        out[dst] = value.to(target[dst].dtype)
        report.mapped += 1
    for dst in target:
        if dst in out:
            continue
        if dst.endswith("num_batches_tracked") or IGNORABLE.search(dst):
            continue  # buffers the model derives itself
        report.missing.append(dst)
    return out, report


def convert_mmdet(
    checkpoint: str | os.PathLike,
    model: str,
    *,
    num_classes: int | None = None,
    allow_partial: bool = False,
    options: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], ConversionReport]:
    """Convert an MMDetection ``checkpoint`` for registry ``model``.

    Returns ``(dfmsd_checkpoint_dict, report)``. A partial conversion raises
    :class:`UserError` unless ``allow_partial``; so does a ``model`` whose forward differs from
    MMDetection's (torchvision's ``retina/fcos/frcnn/mrcnn_*``), naming the one to use.
    """
    from dfmsd_cli.data.geometry import Geometry
    from dfmsd_cli.models.registry import build_model

    check_mmdet_target(model)
    src, meta = load_mmdet_checkpoint(checkpoint)
    check_config(meta, model)
    names = class_names(meta)
    k = num_classes or (len(names) if names else None) or infer_num_classes(src)
    if not k:
        raise UserError(f"cannot tell the class count of {checkpoint}: pass --num-classes K")
    opts = dict(options or {})
    with torch.device("meta"):
        shell = build_model(model, num_classes=k, **opts)
    target = _full_state(shell)
    converted, report = convert_state_dict(src, target, model)
    if not report.ok and not allow_partial:
        fix = "check --model matches the MMDetection config, or pass --allow-partial"
        raise UserError(
            f"{checkpoint} does not convert fully to {model} ({report.summary()}): {fix}"
        )
    # Every key of the built model is written: derived buffers (Swin's
    # relative_position_index, BN counters) come from the model itself, so that the strict
    # `--weights` load accepts the file; with --allow-partial, missing tensors keep their init.
    absent = [key for key in target if key not in converted]
    if absent:
        fresh = _full_state(build_model(model, num_classes=k, **opts))
        for key in absent:
            converted[key] = fresh[key]
    state = {key: converted[key] for key in target}
    ckpt = {
        "format": "dfmsd",
        "version": 1,
        "model": model,
        "num_classes": k,
        "categories": _categories(k, names),
        "geometry": Geometry().to_dict(),
        "model_options": opts,
        "state_dict": state,
        "converted_from": {
            "source": str(checkpoint),
            "format": "mmdetection",
            "report": report.to_dict(),
            "partial": not report.ok,
        },
    }
    return ckpt, report


def _full_state(model: torch.nn.Module) -> dict[str, Tensor]:
    return dict(model.state_dict(keep_vars=False))


def _categories(k: int, names: list[str] | None) -> list[dict[str, Any]]:
    """COCO ids/names when the checkpoint is a COCO model (80 classes), else 1..K."""
    coco_names = [c["name"] for c in COCO_CATEGORIES]
    if k == len(COCO_CATEGORIES) and (names is None or list(names) == coco_names):
        return [dict(c) for c in COCO_CATEGORIES]
    names = names or [f"class_{i}" for i in range(1, k + 1)]
    return [{"id": i + 1, "name": n} for i, n in enumerate(names[:k])]

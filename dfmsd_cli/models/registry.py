"""The model registry: names ``{head}_{backbone}`` built from separately registered parts.

Heads (``retina``, ``fcos``, ``frcnn``, ``mrcnn``, later ``cmr``, ``gfl``) and backbones
(``r18`` ... ``x101``, ``tiny``, later ``swin_t``) are registered independently; every
head x backbone pair is a model. ``register_model`` adds one-off names with their own builder.

Builder signatures (keyword options are routed by name to whichever builder accepts them):

* backbone: ``builder(strides: tuple[int, ...], extra: str, **options) -> nn.Module`` returning
  an ``OrderedDict`` of ``len(strides)`` maps (ascending stride) with attribute ``out_channels``;
  ``extra`` names the levels above C5 the head wants (``"p6p7"`` or ``"maxpool"``).
* head: ``builder(backbone, num_classes: int, strides: tuple[int, ...], **options) -> Detector``
  (``num_classes`` = K, without background).
* one-off model: ``builder(num_classes: int, **options) -> Detector``.

Modules in ``dfmsd_cli.models`` register on import; the registry imports them all lazily at the
first lookup, so a new module (``cascade.py``, ``swin.py``, ...) needs no edit elsewhere.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from dfmsd_cli.errors import UserError, suggest


@dataclass
class HeadEntry:
    name: str
    builder: Callable[..., nn.Module]
    strides: tuple[int, ...]
    extra: str = "p6p7"
    has_masks: bool = False
    description: str = ""
    backbones: tuple[str, ...] | None = None  # None: any registered backbone
    fixed: dict[str, Any] = field(default_factory=dict)  # builder kwargs users cannot set
    family: str | None = None  # one_stage / two_stage: distillation defaults (None: none)


@dataclass
class BackboneEntry:
    name: str
    builder: Callable[..., nn.Module]
    channels: int
    description: str = ""
    head_defaults: dict[str, Any] = field(default_factory=dict)  # e.g. smaller RoI heads


@dataclass
class ModelSpec:
    """One buildable model. ``published_ap`` / ``checkpoint``: a public COCO checkpoint's box AP
    and the file that converts to (or loads into) this model, when one exists."""

    name: str
    head: str
    backbone: str
    strides: tuple[int, ...]
    channels: int
    has_masks: bool = False
    description: str = ""
    published_ap: float | None = None
    checkpoint: str | None = None
    family: str | None = None  # one_stage / two_stage (the head's): distillation defaults
    builder: Callable[..., nn.Module] | None = field(default=None, repr=False, compare=False)
    _params: dict[int, int] = field(default_factory=dict, repr=False, compare=False)

    def build(self, num_classes: int, **options: Any) -> nn.Module:
        if self.builder is None:
            raise RuntimeError(f"model {self.name} has no builder")
        model = self.builder(num_classes, **options)
        model.name = self.name
        model.options = dict(options)
        return model

    def num_parameters(self, num_classes: int = 80) -> int:
        """Parameter count with default options, built on the ``meta`` device (no memory, no
        init cost, see ``_SkipMetaInit``) and cached."""
        if num_classes not in self._params:
            with torch.device("meta"), _SkipMetaInit():
                model = self.build(num_classes)
            self._params[num_classes] = sum(p.numel() for p in model.parameters())
        return self._params[num_classes]

    def to_dict(self, with_params: bool = False) -> dict[str, Any]:
        d = {
            "name": self.name,
            "head": self.head,
            "backbone": self.backbone,
            "strides": list(self.strides),
            "channels": self.channels,
            "has_masks": self.has_masks,
            "published_ap": self.published_ap,
            "checkpoint": self.checkpoint,
            "family": self.family,
            "description": self.description,
        }
        if with_params:
            d["parameters"] = self.num_parameters()
        return d


class _SkipMetaInit(TorchFunctionMode):
    """Make in-place ops on meta tensors no-ops while building for a parameter count.

    Weight initialisation (``normal_``, ``uniform_``, ``fill_`` ...) never changes shapes, and
    on meta tensors it runs through slow Python decompositions (~2 ms per call, seconds for a
    ResNet-101). Active only inside ``ModelSpec.num_parameters``; never used for real models.
    """

    # torch.nn.init functions and the in-place tensor ops they use. A mode is disabled inside
    # its own handler, so the nn.init functions themselves must be caught, not only their ops.
    INIT_OPS = frozenset(
        "kaiming_uniform_ kaiming_normal_ xavier_uniform_ xavier_normal_ trunc_normal_"
        " constant_ zeros_ ones_ eye_ dirac_ orthogonal_ sparse_"
        " normal_ uniform_ fill_ zero_ copy_ erfinv_ mul_ add_ sub_ div_ clamp_ exp_ log_"
        " bernoulli_ random_ exponential_".split()
    )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in self.INIT_OPS:
            target = args[0] if args else kwargs.get("tensor")  # nn.init passes tensor=...
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


_HEADS: dict[str, HeadEntry] = {}
_BACKBONES: dict[str, BackboneEntry] = {}
_MODELS: dict[str, ModelSpec] = {}  # one-off names
_ANNOTATIONS: dict[str, dict[str, Any]] = {}
_SPEC_CACHE: dict[str, ModelSpec] = {}
_LOADED = False


def register_head(
    name: str,
    builder: Callable[..., nn.Module],
    *,
    strides: tuple[int, ...],
    extra: str = "p6p7",
    has_masks: bool = False,
    description: str = "",
    backbones: tuple[str, ...] | None = None,
    fixed: dict[str, Any] | None = None,
    family: str | None = None,
) -> None:
    """Register a detection head; it pairs with every backbone (or only ``backbones``).

    ``fixed``: keyword arguments always passed to ``builder`` (one class, several heads).
    ``family``: ``one_stage`` or ``two_stage``, the student family whose distillation
    defaults its models get (``dfmsd_cli.distill.methods``); None: not a distillable student.
    """
    if family not in (None, "one_stage", "two_stage"):
        raise ValueError(f"head {name!r}: family must be one_stage or two_stage, got {family!r}")
    if "_" in name:
        raise ValueError(f"head name {name!r} must not contain '_' (names are head_backbone)")
    _HEADS[name] = HeadEntry(
        name, builder, tuple(strides), extra, has_masks, description, backbones, fixed or {},
        family,
    )  # fmt: skip
    _SPEC_CACHE.clear()


def register_backbone(
    name: str,
    builder: Callable[..., nn.Module],
    *,
    channels: int,
    description: str = "",
    head_defaults: dict[str, Any] | None = None,
) -> None:
    """Register a backbone+FPN; ``head_defaults`` are head options used unless overridden."""
    _BACKBONES[name] = BackboneEntry(name, builder, int(channels), description, head_defaults or {})
    _SPEC_CACHE.clear()


def register_model(
    name: str,
    builder: Callable[..., nn.Module],
    *,
    head: str,
    backbone: str,
    strides: tuple[int, ...],
    channels: int,
    has_masks: bool = False,
    description: str = "",
    published_ap: float | None = None,
    checkpoint: str | None = None,
    family: str | None = None,
) -> None:
    """Register a one-off model name with its own ``builder(num_classes, **options)``."""
    _MODELS[name] = ModelSpec(
        name, head, backbone, tuple(strides), int(channels), has_masks, description,
        published_ap, checkpoint, family, builder=builder,
    )  # fmt: skip
    _SPEC_CACHE.clear()


def annotate_model(
    name: str, *, published_ap: float | None = None, checkpoint: str | None = None
) -> None:
    """Attach a public checkpoint's COCO box AP and file name to a (head, backbone) model."""
    _ANNOTATIONS[name] = {"published_ap": published_ap, "checkpoint": checkpoint}
    _SPEC_CACHE.clear()


def _load_all() -> None:
    """Import every module of ``dfmsd_cli.models`` once so that each registers its parts."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    package = __name__.rpartition(".")[0]  # not ``import dfmsd_cli.models``: no import circle
    for info in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda i: i.name):
        importlib.import_module(f"{package}.{info.name}")


def _accepted(fn: Callable[..., Any]) -> tuple[set[str], bool]:
    params = inspect.signature(fn).parameters.values()
    names = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


def _combo_builder(head: HeadEntry, bb: BackboneEntry, name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int, **options: Any) -> nn.Module:
        bb_names, _ = _accepted(bb.builder)
        head_names, head_var = _accepted(head.builder)
        bb_names -= {"strides", "extra"}
        head_names -= {"backbone", "num_classes", "strides", *head.fixed}
        bb_opts = {k: v for k, v in options.items() if k in bb_names}
        head_opts = {k: v for k, v in bb.head_defaults.items() if k in head_names}
        unknown = []
        for key, val in options.items():
            if key in bb_names:
                continue
            if key in head_names or head_var:
                head_opts[key] = val
            else:
                unknown.append(key)
        if unknown:
            valid = ", ".join(sorted(bb_names | head_names)) or "none"
            raise UserError(
                f"unknown option(s) {', '.join(unknown)} for model {name}: "
                f"valid options are {valid}"
            )
        backbone = bb.builder(strides=head.strides, extra=head.extra, **bb_opts)
        return head.builder(backbone, num_classes, strides=head.strides, **head_opts, **head.fixed)

    return build


def _all_specs() -> dict[str, ModelSpec]:
    _load_all()
    if _SPEC_CACHE:
        return _SPEC_CACHE
    specs: dict[str, ModelSpec] = {}
    for head in _HEADS.values():
        for bb in _BACKBONES.values():
            if head.backbones is not None and bb.name not in head.backbones:
                continue
            name = f"{head.name}_{bb.name}"
            specs[name] = ModelSpec(
                name=name,
                head=head.name,
                backbone=bb.name,
                strides=head.strides,
                channels=bb.channels,
                has_masks=head.has_masks,
                description=f"{head.description} / {bb.description}".strip(" /"),
                family=head.family,
                builder=_combo_builder(head, bb, name),
            )
    specs.update(_MODELS)
    for name, ann in _ANNOTATIONS.items():
        if name in specs:
            for key, val in ann.items():
                if val is not None:
                    setattr(specs[name], key, val)
    _SPEC_CACHE.update(dict(sorted(specs.items())))
    return _SPEC_CACHE


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted model names; ``pattern`` is an fnmatch filter such as ``"retina_*"``."""
    names = list(_all_specs())
    if pattern:
        import fnmatch

        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    return names


def list_heads() -> list[str]:
    _load_all()
    return sorted(_HEADS)


def list_backbones() -> list[str]:
    _load_all()
    return sorted(_BACKBONES)


def get_spec(name: str) -> ModelSpec:
    """The spec of ``name``; an unknown name raises a UserError with close matches."""
    specs = _all_specs()
    if name not in specs:
        raise UserError(
            f"unknown model '{name}'{suggest(name, specs)}: run 'dfmsd models' to list the "
            "available names ({head}_{backbone})"
        )
    return specs[name]


def build_model(name: str, num_classes: int, **options: Any) -> nn.Module:
    """Build ``name`` for K = ``num_classes`` foreground classes (labels 1..K).

    ``options`` go to the backbone builder (e.g. ``norm="gn"``, ``frozen_stages=-1``) or the
    head builder (e.g. ``score_thresh=0.05``), whichever accepts them.
    """
    spec = get_spec(name)
    if int(num_classes) < 1:
        raise UserError(f"num_classes must be >= 1, got {num_classes}: check the dataset")
    return spec.build(int(num_classes), **options)


def parse_options(items: list[str] | None) -> dict[str, Any]:
    """``["norm=gn", "frozen_stages=-1"]`` -> ``{"norm": "gn", "frozen_stages": -1}``.

    Values are parsed as int, float, true/false/none, or kept as strings (for CLI flags).
    """
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"model option '{item}' is not KEY=VALUE: e.g. norm=gn")
        out[key.strip().replace("-", "_")] = _parse_value(raw.strip())
    return out


def _parse_value(raw: str) -> Any:
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw

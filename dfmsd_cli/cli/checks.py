"""Parse-time checks of every count and size option, for all commands at once.

A count option (``--batch-size``, ``--epochs``, ``--num-workers``, ``--num-images``, ``--topk``,
``--block``, ``--levels``, ...) is checked by NAME, whatever command declares it: ``install``
attaches one typer callback to each such option, so ``train --batch-size 0`` stops before any
work with ``error: --batch-size must be at least 1 (the number of images per step), got 0:
pass a value >= 1`` (exit 2); values read from ``--config`` files pass the same check. Comma
lists (``--epochs 12,12``, ``--levels 8,16``, ``--steps 8,11``) are checked item by item,
``--img-scale`` must be two positive integers, and float options with a plain range (``--lr``,
loss weights, ``--score-thr``) are checked the same way (``FLOATS``). ``tests/test_cli_checks.py``
fails when a command gains an int or float option that is classified nowhere here. Options
declared with ``dfmsd_cli.utils.options.opt(count=...)`` register their check here themselves
(``declare_count``).
"""

from __future__ import annotations

import inspect
import types
from typing import Any, Union, get_args, get_origin

import typer
from typer.models import OptionInfo

from dfmsd_cli.errors import UserError

# parameter name -> (smallest value, what the value counts). Applies to int options and to
# comma lists of ints (str options) of that name in every command.
COUNTS: dict[str, tuple[int, str]] = {
    "batch_size": (1, "the number of images per step"),
    "epochs": (1, "the number of epochs, per stage"),
    "num_workers": (0, "the number of DataLoader worker processes; 0 loads in the main process"),
    "val_images": (1, "the number of validation images"),
    "max_images": (1, "the number of images to use"),
    "topk": (1, "the number of teacher detections kept per image"),
    "block": (1, "the number of images per chunk of the small arrays"),
    "levels": (1, "an FPN stride"),
    "steps": (1, "an epoch or step count"),
    "writer_threads": (1, "the number of store writer threads"),
    "threads": (1, "the number of torch threads"),
    "repeats": (1, "the number of measurement rounds"),
    "warmup_iters": (0, "the number of warm-up iterations"),
    "save_interval": (0, "a step interval; 0 saves at each epoch only"),
    "max_steps": (1, "the number of optimizer steps before stopping"),
    "min_size": (32, "an image side in pixels"),
    "max_size": (32, "an image side in pixels"),
    "max_objects": (1, "the most objects per image"),
    "num_classes": (1, "the number of classes"),
    "keepbits": (1, "a number of mantissa bits kept"),
    "pca": (1, "a number of principal components kept per level"),
    "probe_images": (0, "the number of images --dry-run measures the encodings on; 0: none"),
    "kd_warmup": (0, "the number of distillation warm-up iterations; 0 is off"),
    "adv_eps": (0, "the perturbation bound in grey levels; 0 stores no adv view"),
    "adv_steps": (1, "the number of attack steps (1 = FGSM)"),
    "dpi": (10, "a figure resolution in dots per inch"),
    "index": (0, "an image index in the store"),
    "store_concurrency": (1, "the most store requests in flight per process"),
}
# Integer options that are not counts (any value is meaningful).
NOT_COUNTS = frozenset({"seed", "image"})  # image: a COCO image id
# float option name -> (low, low is allowed, high or None, what the value is).
FLOATS: dict[str, tuple[float, bool, float | None, str]] = {
    "lr": (0.0, False, None, "the SGD learning rate"),
    "grad_clip": (0.0, True, None, "a gradient-norm bound; 0 disables clipping"),
    "alpha": (0.0, True, None, "a loss weight"),
    "beta": (0.0, True, None, "a loss weight"),
    "gamma": (0.0, True, None, "a loss weight"),
    "adv_weight": (0.0, True, None, "a loss weight"),
    "score_thr": (0.0, True, 1.0, "a detection score threshold"),
}
# Float options whose range the library checks with their siblings (one message for the set).
FLOATS_CHECKED_ELSEWHERE = frozenset(
    {"enhance_theta", "enhance_p", "enhance_sigma", "crop_min", "crop_max", "lambda_s",
     "lambda_c", "tau"}
)  # fmt: skip
PAIRS = {"img_scale": "the keep-ratio resize bound LONG,SHORT"}
# Options generated from a registry whose own check validates them before any work (the
# distillation methods' MethodOption.check, run by method_config): declared by the generator.
REGISTRY_CHECKED: set[str] = set()


def declare_registry_checked(name: str) -> None:
    """Exempt option ``name`` from the classification here: its registry checks its value."""
    REGISTRY_CHECKED.add(name)


def declare_count(name: str, minimum: int, meaning: str) -> None:
    """Register the check of count option ``name`` declared at its field (``opt(count=...)``);
    one name has one minimum in every command."""
    old = COUNTS.setdefault(name, (minimum, meaning))
    if old[0] != minimum:
        raise TypeError(
            f"--{name}: minimum {minimum} here, {old[0]} elsewhere: one meaning per name"
        )


def _flag(param: Any, name: str) -> str:
    opts = [o for o in getattr(param, "opts", ()) if o.startswith("--")]
    return opts[0] if opts else "--" + name.replace("_", "-")


def check_count(flag: str, value: Any, minimum: int, meaning: str) -> None:
    """Raise a one-line UserError unless ``value`` (an int, or a comma list of ints) is a valid
    count of at least ``minimum``; ``None`` (option not given) passes."""
    if value is None or value == "":
        return
    if isinstance(value, str):
        items = [t.strip() for t in value.split(",") if t.strip()]
        try:
            numbers = [int(t) for t in items]
        except ValueError as exc:
            raise UserError(
                f"{flag} must be comma-separated integers ({meaning}), got '{value}'"
            ) from exc
        if not numbers:
            raise UserError(f"{flag} is empty: give at least one integer ({meaning})")
    else:
        numbers = [int(value)]
    bad = [n for n in numbers if n < minimum]
    if bad:
        raise UserError(
            f"{flag} must be at least {minimum} ({meaning}), got {bad[0]}: pass a value >= {minimum}"
        )


def check_pair(flag: str, value: Any, meaning: str) -> None:
    """``LONG,SHORT``: exactly two positive integers."""
    if value is None or value == "":
        return
    parts = str(value).replace("x", ",").split(",")
    try:
        numbers = [int(t) for t in parts]
    except ValueError:
        numbers = []
    if len(numbers) != 2 or min(numbers) < 1:
        raise UserError(
            f"{flag} must be two positive integers like 1333,800 ({meaning}), got '{value}'"
        )


def check_float(flag: str, value: Any, rule: tuple[float, bool, float | None, str]) -> None:
    """Raise a one-line UserError unless ``value`` lies in the range ``rule`` describes."""
    if value is None:
        return
    low, low_ok, high, meaning = rule
    v = float(value)
    if v < low or (v == low and not low_ok) or (high is not None and v > high) or v != v:
        bound = (">= " if low_ok else "> ") + f"{low:g}" + (f" and <= {high:g}" if high else "")
        raise UserError(f"{flag} must be {bound} ({meaning}), got {value}: pass a value {bound}")


def _float_callback(name: str):
    def callback(param: typer.CallbackParam, value: Any) -> Any:
        check_float(_flag(param, name), value, FLOATS[name])
        return value

    return callback


def _count_callback(name: str):
    minimum, meaning = COUNTS[name]

    def callback(param: typer.CallbackParam, value: Any) -> Any:
        check_count(_flag(param, name), value, minimum, meaning)
        return value

    return callback


def _pair_callback(name: str):
    def callback(param: typer.CallbackParam, value: Any) -> Any:
        check_pair(_flag(param, name), value, PAIRS[name])
        return value

    return callback


def _base_type(annotation: Any) -> Any:
    """``int | None`` -> int; anything else unchanged."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def iter_options(app: typer.Typer):
    """Yield (command name, parameter name, base type, OptionInfo) over every command."""
    for info in app.registered_commands:
        name = info.name or info.callback.__name__
        for p in inspect.signature(info.callback, eval_str=True).parameters.values():
            if isinstance(p.default, OptionInfo):
                yield name, p.name, _base_type(p.annotation), p.default
    for group in app.registered_groups:
        for cmd, pname, base, opt in iter_options(group.typer_instance):
            yield f"{group.name} {cmd}", pname, base, opt


def install(app: typer.Typer) -> None:
    """Attach the count / pair check to every matching option of every command of ``app``."""
    for _cmd, pname, base, opt in iter_options(app):
        attach(pname, base, opt)


def attach(pname: str, base: Any, opt: OptionInfo) -> None:
    """Attach the check of option ``pname`` (of value type ``base``) to ``opt``, if any (the
    generated commands call this as they build their parameters)."""
    if opt.callback is not None:
        return
    if pname in COUNTS and base in (int, str):
        opt.callback = _count_callback(pname)
    elif pname in PAIRS and base is str:
        opt.callback = _pair_callback(pname)
    elif pname in FLOATS and base is float:
        opt.callback = _float_callback(pname)

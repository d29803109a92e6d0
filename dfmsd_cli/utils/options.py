"""Options defined once: a dataclass field carries a command option's type, default and help.

``opt(default, help, flag=..., short=...)`` is a ``dataclasses.field`` whose metadata the CLI
reads (``dfmsd_cli.cli.options.command``) to generate the typer parameters, the ``--config``
TOML keys (the field names) and the ``config.json`` record (``record``). It lives at the ground
layer so that library option dataclasses (``TrainOptions``, ``DistillOptions``) can use it too.

Shared groups are plain ``@dataclass(kw_only=True)`` classes composed by inheritance; a command
that needs another default or help for a group field re-declares it with ``reuse``::

    @dataclass(kw_only=True)
    class EvalOptions(DataOptions, DeviceOptions):
        split: str = reuse(DataOptions, "split", default="val2017")
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import Any

_NO = dataclasses.MISSING


def opt(
    default: Any = _NO,
    help: str | Callable[[], str] = "",
    *,
    flag: str | None = None,
    short: str | None = None,
    argument: bool = False,
    hidden: bool = False,
    deprecated: tuple[str, ...] = (),
    repeatable: bool = False,
    count: tuple[int, str] | None = None,
    parse: Callable[[str], Any] | None = None,
    negate: bool = False,
    options_from: Callable[[], type] | None = None,
) -> Any:
    """A command option as a dataclass field.

    ``default``: the value when the flag is absent (omit it for a required option);
    ``help``: the text, or a function returning it when the command is built;
    ``flag``: the long flag (default ``--field-name``), or ``--on/--off`` for a switch pair;
    ``short``: e.g. ``-b``; ``argument``: a positional argument instead of a flag;
    ``deprecated``: old spellings accepted with a one-line warning (hidden from ``--help``);
    ``repeatable``: a list given by repeating the flag (the default is copied per instance);
    ``count``: (minimum, what it counts) — the parse-time check of ``cli/checks.py`` for this
    option name (an int, or a comma list of ints);
    ``parse``: the option is given as text (``"1333,800"``, ``"12,12"``) and ``parse(text)`` is
    the field's value: ``default`` is that text (the flag's default) and the field's default is
    ``parse(default)``; the CLI parses what the user typed, Python callers pass the value;
    ``negate``: a bool field given by its negative switch (``flag="--no-eval"`` sets
    ``evaluate=False``; the ``--config`` key is the switch's name, ``no-eval``);
    ``options_from``: a dict field whose keys are options themselves: ``options_from()`` returns
    an option dataclass (made on demand, e.g. from the method registry) whose fields become
    flags, their values are collected in the dict, and ``record`` lists them at the top level.
    """
    meta = {
        "help": help,
        "flag": flag,
        "short": short,
        "argument": argument,
        "hidden": hidden,
        "deprecated": tuple(deprecated),
        "repeatable": repeatable,
        "count": count,
        "parse": parse,
        "negate": negate,
        "options_from": options_from,
    }
    if parse is not None:
        meta["text"] = None if default is _NO else default
        if default is not _NO and default is not None:
            default = parse(default)
    if options_from is not None or isinstance(default, dict):
        value = {} if default is _NO or default is None else dict(default)
        return dataclasses.field(default_factory=lambda: dict(value), metadata=meta)
    if repeatable or isinstance(default, list):
        value = [] if default is _NO or default is None else list(default)
        required = default is _NO
        meta["required"] = required
        return dataclasses.field(default_factory=lambda: list(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


_KEPT = (
    "flag", "short", "argument", "hidden", "deprecated", "repeatable", "count", "parse", "negate",
    "options_from",
)  # fmt: skip


def reuse(cls: type, name: str, **changes: Any) -> Any:
    """Re-declare field ``name`` of group ``cls`` with some of ``opt``'s arguments changed
    (``default=``, ``help=``, ...), keeping the rest (flag, short, ...)."""
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    meta = dict(field.metadata)
    default = meta["text"] if meta.get("parse") else field.default
    if field.default_factory is not _NO:  # type: ignore[misc]
        default = [] if meta.get("required") else field.default_factory()  # type: ignore[misc]
    kw = {k: meta.get(k) for k in _KEPT}
    kw.update({k: v for k, v in changes.items() if k not in ("default", "help")})
    return opt(changes.get("default", default), changes.get("help", meta["help"]), **kw)


def option_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """(field, resolved type) of every option of ``cls``: the command's own fields first, then
    those of its groups (in the order the groups are listed). A field not declared with
    ``opt`` (a plain ``dataclasses.field``) is a library-only setting, not an option."""
    hints = typing.get_type_hints(cls)
    own = list(cls.__dict__.get("__annotations__", {}))
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and "help" in f.metadata}
    ordered = [fields[n] for n in own if n in fields]
    ordered += [f for n, f in fields.items() if n not in own]
    return [(f, hints[f.name]) for f in ordered]


def flag_of(field: dataclasses.Field) -> str:
    """The long flag of ``field`` (``--num-images``), without a ``/--off`` part."""
    flag = field.metadata.get("flag") or "--" + field.name.replace("_", "-")
    return flag.split("/")[0]


def record(options: Any) -> dict[str, Any]:
    """The options as a JSON-ready dict (paths as strings): what ``config.json`` records. The
    entries of an ``options_from`` dict are listed at the top level, like the flags."""

    def plain(v: Any) -> Any:
        if isinstance(v, PurePath):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    out: dict[str, Any] = {}
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if f.metadata.get("options_from"):
            out.update({k: plain(v) for k, v in value.items()})
        else:
            out[f.name] = plain(value)
    return out


# --- shared groups, declared once ------------------------------------------------------------


@dataclasses.dataclass(kw_only=True)
class DataOptions:
    """Where a COCO split is: ``--data ROOT`` (+ ``--split``), or ``--ann`` and ``--images``."""

    data: Path | None = opt(
        None, "COCO root: ROOT/annotations/instances_{split}.json and ROOT/{split}/."
    )
    split: str = opt("train2017", "Split of --data.")
    ann: Path | None = opt(None, "Annotation file (overrides --data).")
    images: Path | None = opt(None, "Image folder (overrides --data).")


@dataclasses.dataclass(kw_only=True)
class GeometryOptions:
    """The keep-ratio resize bound."""

    img_scale: str = opt("1333,800", "Keep-ratio resize bound LONG,SHORT.")


@dataclasses.dataclass(kw_only=True)
class DeviceOptions:
    """Where the model runs and how many processes decode images."""

    device: str = opt("auto", "auto, cpu, cuda or cuda:N.")
    num_workers: int = opt(2, "DataLoader worker processes (0: decode in the main process).")


@dataclasses.dataclass(kw_only=True)
class BatchOptions:
    batch_size: int = opt(2, "Images per batch.", short="-b")


@dataclasses.dataclass(kw_only=True)
class NumImagesOptions:
    """A count of images is ``--num-images`` (``--images`` is a folder)."""

    num_images: int = opt(16, "Number of images.", count=(1, "a number of images"))


@dataclasses.dataclass(kw_only=True)
class OutOptions:
    """``--out`` is always a folder."""

    out: Path = opt(help="Output folder.", short="-o")
    overwrite: bool = opt(False, "Replace what an earlier run wrote in --out.")


@dataclasses.dataclass(kw_only=True)
class JsonOptions:
    """``--json PATH`` always means: also write the result as JSON to PATH."""

    json: Path | None = opt(
        None, "Also write the result as JSON to this file ('-': stdout, instead of the tables)."
    )


@dataclasses.dataclass(kw_only=True)
class OptimOptions:
    """The training recipe of ``train`` and ``distill`` (one loop, ``engine.fit``): SGD with
    linear warm-up and step decay, the run length, its seed and checkpoints. ``--grad-clip``
    defaults per documented recipe: none for ``train`` (MMDetection's detector configs), 35 for
    ``distill`` (the MGD/FGD configs), re-declared there with ``reuse``."""

    epochs: int = opt(12, "Epochs (12 = MMDetection 1x, 24 = 2x).")
    lr: float = opt(0.01, "Base learning rate of SGD.")
    warmup_iters: int = opt(500, "Linear warm-up iterations.")
    grad_clip: float | None = opt(None, "Clip the gradient norm (e.g. 35).")
    weights: str | None = opt(
        None, "Initial weights: a checkpoint, a state dict, or 'torchvision'."
    )
    reinit_heads: bool = opt(
        False,
        "Load only the backbone + FPN of --weights (e.g. a trunk file of "
        "examples/pretrained_students/); the detection heads start fresh from --seed.",
    )
    seed: int = opt(0, "Random seed (weights, order, views).")
    resume: bool = opt(False, "Continue the run in --out from last.pth.")
    save_interval: int = opt(0, "Also checkpoint every N steps (0: each epoch only).")
    max_steps: int | None = opt(None, "Stop after N steps (quick runs, benchmarks).")


@dataclasses.dataclass(kw_only=True)
class ValidationOptions:
    """The evaluation after training (``--no-eval`` skips it)."""

    val_split: str = opt("val2017", "Split evaluated at the end.")
    evaluate: bool = opt(True, "Skip the final evaluation on --val-split.", flag="--no-eval",
                         negate=True)  # fmt: skip


# --- parsers for ``opt(parse=...)``: text as typed on the command line -> the field's value ---


def int_tuple(flag: str) -> Callable[[str], tuple[int, ...]]:
    """A ``parse`` for a comma list of integers (``--epochs 12,12`` -> ``(12, 12)``)."""

    def parse(text: str) -> tuple[int, ...]:
        from dfmsd_cli.errors import UserError

        try:
            return tuple(int(t) for t in str(text).split(",") if t.strip())
        except ValueError as exc:
            raise UserError(f"{flag} must be comma-separated integers, got '{text}'") from exc

    return parse


def name_tuple(text: str) -> tuple[str, ...]:
    """A ``parse`` for a comma list of names (``--stages a,b`` -> ``("a", "b")``; empty: ())."""
    return tuple(t.strip() for t in str(text).split(",") if t.strip())

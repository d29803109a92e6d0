"""Typer commands generated from option dataclasses (``dfmsd_cli.utils.options``).

``@command(app, "eval", EvalOptions)`` over ``def eval_cmd(o: EvalOptions)`` registers a typer
command whose parameters are the dataclass fields: the flag, short flag, help and default come
from each field's ``opt(...)``; a ``--config FILE.toml`` option is added (its keys are the field
names, checked by ``app._load_config``); the parse-time checks of ``cli/checks.py`` attach by
field name as for hand-written commands. The function receives one dataclass instance, and
``record(o)`` is what ``config.json`` stores — one declaration for flag, TOML key and record.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_origin

import typer

from dfmsd_cli.cli import checks
from dfmsd_cli.cli.app import ConfigOption
from dfmsd_cli.utils.options import flag_of, option_fields

_DEPRECATED = "deprecated__"


def _decls(field: dataclasses.Field) -> list[str]:
    meta = field.metadata
    decls = [meta.get("flag") or "--" + field.name.replace("_", "-")]
    if meta.get("short"):
        decls.append(meta["short"])
    return decls


def _default(field: dataclasses.Field) -> Any:
    if field.metadata.get("parse"):  # the text the user would type
        text = field.metadata.get("text")
        return ... if text is None and _required(field) else text
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:  # a list option
        return ... if field.metadata.get("required") else field.default_factory()
    return ...  # required


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


@dataclasses.dataclass(frozen=True)
class Binding:
    """How a typer parameter's value reaches the options: field ``name`` (inside the dict field
    ``into`` for an ``options_from`` option), after ``convert``."""

    name: str
    convert: Callable[[Any], Any] | None = None
    into: str | None = None
    deprecated: tuple[str, ...] = ()
    flag: str = ""  # the flag a deprecated spelling stands for


def _flag_param(field: dataclasses.Field, hint: Any) -> tuple[str, Any, Any, Binding]:
    """(parameter name, annotation, default, binding) of one option field."""
    meta = field.metadata
    if meta.get("negate"):  # --no-eval sets evaluate=False; its parameter is no_eval
        pname = flag_of(field).lstrip("-").replace("-", "_")
        return pname, bool, not field.default, Binding(field.name, lambda v: not v)
    parse = meta.get("parse")
    if parse is not None:
        text = meta.get("text")
        hint = str | None if text is None else str
        return (
            field.name,
            hint,
            _default(field),
            Binding(field.name, lambda v: v if v is None else parse(v)),
        )
    return field.name, hint, _default(field), Binding(field.name)


def parameters(cls: type) -> tuple[list[inspect.Parameter], dict[str, Binding]]:
    """The typer parameters of option dataclass ``cls`` (``--config`` last), and how each
    parameter's value reaches the options (hidden deprecated spellings included)."""
    params: list[inspect.Parameter] = []
    bindings: dict[str, Binding] = {}
    kind = inspect.Parameter.KEYWORD_ONLY

    def add(field: dataclasses.Field, hint: Any, into: str | None = None) -> None:
        meta = field.metadata
        if meta.get("count"):
            checks.declare_count(field.name, *meta["count"])
        pname, annotation, default, binding = _flag_param(field, hint)
        if pname in bindings:
            raise TypeError(f"{cls.__name__}: option {pname!r} is declared twice")
        text = meta.get("help")
        text = text() if callable(text) else text  # a help made on demand (--method's names)
        if meta.get("argument"):
            info = typer.Argument(default, help=text, hidden=meta.get("hidden"))
        else:
            info = typer.Option(default, *_decls(field), help=text, hidden=meta.get("hidden"))
            checks.attach(pname, checks._base_type(annotation), info)
        params.append(inspect.Parameter(pname, kind, default=info, annotation=annotation))
        bindings[pname] = dataclasses.replace(binding, into=into)
        if meta.get("deprecated"):
            if get_origin(hint) is list or hint in (int, float, bool):
                raise TypeError(
                    f"{cls.__name__}.{field.name}: deprecated spellings only for str/Path"
                )
            name = _DEPRECATED + field.name
            old = typer.Option(None, *meta["deprecated"], hidden=True)
            params.append(inspect.Parameter(name, kind, default=old, annotation=hint | None))
            bindings[name] = dataclasses.replace(
                bindings[pname], deprecated=tuple(meta["deprecated"]), flag=flag_of(field)
            )

    for field, hint in option_fields(cls):
        group = field.metadata.get("options_from")
        if group is not None:  # a dict of options made on demand (e.g. the method registry)
            for sub, sub_hint in option_fields(group()):
                add(sub, sub_hint, into=field.name)
        else:
            add(field, hint)
    params.append(inspect.Parameter("config", kind, default=ConfigOption, annotation=str | None))
    return params, bindings


def build(cls: type, values: dict[str, Any]) -> Any:
    """The options instance of ``cls`` from typer's parameter values (``parameters(cls)``)."""
    _, bindings = parameters(cls)
    values = dict(values)
    values.pop("config", None)
    kwargs: dict[str, Any] = {}
    for pname, binding in bindings.items():
        if pname not in values:
            continue
        value = values.pop(pname)
        if binding.deprecated:
            if value is None:
                continue
            old = "/".join(binding.deprecated)
            print(f"warning: {old} is deprecated: use {binding.flag}", file=sys.stderr)
        if binding.convert is not None:
            value = binding.convert(value)
        if binding.into is not None:
            kwargs.setdefault(binding.into, {})[binding.name] = value
        else:
            kwargs[binding.name] = value
    return cls(**kwargs)


class _Command:
    """The callback typer registers: its signature is generated from the option dataclass each
    time typer builds the command, so options made on demand (``options_from``: the method
    registry's) include what was registered after import."""

    def __init__(self, fn: Callable[[Any], None], cls: type) -> None:
        self.fn, self.cls = fn, cls
        self.__doc__ = fn.__doc__
        self.__name__ = fn.__name__
        self.__qualname__ = fn.__qualname__
        self.__module__ = fn.__module__
        self.__annotations__: dict[str, Any] = {}

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.Signature(parameters(self.cls)[0])

    def __call__(self, **values: Any) -> Any:
        return self.fn(build(self.cls, values))


def command(typer_app: typer.Typer, name: str, cls: type, **kw: Any) -> Callable:
    """Decorator: register ``fn(options: cls)`` on ``typer_app`` as command ``name`` with one
    typer parameter per field of ``cls`` (``kw`` goes to ``typer_app.command``)."""

    def decorate(fn: Callable[[Any], None]) -> Callable[[Any], None]:
        parameters(cls)  # declaration errors surface at import
        typer_app.command(name, **kw)(_Command(fn, cls))
        fn.options = cls  # type: ignore[attr-defined]
        return fn

    return decorate


def emit_json(result: Any, path: Path | str | None) -> bool:
    """``--json PATH``: write ``result`` as JSON to PATH (atomically), or to stdout for ``-``.
    Returns True when stdout got the JSON (the caller then prints no table there)."""
    if path is None:
        return False
    text = json.dumps(result, indent=2, default=str)
    if str(path) == "-":
        typer.echo(text)
        return True
    from dfmsd_cli.utils.io import atomic_write_text

    atomic_write_text(Path(path), text + "\n")
    return False

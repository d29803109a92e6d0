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
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:  # a list option
        return ... if field.metadata.get("required") else field.default_factory()
    return ...  # required


def parameters(cls: type) -> tuple[list[inspect.Parameter], dict[str, dataclasses.Field]]:
    """The typer parameters of option dataclass ``cls`` (``--config`` last), and the hidden
    parameters of deprecated spellings mapped to the field they feed."""
    params, deprecated = [], {}
    for field, hint in option_fields(cls):
        meta, default = field.metadata, _default(field)
        if meta.get("count"):
            checks.declare_count(field.name, *meta["count"])
        if meta.get("argument"):
            info = typer.Argument(default, help=meta.get("help"), hidden=meta.get("hidden"))
        else:
            info = typer.Option(
                default, *_decls(field), help=meta.get("help"), hidden=meta.get("hidden")
            )
        kind = inspect.Parameter.KEYWORD_ONLY
        params.append(inspect.Parameter(field.name, kind, default=info, annotation=hint))
        if meta.get("deprecated"):
            if get_origin(hint) is list or hint in (int, float, bool):
                raise TypeError(
                    f"{cls.__name__}.{field.name}: deprecated spellings only for str/Path"
                )
            name = _DEPRECATED + field.name
            old = typer.Option(None, *meta["deprecated"], hidden=True)
            params.append(inspect.Parameter(name, kind, default=old, annotation=hint | None))
            deprecated[name] = field
    params.append(inspect.Parameter("config", kind, default=ConfigOption, annotation=str | None))
    return params, deprecated


def command(typer_app: typer.Typer, name: str, cls: type, **kw: Any) -> Callable:
    """Decorator: register ``fn(options: cls)`` on ``typer_app`` as command ``name`` with one
    typer parameter per field of ``cls`` (``kw`` goes to ``typer_app.command``)."""

    def decorate(fn: Callable[[Any], None]) -> Callable[[Any], None]:
        params, deprecated = parameters(cls)

        def wrapper(**values: Any) -> None:
            values.pop("config", None)
            for pname, field in deprecated.items():
                value = values.pop(pname)
                if value is not None:
                    old = "/".join(field.metadata["deprecated"])
                    print(f"warning: {old} is deprecated: use {flag_of(field)}", file=sys.stderr)
                    values[field.name] = value
            return fn(cls(**values))

        wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        wrapper.__doc__ = fn.__doc__
        wrapper.__name__ = fn.__name__
        wrapper.__module__ = fn.__module__
        typer_app.command(name, **kw)(wrapper)
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

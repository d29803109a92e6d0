"""The typer application, the global ``--debug`` flag and the shared option helpers.

Command modules (``dfmsd_cli/cli/<command>.py``) import ``app`` from here and register
their commands with ``@app.command()``; they stay thin wrappers over library functions.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import typer

from dfmsd_cli.errors import UserError

app = typer.Typer(
    name="dfmsd",
    help="DFMSD: dual-feature-masking stage-wise distillation of object detectors, "
    "with teachers precomputed into a zarr feature store.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

STATE: dict[str, Any] = {"debug": os.environ.get("DFMSD_DEBUG", "") not in ("", "0")}


def _print_version(value: bool) -> None:
    if value:
        from dfmsd_cli import __version__

        typer.echo(f"dfmsd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
    trust_checkpoint: bool = typer.Option(
        False,
        "--trust-checkpoint",
        help="Load .pth files that reference Python objects beyond tensors (their code may "
        "run). Only for files you trust; accepted anywhere on the command line.",
    ),
    version: bool = typer.Option(
        False,
        "--version",
        help="Print the version and exit.",
        callback=_print_version,
        is_eager=True,
    ),
) -> None:
    if debug:
        STATE["debug"] = True
    if trust_checkpoint:
        from dfmsd_cli.utils.safe_load import set_trust

        set_trust(True)


def _load_config(ctx: typer.Context, _param: typer.CallbackParam, value: str | None) -> str | None:
    """Eager ``--config FILE.toml``: its keys become defaults that explicit flags override.

    Keys are option names with ``-`` or ``_`` (``batch-size`` / ``batch_size``); a table named
    after the command (``[train]``) is used when present, otherwise the top level.
    """
    if not value:
        return value
    path = Path(value)
    if not path.is_file():
        raise UserError(f"config file {path} not found: pass an existing TOML file to --config")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"config file {path} is not valid TOML ({exc}): fix its syntax") from exc
    section = data.get(ctx.info_name or "", data)
    if not isinstance(section, dict):
        raise UserError(f"config file {path}: [{ctx.info_name}] must be a table")
    params = {p.name: p for p in ctx.command.params if not p.name.startswith("deprecated__")}
    names = set(params)
    defaults: dict[str, Any] = {}
    for key, val in section.items():
        if isinstance(val, dict):
            continue
        name = key.replace("-", "_")
        if name not in names:
            raise UserError(
                f"config file {path}: unknown option '{key}' for '{ctx.info_name}' "
                f"(valid: {', '.join(sorted(names - {'config'}))})"
            )
        multiple = getattr(params[name], "multiple", False) or params[name].nargs == -1
        if isinstance(val, list) and not multiple:  # a comma list option (--epochs 12,12)
            val = ",".join(str(v) for v in val)
        defaults[name] = val
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


ConfigOption = typer.Option(
    None,
    "--config",
    help="TOML file with defaults for this command's options (flags override it).",
    is_eager=True,
    callback=_load_config,
    expose_value=True,
)


def write_config(out_dir: Path, options: dict[str, Any], command: str) -> Path:
    """Write the resolved options of ``command`` to ``out_dir/config.json`` (atomically)."""
    from dfmsd_cli.engine.rundir import write_config as _write

    return _write(out_dir, options, command)


def parse_int_list(text: str, what: str) -> list[int]:
    """Parse '8,16,32' into [8, 16, 32]; a UserError names ``what`` when malformed."""
    try:
        return [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError as exc:
        raise UserError(f"{what} must be comma-separated integers, got '{text}'") from exc

"""Command-line interface: ``dfmsd <command>``. Each command lives in its own module."""

from __future__ import annotations

import sys

from dfmsd_cli.cli.app import STATE, app
from dfmsd_cli.errors import UserError, one_line, os_error_line

# Importing a module registers its commands on ``app``.
from dfmsd_cli.cli import (  # noqa: E402,F401  isort: skip
    data_cmd,
    models_cmd,
    train_cmd,
    eval_cmd,
    precompute_cmd,
    cache_cmd,
    distill_cmd,
    convert_cmd,
    demo_cmd,
    bench_cmd,
    viz_cmd,
)
from dfmsd_cli.cli import checks  # noqa: E402  isort: skip

checks.install(app)  # parse-time checks of every count/size option, all commands


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``dfmsd`` console script: user errors and operating-system faults
    (``OSError``: full disk, read-only or vanished folder, ...) exit 2 with one line."""
    if argv is None:
        argv = sys.argv[1:]
    if "--debug" in argv:  # accepted anywhere on the line, not only before the command
        STATE["debug"] = True
        argv = [a for a in argv if a != "--debug"]
    if "--trust-checkpoint" in argv:  # likewise: an explicit opt-in, never a default
        from dfmsd_cli.utils.safe_load import set_trust

        set_trust(True)
        argv = [a for a in argv if a != "--trust-checkpoint"]
    try:
        # standalone mode: typer/click handle usage errors themselves (exit code 2)
        app(args=argv, prog_name="dfmsd")
    except UserError as exc:
        if STATE["debug"]:
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:  # disk full, read-only, permissions, a folder deleted under us
        if STATE["debug"]:
            raise
        print(f"error: {os_error_line(exc)}", file=sys.stderr)
        sys.exit(2)

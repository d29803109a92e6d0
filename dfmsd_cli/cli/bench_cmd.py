"""CLI commands (bench_cmd)."""

from dfmsd_cli.cli.app import app  # noqa: F401

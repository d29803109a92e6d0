"""CLI commands (cache_cmd)."""

from dfmsd_cli.cli.app import app  # noqa: F401

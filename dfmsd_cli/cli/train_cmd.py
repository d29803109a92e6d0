"""CLI commands (train_cmd)."""

from dfmsd_cli.cli.app import app  # noqa: F401

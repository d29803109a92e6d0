"""The one rich console (stderr) and progress bar every layer reports through."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


def make_progress(disable: bool = False) -> Progress:
    """A progress bar showing done/total, elapsed, ETA and a ``{task.fields[info]}`` text."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=disable,
        transient=False,
    )


def format_losses(values: dict[str, float], limit: int = 6) -> str:
    parts = [f"{k.removeprefix('loss_')}={v:.3f}" for k, v in list(values.items())[:limit]]
    return " ".join(parts)

"""Pieces shared by the ``train`` and ``distill`` loops: the per-epoch loader, the options
record and the end-of-run validation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from dfmsd_cli.data.geometry import Geometry
from dfmsd_cli.engine.sampler import ViewSampler
from dfmsd_cli.errors import UserError
from dfmsd_cli.utils.console import console


def epoch_loader(
    dataset,
    sampler: ViewSampler,
    *,
    batch_size: int,
    collate_fn: Callable,
    num_workers: int,
    device: torch.device,
    seed: int,
    epoch: int,
    start_step: int = 0,
) -> torch.utils.data.DataLoader:
    """The DataLoader of one epoch, starting after ``start_step`` done batches (resume).

    It has its own generator: creating the iterator must not consume the global RNG, or a
    resumed run would diverge from an uninterrupted one.
    """
    sampler.set_epoch(epoch, start=start_step * batch_size)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(seed + epoch),
    )


def options_dict(opts: Any) -> dict[str, Any]:
    """A dataclass of options as a JSON-ready dict (paths as strings)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()}


def evaluate_split(
    model: torch.nn.Module,
    data: Path | None,
    split: str,
    *,
    geometry: Geometry,
    batch_size: int,
    device: torch.device,
    out: Path,
) -> dict[str, Any]:
    """COCO metrics on ``split`` when it exists (skipped with a note otherwise)."""
    from dfmsd_cli.data.loader import resolve_data
    from dfmsd_cli.eval import evaluate

    try:
        ann, images = resolve_data(data, split, None, None)
    except UserError as exc:
        console.print(f"[yellow]skipping evaluation: {exc}")
        return {}
    return evaluate(
        model, ann, images, geometry=geometry, batch_size=batch_size, device=device, out=out
    )

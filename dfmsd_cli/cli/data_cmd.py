"""``dfmsd make-data``: generate datasets (``synthetic``) for tests, the demo and quick checks."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from dfmsd_cli.cli.app import ConfigOption, app

make_data = typer.Typer(help="Generate a COCO-layout dataset.", no_args_is_help=True)
app.add_typer(make_data, name="make-data")


@make_data.command("synthetic")
def synthetic_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Dataset root to write (COCO layout)."),
    images: int = typer.Option(
        200, "--images", "-n", help="Training images (validation gets N/4)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed: the same seed gives bit-identical files."),
    val_images: int | None = typer.Option(
        None, "--val-images", help="Validation images (default N/4, at least 1)."
    ),
    min_size: int = typer.Option(160, "--min-size", help="Smallest long side of an image, px."),
    max_size: int = typer.Option(320, "--max-size", help="Largest long side of an image, px."),
    max_objects: int = typer.Option(8, "--max-objects", help="Most objects in one image."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace a synthetic dataset already in --out."
    ),
    config: str | None = ConfigOption,
) -> None:
    """Coloured, textured shapes (5 classes, small and large, clutter, occlusion) with boxes and
    masks: ``OUT/annotations/instances_{train2017,val2017}.json``, ``OUT/train2017/``, ``OUT/val2017/``."""
    from rich.console import Console

    from dfmsd_cli.data.coco import load_coco_json
    from dfmsd_cli.data.synthetic import make_synthetic

    t0 = time.perf_counter()
    make_synthetic(
        out,
        images,
        seed,
        val_images=val_images,
        min_size=min_size,
        max_size=max_size,
        max_objects=max_objects,
        overwrite=overwrite,
        progress=True,
    )
    console = Console()
    for split in ("train2017", "val2017"):
        data = load_coco_json(out / "annotations" / f"instances_{split}.json")
        console.print(
            f"{split}: {len(data['images'])} images, {len(data['annotations'])} objects "
            f"in {out / split}"
        )
    console.print(f"done in {time.perf_counter() - t0:.1f} s; use it with --data {out}")

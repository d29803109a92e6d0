"""``dfmsd make-data``: generate datasets (``synthetic``) for tests, the demo and quick checks."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from dfmsd_cli.cli.app import ConfigOption, app, write_config

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
    options = dict(
        images=images,
        seed=seed,
        val_images=val_images,
        min_size=min_size,
        max_size=max_size,
        max_objects=max_objects,
        overwrite=overwrite,
    )
    write_config(out, {"out": out, **options}, "make-data synthetic")
    console = Console()
    for split in ("train2017", "val2017"):
        data = load_coco_json(out / "annotations" / f"instances_{split}.json")
        console.print(
            f"{split}: {len(data['images'])} images, {len(data['annotations'])} objects "
            f"in {out / split}"
        )
    console.print(f"done in {time.perf_counter() - t0:.1f} s; use it with --data {out}")


@app.command("check-data")
def check_data_cmd(
    data: Path | None = typer.Option(
        None, "--data", help="COCO root: ROOT/annotations/instances_{split}.json and ROOT/{split}/."
    ),
    split: str = typer.Option("train2017", "--split", help="Split to check."),
    ann: Path | None = typer.Option(None, "--ann", help="Annotation file (overrides --data)."),
    images: Path | None = typer.Option(None, "--images", help="Image folder (overrides --data)."),
    strict: bool = typer.Option(False, "--strict", help="Fail on the first unreadable image."),
    skip_empty: bool = typer.Option(
        False, "--skip-empty/--keep-empty", help="Count images without boxes as skipped."
    ),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the counts as JSON."),
    config: str | None = ConfigOption,
) -> None:
    """Parse a COCO split as training would (probing every image) and print its counts:
    images, unreadable images, crowd and degenerate boxes, empty images, classes."""
    import json

    from rich.console import Console
    from rich.table import Table

    from dfmsd_cli.data.coco import CocoDetection
    from dfmsd_cli.data.loader import resolve_data
    from dfmsd_cli.utils.io import atomic_write_text

    ann_file, image_dir = resolve_data(data, split, ann, images)
    ds = CocoDetection(ann_file, image_dir, strict=strict, skip_empty=skip_empty)
    counts = {k: int(v) for k, v in sorted(ds.stats.items())}
    table = Table(title=ann_file.name, caption=str(image_dir))
    table.add_column("count")
    table.add_column("value", justify="right")
    for k, v in counts.items():
        table.add_row(k, str(v))
    table.add_row("classes", str(ds.num_classes))
    Console().print(table)
    if json_out is not None:
        payload = {
            "ann_file": str(ann_file),
            "image_dir": str(image_dir),
            "counts": counts,
            "categories": ds.categories,
        }
        atomic_write_text(json_out, json.dumps(payload, indent=2) + "\n")

"""``dfmsd make-data``: generate datasets (``synthetic``) for tests, the demo and quick checks."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import typer

from dfmsd_cli.cli.app import app, write_config
from dfmsd_cli.cli.options import command, emit_json
from dfmsd_cli.utils.options import (
    DataOptions,
    JsonOptions,
    NumImagesOptions,
    OutOptions,
    opt,
    record,
    reuse,
)

make_data = typer.Typer(help="Generate a COCO-layout dataset.", no_args_is_help=True)
app.add_typer(make_data, name="make-data")


@dataclass(kw_only=True)
class SyntheticOptions(NumImagesOptions, OutOptions):
    out: Path = reuse(OutOptions, "out", help="Dataset root to write (COCO layout).")
    num_images: int = reuse(
        NumImagesOptions,
        "num_images",
        default=200,
        help="Training images (validation gets N/4).",
        short="-n",
    )
    seed: int = opt(0, "Seed: the same seed gives bit-identical files.")
    val_images: int | None = opt(None, "Validation images (default N/4, at least 1).")
    min_size: int = opt(160, "Smallest long side of an image, px.")
    max_size: int = opt(320, "Largest long side of an image, px.")
    max_objects: int = opt(8, "Most objects in one image.")
    overwrite: bool = reuse(
        OutOptions, "overwrite", help="Replace a synthetic dataset already in --out."
    )


@command(make_data, "synthetic", SyntheticOptions)
def synthetic_cmd(o: SyntheticOptions) -> None:
    """Coloured, textured shapes (5 classes, small and large, clutter, occlusion) with boxes and
    masks: ``OUT/annotations/instances_{train2017,val2017}.json``, ``OUT/train2017/``, ``OUT/val2017/``."""
    from rich.console import Console

    from dfmsd_cli.data.coco import load_coco_json
    from dfmsd_cli.data.synthetic import make_synthetic

    t0 = time.perf_counter()
    out = o.out
    make_synthetic(
        out,
        o.num_images,
        o.seed,
        val_images=o.val_images,
        min_size=o.min_size,
        max_size=o.max_size,
        max_objects=o.max_objects,
        overwrite=o.overwrite,
        progress=True,
    )
    write_config(out, record(o), "make-data synthetic")
    console = Console()
    for split in ("train2017", "val2017"):
        data = load_coco_json(out / "annotations" / f"instances_{split}.json")
        console.print(
            f"{split}: {len(data['images'])} images, {len(data['annotations'])} objects "
            f"in {out / split}"
        )
    console.print(f"done in {time.perf_counter() - t0:.1f} s; use it with --data {out}")


@dataclass(kw_only=True)
class CheckDataOptions(DataOptions, JsonOptions):
    strict: bool = opt(False, "Fail on the first unreadable image.")
    skip_empty: bool = opt(
        False, "Count images without boxes as skipped.", flag="--skip-empty/--keep-empty"
    )
    json: Path | None = reuse(
        JsonOptions, "json", help="Also write the counts as JSON to this file ('-': stdout)."
    )


@command(app, "check-data", CheckDataOptions)
def check_data_cmd(o: CheckDataOptions) -> None:
    """Parse a COCO split as training would (probing every image) and print its counts:
    images, unreadable images, crowd and degenerate boxes, empty images, classes."""
    from rich.console import Console
    from rich.table import Table

    from dfmsd_cli.data.coco import CocoDetection
    from dfmsd_cli.data.loader import resolve_data

    ann_file, image_dir = resolve_data(o.data, o.split, o.ann, o.images)
    ds = CocoDetection(ann_file, image_dir, strict=o.strict, skip_empty=o.skip_empty)
    counts = {k: int(v) for k, v in sorted(ds.stats.items())}
    table = Table(title=ann_file.name, caption=str(image_dir))
    table.add_column("count")
    table.add_column("value", justify="right")
    for k, v in counts.items():
        table.add_row(k, str(v))
    table.add_row("classes", str(ds.num_classes))
    payload = {
        "ann_file": str(ann_file),
        "image_dir": str(image_dir),
        "counts": counts,
        "categories": ds.categories,
    }
    if not emit_json(payload, o.json):
        Console().print(table)

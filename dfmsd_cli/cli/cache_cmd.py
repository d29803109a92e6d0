"""``dfmsd cache info PATH`` and ``dfmsd cache verify PATH``: inspect and check teacher stores."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import typer

from dfmsd_cli.cli.app import app
from dfmsd_cli.cli.options import command, emit_json
from dfmsd_cli.utils.console import console
from dfmsd_cli.utils.fmt import format_bytes
from dfmsd_cli.utils.options import DataOptions, DeviceOptions, JsonOptions, opt, reuse

cache_app = typer.Typer(help="Inspect and verify teacher-feature stores.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


STORE_HELP = "Store path, e.g. cache/retina_r50/train2017.zarr."


@dataclass(kw_only=True)
class InfoOptions(JsonOptions):
    path: str = opt(help=STORE_HELP, argument=True)
    json: Path | None = reuse(
        JsonOptions, "json", help="Also write the summary as JSON to this file ('-': stdout)."
    )


@command(cache_app, "info", InfoOptions)
def info_cmd(o: InfoOptions) -> None:
    """Teacher, split, views, levels, dtype, images done/total, size, bytes/image, compression."""
    from rich.table import Table

    from dfmsd_cli.store.inspect import store_info

    path = o.path
    info = store_info(path)
    table = Table(title=f"teacher store {path}")
    table.add_column("item")
    table.add_column("value", justify="right")
    ratio = info["compression_ratio"]
    for key, val in (
        ("teacher", info["teacher"]),
        ("split", info["split"]),
        ("views", ",".join(info["views"])),
        ("levels", ",".join(map(str, info["levels"]))),
        ("channels", str(info["channels"])),
        (
            "dtype",
            info["dtype"] + (f" (keepbits {info['keepbits']})" if info.get("keepbits") else ""),
        ),
        ("codec", str(info.get("codec") or "-")),
        ("images done/total", f"{info['done']}/{info['images']}"),
        ("unreadable", str(info["unreadable"])),
        ("size on disk", format_bytes(info["bytes_on_disk"])),
        ("bytes/image", format_bytes(info["bytes_per_image"])),
        ("compression ratio", "-" if math.isnan(ratio) else f"{ratio:.2f}x"),
        ("created", str(info["created"])),
    ):
        table.add_row(key, val)
    if info.get("pca"):
        from dfmsd_cli.cli.precompute_cmd import pca_row

        table.add_row("pca components", str(info["pca"]["components"]))
        for s, e in info["pca"]["levels"].items():
            table.add_row(f"energy kept, stride {s}", pca_row(e))
    console.print(table)  # stderr: stdout stays clean for --json -
    emit_json(info, o.json)


@dataclass(kw_only=True)
class VerifyOptions(DataOptions, DeviceOptions):
    path: str = opt(help=STORE_HELP, argument=True)
    data: Path | None = reuse(
        DataOptions, "data", help="COCO root to check the dataset fingerprints against."
    )
    split: str | None = reuse(DataOptions, "split", default=None, help="Split of --data "
                              "(default: the store's).")  # fmt: skip
    weights: str | None = opt(
        None, "Teacher weights to check the store's weights fingerprint against."
    )
    quick: bool = opt(False, "Skip decoding every image (fingerprints and markers only).")
    repair: bool = opt(
        False,
        "Recompute exactly the damaged images with the store's teacher (needs --data; "
        "--weights if the store's recorded weights file is elsewhere).",
    )
    device: str = reuse(DeviceOptions, "device", help="Device for --repair: auto, cpu, cuda.")
    num_workers: int = reuse(DeviceOptions, "num_workers", help="DataLoader workers for --repair.")
    store_concurrency: int | None = opt(
        None,
        "A store on object storage: most chunk requests in flight "
        "(default: DFMSD_STORE_CONCURRENCY, else 64).",
    )


@command(cache_app, "verify", VerifyOptions)
def verify_cmd(o: VerifyOptions) -> None:
    """Check fingerprints, completion markers and every chunk (crc32c checksums, missing
    chunks, NaN/inf, statistics); exit 1 on any problem, naming it. --repair recomputes the
    damaged images."""
    from dfmsd_cli.errors import UserError
    from dfmsd_cli.store.inspect import verify_store
    from dfmsd_cli.store.reader import TeacherStore

    path, weights, quick, repair = o.path, o.weights, o.quick, o.repair
    ann_file = image_dir = None
    if o.data is not None or o.ann is not None:
        from dfmsd_cli.data.loader import resolve_data

        split = o.split or TeacherStore.open(path).meta.split
        ann_file, image_dir = resolve_data(o.data, split, o.ann, o.images)
    if repair and (ann_file is None or quick):
        raise UserError(
            "--repair recomputes damaged images with the teacher: pass --data ROOT (the dataset "
            "the store was made from) and drop --quick"
        )
    conc = o.store_concurrency
    report = verify_store(
        path, ann_file, image_dir, weights=weights, scan=not quick, progress=True, concurrency=conc
    )
    if repair and report.damaged:
        from dfmsd_cli.store.repair import repair_store

        console.print(f"repair: recomputing {len(report.damaged)} damaged image(s)")
        repair_store(
            path,
            ann_file,
            image_dir,
            report.damaged,
            weights=weights,
            device=o.device,
            num_workers=o.num_workers,
        )
        report = verify_store(
            path, ann_file, image_dir, weights=weights, progress=True, concurrency=conc
        )
    problems, notes = report.problems, report.notes
    for n in notes:
        console.print(f"note: {n}")
    for p in problems:
        console.print(f"[red]problem:[/red] {p}", soft_wrap=True)
    if problems:
        console.print(f"{path}: {len(problems)} problem(s)")
        raise typer.Exit(1)
    console.print(f"{path}: OK")

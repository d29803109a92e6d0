"""``dfmsd bench {precompute,store,distill}``: size your hardware (rich tables; ``--json PATH``
also writes the result, ``--json -`` prints it on stdout instead of the tables)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import typer

from dfmsd_cli.cli.app import app
from dfmsd_cli.cli.options import command, emit_json
from dfmsd_cli.data.geometry import parse_img_scale
from dfmsd_cli.utils.options import (
    BatchOptions,
    DataOptions,
    DeviceOptions,
    GeometryOptions,
    JsonOptions,
    NumImagesOptions,
    opt,
    record,
    reuse,
)

bench_app = typer.Typer(
    help="Measure precompute overhead, store size/throughput and distill step cost on your data.",
    no_args_is_help=True,
)
app.add_typer(bench_app, name="bench")


@dataclass(kw_only=True)
class BenchOptions(NumImagesOptions, GeometryOptions, BatchOptions, JsonOptions):
    """The options every bench command shares (only --data/--split of the data group: bench
    reads the first N images of a COCO root)."""

    data: Path = reuse(DataOptions, "data", default=dataclasses.MISSING)
    split: str = reuse(DataOptions, "split", help="Split to measure on.")
    num_images: int = reuse(
        NumImagesOptions, "num_images", help="Number of images measured (the first N of the split)."
    )
    num_workers: int = reuse(DeviceOptions, "num_workers")
    work_dir: Path | None = opt(None, "Where stores and runs go (default: a temporary folder).")
    isolate: bool = opt(
        True,
        "Run each measurement in a fresh process (its own peak memory).",
        flag="--isolate/--in-process",
    )
    threads: int | None = opt(None, "torch threads in the measurement process (default: torch's).")
    json: Path | None = reuse(JsonOptions, "json", deprecated=("--out", "-o"))


def _emit(result: dict, kind: str, json_path: Path | None) -> None:
    from dfmsd_cli.bench.report import TABLES
    from dfmsd_cli.utils.console import console

    if emit_json(result, json_path):
        return
    from rich.console import Console

    stdout = Console()
    for table in TABLES[kind](result):
        stdout.print(table)
    if json_path is not None:
        console.print(f"wrote {json_path}")


def _quiet(o: BenchOptions) -> bool:
    return o.json is not None and str(o.json) == "-"


def _store_like(what: str, o: BenchOptions) -> None:
    from dfmsd_cli.bench.store import bench_store_cmd

    kw = {k: v for k, v in record(o).items() if k not in ("json", "num_images", "img_scale")}
    kw.update(data=o.data, work_dir=o.work_dir, images=o.num_images)
    kw.update(img_scale=parse_img_scale(o.img_scale), quiet=_quiet(o))
    _emit(bench_store_cmd(what, **kw), what, o.json)


@dataclass(kw_only=True)
class BenchPrecomputeOptions(BenchOptions):
    teacher: str = opt("retina_r50", "Teacher zoo name (random init: timing and size only).")
    repeats: int = opt(
        1,
        "Measure every encoding N times, in rounds; report the median ratio and its range "
        "(this machine's noise).",
    )


@command(bench_app, "precompute", BenchPrecomputeOptions)
def bench_precompute(o: BenchPrecomputeOptions) -> None:
    """precompute wall time ÷ teacher-only wall time (same images and batches), bytes/image per dtype, peak memory."""
    _store_like("precompute", o)


@dataclass(kw_only=True)
class BenchStoreOptions(BenchOptions):
    teacher: str = opt("retina_r50", "Teacher zoo name (random init).")
    student: str = opt("retina_r18", "Student whose train step sets the read rate needed.")


@command(bench_app, "store", BenchStoreOptions)
def bench_store(o: BenchStoreOptions) -> None:
    """Store bytes/image per dtype and codec (with quantisation error), read throughput vs the student's consumption, flip cosine."""
    _store_like("store", o)


@dataclass(kw_only=True)
class BenchDistillOptions(BenchOptions, DeviceOptions):
    student: str = opt("retina_r50", "Student zoo name.")
    teachers: str = opt(
        "retina_r101", "One teacher, or WEAKER,STRONGER (the stronger stage with ME is measured)."
    )
    teacher_weights: str = opt("", "Comma-separated weights per teacher (default: random init).")
    num_steps: int = opt(
        10,
        "Timed optimizer steps per run (the first is excluded).",
        count=(2, "the number of timed optimizer steps (the first is not timed)"),
    )
    num_workers: int = reuse(
        DeviceOptions,
        "num_workers",
        default=0,
        help="DataLoader workers (0: decoding counts in the peak memory).",
    )
    online: bool = opt(
        True, "Also measure teachers in the loop (--online).", flag="--online/--no-online"
    )
    clock: str = opt(
        "wall", "wall, or cpu: step time in process CPU seconds (robust on a shared machine)."
    )


@command(bench_app, "distill", BenchDistillOptions)
def bench_distill_cmd(o: BenchDistillOptions) -> None:
    """Store-fed distill step ÷ student-only step, --online step ÷ store-fed step, peak memory of each."""
    from dfmsd_cli.bench.distill import bench_distill
    from dfmsd_cli.utils.device import resolve_device

    names = tuple(t.strip() for t in o.teachers.split(",") if t.strip())
    tw = o.teacher_weights
    weights = tuple((w.strip() or None) for w in tw.split(",")) if tw else ()
    result = bench_distill(
        o.data,
        split=o.split,
        student=o.student,
        teachers=names,
        teacher_weights=weights,
        images=o.num_images,
        steps=o.num_steps,
        img_scale=parse_img_scale(o.img_scale),
        batch_size=o.batch_size,
        num_workers=o.num_workers,
        device=str(resolve_device(o.device)),
        online=o.online,
        isolate=o.isolate,
        work_dir=o.work_dir,
        threads=o.threads,
        clock=o.clock,
        log=(lambda *a: None) if _quiet(o) else print,
    )
    _emit(result, "distill", o.json)

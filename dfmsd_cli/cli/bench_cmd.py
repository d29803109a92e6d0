"""``dfmsd bench {precompute,store,distill}``: size your hardware (rich tables, or --json)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from dfmsd_cli.cli.app import ConfigOption, app
from dfmsd_cli.data.geometry import parse_img_scale

bench_app = typer.Typer(
    help="Measure precompute overhead, store size/throughput and distill step cost on your data.",
    no_args_is_help=True,
)
app.add_typer(bench_app, name="bench")

DataOpt = typer.Option(
    ..., "--data", help="COCO root: ROOT/annotations/instances_{split}.json and ROOT/{split}/."
)
SplitOpt = typer.Option("train2017", "--split", help="Split to measure on.")
ImagesOpt = typer.Option(
    16, "--images", help="Number of images measured (the first N of the split)."
)
ScaleOpt = typer.Option("1333,800", "--img-scale", help="Keep-ratio resize bound LONG,SHORT.")
BatchOpt = typer.Option(2, "--batch-size", "-b", help="Images per batch.")
WorkersOpt = typer.Option(2, "--num-workers", help="DataLoader workers.")
WorkOpt = typer.Option(
    None, "--work-dir", help="Where stores and runs go (default: a temporary folder)."
)
IsolateOpt = typer.Option(
    True,
    "--isolate/--in-process",
    help="Run each measurement in a fresh process (its own peak memory).",
)
ThreadsOpt = typer.Option(
    None, "--threads", help="torch threads in the measurement process (default: torch's)."
)
JsonOpt = typer.Option(
    False, "--json", help="Print the result as JSON on stdout instead of tables."
)
OutOpt = typer.Option(None, "--out", "-o", help="Also write the JSON result to this file.")


def _emit(result: dict, kind: str, as_json: bool, out: Path | None) -> None:
    from dfmsd_cli.bench.report import TABLES
    from dfmsd_cli.utils.console import console

    text = json.dumps(result, indent=2, default=str)
    if out is not None:
        from dfmsd_cli.utils.io import atomic_write_text

        atomic_write_text(out, text + "\n")
    if as_json:
        typer.echo(text)
        return
    from rich.console import Console

    stdout = Console()
    for table in TABLES[kind](result):
        stdout.print(table)
    if out is not None:
        console.print(f"wrote {out}")


def _store_like(what: str, **kw) -> None:
    from dfmsd_cli.bench.store import bench_store_cmd

    as_json, out = kw.pop("as_json"), kw.pop("out")
    kw["img_scale"] = parse_img_scale(kw["img_scale"])
    kw["quiet"] = as_json
    _emit(bench_store_cmd(what, **kw), what, as_json, out)


@bench_app.command("precompute")
def bench_precompute(
    data: Path = DataOpt,
    split: str = SplitOpt,
    teacher: str = typer.Option(
        "retina_r50", "--teacher", help="Teacher zoo name (random init: timing and size only)."
    ),
    images: int = ImagesOpt,
    img_scale: str = ScaleOpt,
    batch_size: int = BatchOpt,
    num_workers: int = WorkersOpt,
    work_dir: Path | None = WorkOpt,
    isolate: bool = IsolateOpt,
    threads: int | None = ThreadsOpt,
    as_json: bool = JsonOpt,
    out: Path | None = OutOpt,
    config: str | None = ConfigOption,
) -> None:
    """precompute wall time ÷ teacher-only wall time (same images and batches), bytes/image per dtype, peak memory."""
    _store_like("precompute", data=data, split=split, teacher=teacher, images=images,
                img_scale=img_scale, batch_size=batch_size, num_workers=num_workers,
                work_dir=work_dir, isolate=isolate, threads=threads, as_json=as_json, out=out)  # fmt: skip


@bench_app.command("store")
def bench_store(
    data: Path = DataOpt,
    split: str = SplitOpt,
    teacher: str = typer.Option("retina_r50", "--teacher", help="Teacher zoo name (random init)."),
    student: str = typer.Option(
        "retina_r18", "--student", help="Student whose train step sets the read rate needed."
    ),
    images: int = ImagesOpt,
    img_scale: str = ScaleOpt,
    batch_size: int = BatchOpt,
    num_workers: int = WorkersOpt,
    work_dir: Path | None = WorkOpt,
    isolate: bool = IsolateOpt,
    threads: int | None = ThreadsOpt,
    as_json: bool = JsonOpt,
    out: Path | None = OutOpt,
    config: str | None = ConfigOption,
) -> None:
    """Store bytes/image per dtype and codec (with quantisation error), read throughput vs the student's consumption, flip cosine."""
    _store_like("store", data=data, split=split, teacher=teacher, student=student,
                images=images, img_scale=img_scale, batch_size=batch_size,
                num_workers=num_workers, work_dir=work_dir, isolate=isolate, threads=threads,
                as_json=as_json, out=out)  # fmt: skip


@bench_app.command("distill")
def bench_distill_cmd(
    data: Path = DataOpt,
    split: str = SplitOpt,
    student: str = typer.Option("retina_r50", "--student", help="Student zoo name."),
    teachers: str = typer.Option(
        "retina_r101",
        "--teachers",
        help="One teacher, or WEAKER,STRONGER (the stronger stage with ME is measured).",
    ),
    teacher_weights: str = typer.Option(
        "", "--teacher-weights", help="Comma-separated weights per teacher (default: random init)."
    ),
    images: int = ImagesOpt,
    steps: int = typer.Option(
        10, "--steps", help="Timed optimizer steps per run (the first is excluded)."
    ),
    img_scale: str = ScaleOpt,
    batch_size: int = BatchOpt,
    num_workers: int = typer.Option(
        0, "--num-workers", help="DataLoader workers (0: decoding counts in the peak memory)."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    online: bool = typer.Option(
        True, "--online/--no-online", help="Also measure teachers in the loop (--online)."
    ),
    clock: str = typer.Option(
        "wall",
        "--clock",
        help="wall, or cpu: step time in process CPU seconds (robust on a shared machine).",
    ),
    work_dir: Path | None = WorkOpt,
    isolate: bool = IsolateOpt,
    threads: int | None = ThreadsOpt,
    as_json: bool = JsonOpt,
    out: Path | None = OutOpt,
    config: str | None = ConfigOption,
) -> None:
    """Store-fed distill step ÷ student-only step, --online step ÷ store-fed step, peak memory of each."""
    from dfmsd_cli.bench.distill import bench_distill
    from dfmsd_cli.utils.device import resolve_device

    names = tuple(t.strip() for t in teachers.split(",") if t.strip())
    weights = (
        tuple((w.strip() or None) for w in teacher_weights.split(",")) if teacher_weights else ()
    )
    result = bench_distill(
        data,
        split=split,
        student=student,
        teachers=names,
        teacher_weights=weights,
        images=images,
        steps=steps,
        img_scale=parse_img_scale(img_scale),
        batch_size=batch_size,
        num_workers=num_workers,
        device=str(resolve_device(device)),
        online=online,
        isolate=isolate,
        work_dir=work_dir,
        threads=threads,
        clock=clock,
        log=(lambda *a: None) if as_json else print,
    )
    _emit(result, "distill", as_json, out)

"""``dfmsd convert mmdet CKPT --model NAME --out W.pth``: import an MMDetection checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from dfmsd_cli.cli.app import ConfigOption, app
from dfmsd_cli.errors import UserError

convert_app = typer.Typer(
    help="Convert checkpoints of other frameworks into dfmsd checkpoints (--weights W.pth).",
    no_args_is_help=True,
)
app.add_typer(convert_app, name="convert")


@convert_app.command("mmdet")
def convert_mmdet_cmd(
    checkpoint: Path = typer.Argument(..., help="MMDetection .pth (a dict with 'state_dict')."),
    model: str = typer.Option(
        ...,
        "--model",
        "-m",
        help="Target zoo model reproducing MMDetection: mm*, gfl_*, cmr_* (e.g. cmr_r101).",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output dfmsd checkpoint (.pth)."),
    num_classes: int | None = typer.Option(
        None, "--num-classes", help="Class count K (default: from the checkpoint)."
    ),
    allow_partial: bool = typer.Option(
        False,
        "--allow-partial",
        help="Write the checkpoint even if some keys are unmapped, missing or mis-shaped "
        "(missing tensors keep their initial values).",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
    config: str | None = ConfigOption,
) -> None:
    """Map an MMDetection checkpoint's keys onto a dfmsd model and save it for --weights."""
    from rich.console import Console
    from rich.table import Table

    from dfmsd_cli.models.convert import convert_mmdet
    from dfmsd_cli.utils.io import atomic_torch_save, atomic_write_text

    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists: choose another --out or pass --overwrite")
    ckpt, report = convert_mmdet(
        checkpoint, model, num_classes=num_classes, allow_partial=allow_partial
    )
    atomic_torch_save(ckpt, out)
    report_path = out.with_suffix(out.suffix + ".report.json")
    payload = {"checkpoint": str(checkpoint), "model": model, "out": str(out), **report.to_dict()}
    atomic_write_text(report_path, json.dumps(payload, indent=2) + "\n")

    table = Table(title=f"{checkpoint.name} -> {model}")
    table.add_column("item")
    table.add_column("count", justify="right")
    table.add_column("examples")
    for name in ("unmapped", "missing", "mismatched", "ignored"):
        items = getattr(report, name)
        table.add_row(name, str(len(items)), ", ".join(items[:3]))
    table.add_row("mapped", str(report.mapped), "")
    console = Console()
    console.print(table)
    status = "complete" if report.ok else "PARTIAL (--allow-partial)"
    console.print(f"wrote {out} ({status}, {ckpt['num_classes']} classes); report: {report_path}")

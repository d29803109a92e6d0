"""``dfmsd convert mmdet CKPT --model NAME --out DIR`` (writes DIR/NAME.pth): import an MMDetection checkpoint."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import typer

from dfmsd_cli.cli.app import app
from dfmsd_cli.cli.options import command
from dfmsd_cli.errors import UserError
from dfmsd_cli.utils.options import OutOptions, opt, reuse

convert_app = typer.Typer(
    help="Convert checkpoints of other frameworks into dfmsd checkpoints (--weights W.pth).",
    no_args_is_help=True,
)
app.add_typer(convert_app, name="convert")


@dataclass(kw_only=True)
class ConvertOptions(OutOptions):
    checkpoint: Path = opt(help="MMDetection .pth (a dict with 'state_dict').", argument=True)
    model: str = opt(
        help="Target zoo model reproducing MMDetection: mm*, gfl_*, cmr_* (e.g. cmr_r101).",
        short="-m",
    )
    out: Path = reuse(
        OutOptions,
        "out",
        help="Output folder: writes OUT/MODEL.pth (for --weights or "
        "--teacher-dir) and OUT/MODEL.pth.report.json.",
    )
    num_classes: int | None = opt(None, "Class count K (default: from the checkpoint).")
    allow_partial: bool = opt(
        False,
        "Write the checkpoint even if some keys are unmapped, missing or mis-shaped "
        "(missing tensors keep their initial values).",
    )
    overwrite: bool = reuse(OutOptions, "overwrite", help="Replace an existing OUT/MODEL.pth.")


@command(convert_app, "mmdet", ConvertOptions)
def convert_mmdet_cmd(o: ConvertOptions) -> None:
    """Map an MMDetection checkpoint's keys onto a dfmsd model and save it for --weights."""
    from rich.console import Console
    from rich.table import Table

    from dfmsd_cli.models.convert import convert_mmdet
    from dfmsd_cli.utils.io import atomic_torch_save, atomic_write_text

    checkpoint, model = o.checkpoint, o.model
    if o.out.suffix == ".pth" or o.out.is_file():
        raise UserError(
            f"--out {o.out} is a file: --out is a folder (writes OUT/{model}.pth); pass its folder"
        )
    out = o.out / f"{model}.pth"
    if out.exists() and not o.overwrite:
        raise UserError(f"{out} already exists: choose another --out or pass --overwrite")
    ckpt, report = convert_mmdet(
        checkpoint, model, num_classes=o.num_classes, allow_partial=o.allow_partial
    )
    out.parent.mkdir(parents=True, exist_ok=True)
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

"""``dfmsd models``: list the detector zoo (registry of ``{head}_{backbone}`` names)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dfmsd_cli.cli.app import app
from dfmsd_cli.cli.options import command, emit_json
from dfmsd_cli.utils.options import JsonOptions, opt, reuse


@dataclass(kw_only=True)
class ModelsOptions(JsonOptions):
    pattern: str | None = opt(
        None, "Only names matching this glob, e.g. 'retina_*'.", argument=True
    )
    num_classes: int = opt(80, "Class count for the parameters.")
    params: bool = opt(True, "Count parameters.", flag="--params/--no-params")
    json: Path | None = reuse(
        JsonOptions,
        "json",
        help="Also write the list as JSON to this file ('-': stdout, instead of the table).",
    )


@command(app, "models", ModelsOptions)
def models_command(o: ModelsOptions) -> None:
    """List the models: head, backbone, FPN strides and channels, parameter count, weights."""
    from dfmsd_cli.models.catalog import describe_models

    num_classes, params = o.num_classes, o.params
    rows = describe_models(o.pattern, num_classes=num_classes if params else None)
    if emit_json(rows, o.json):
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"dfmsd models ({len(rows)})")
    table.add_column("name", no_wrap=True)
    table.add_column("head")
    table.add_column("backbone")
    table.add_column("strides")
    table.add_column("ch", justify="right")
    if params:
        table.add_column(f"params ({num_classes} cls)", justify="right")
    table.add_column("COCO AP", justify="right")
    table.add_column("--weights torchvision")
    with_ckpt = any(r["checkpoint"] for r in rows)
    if with_ckpt:
        table.add_column("checkpoint", overflow="fold")
    for r in rows:
        cells = [r["name"], r["head"], r["backbone"], f"{r['strides'][0]}-{r['strides'][-1]}"]
        cells.append(str(r["channels"]))
        if params:
            cells.append(f"{r['parameters'] / 1e6:.2f} M")
        cells.append("" if r["published_ap"] is None else f"{r['published_ap']:.1f}")
        cells.append(r["torchvision"] or "")
        if with_ckpt:
            cells.append(r["checkpoint"] or "")
        table.add_row(*cells)
    console = Console()
    if not console.is_terminal:  # piped: do not fold the rows to 80 columns
        console = Console(width=200)
    console.print(table)

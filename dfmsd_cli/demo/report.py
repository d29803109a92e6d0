"""The demo's outputs: a rich table, ``results.json``, ``demo.png`` and ``attention.png``.

Metrics are COCO bbox fractions in [0, 1] (``dfmsd_cli.eval``), printed x100 as in the paper.
The figures are drawn by ``dfmsd viz``'s functions (:mod:`dfmsd_cli.viz`): ``demo.png`` puts
the training loss of the baseline and of each DFMSD stage (total and L_det) against the
optimizer step next to grouped bars of mAP / APs / APm / APl / mAR for the teachers, the
baseline and the DFMSD student; ``attention.png`` shows the stronger teacher's attention and
the DFMSD masks of every rule on a validation image.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from dfmsd_cli.utils.console import console

COLUMNS = ("mAP", "APs", "APm", "APl", "mAR")


def bbox(metrics: dict | None) -> dict[str, float]:
    """The bbox row of an ``evaluate`` result (``{"bbox": {...}}``) or a flat row."""
    if not metrics:
        return {}
    return dict(metrics.get("bbox", metrics))


def evaluate_model(model, data: Path, geometry, cfg, out: Path) -> dict:
    """COCO metrics of ``model`` on the demo's val split."""
    from dfmsd_cli.eval import evaluate
    from dfmsd_cli.utils.device import resolve_device

    name = getattr(model, "name", "model")
    return evaluate(
        model,
        data / "annotations" / "instances_val2017.json",
        data / "val2017",
        geometry=geometry,
        batch_size=cfg.batch_size,
        device=resolve_device(cfg.device),
        out=out / "teachers_eval" / f"{name}.json",
    )


def margin(results: dict[str, Any], column: str = "mAP") -> float:
    """DFMSD − baseline on ``column`` (fractions; NaN when either is missing)."""
    m = results["metrics"]
    a, b = bbox(m.get("DFMSD")).get(column), bbox(m.get("baseline")).get(column)
    if a is None or b is None:
        return math.nan
    return float(a) - float(b)


def _fmt(v: Any) -> str:
    if not isinstance(v, (int, float)) or math.isnan(v) or v < 0:
        return "-"
    return f"{100 * v:.1f}"


def _size(n: float | None) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def print_report(results: dict[str, Any]) -> None:
    """Metrics (x100), Δ row, wall time per phase, store sizes."""
    from rich.table import Table

    m = results["metrics"]
    t = Table(title=f"dfmsd demo: {results['student']} student, seed {results['config']['seed']}")
    t.add_column("model", style="bold")
    for c in COLUMNS:
        t.add_column(c, justify="right")
    for name, row in m.items():
        style = "bold green" if name == "DFMSD" else None
        t.add_row(name, *(_fmt(bbox(row).get(c)) for c in COLUMNS), style=style)
    delta = [margin(results, c) for c in COLUMNS]
    t.add_row(
        "Δ DFMSD − baseline",
        *("-" if math.isnan(d) else f"{100 * d:+.1f}" for d in delta),
        style="bold",
    )
    console.print(t)

    p = Table(title="wall time per phase")
    p.add_column("phase")
    p.add_column("wall s", justify="right")
    p.add_column("cpu s", justify="right")
    for name, v in results["phases"].items():
        p.add_row(name, f"{v['wall_s']:.1f}", f"{v['cpu_s']:.1f}")
    p.add_row("total", f"{results['total_wall_s']:.1f}", "", style="bold")
    console.print(p)

    s = Table(title="teacher stores")
    for col in ("teacher", "views", "images", "size", "bytes/image"):
        s.add_column(col)
    for name, v in results["stores"].items():
        s.add_row(
            name,
            ",".join(v["views"]),
            str(v["images"]),
            _size(v["bytes"]),
            _size(v["bytes_per_image"]),
        )
    console.print(s)


def write_png(results: dict[str, Any], out: Path) -> Path:
    """``out/demo.png``: loss curves (left) and metric bars (right), drawn by ``dfmsd viz``'s
    chart functions (:mod:`dfmsd_cli.viz.run_curves`, :mod:`dfmsd_cli.viz.compare_bars`)."""
    from dfmsd_cli.viz.common import new_figure, save
    from dfmsd_cli.viz.compare_bars import bar_axes
    from dfmsd_cli.viz.run_curves import RunLog, detection_loss, loss_axes, read_run

    runs = []
    if (out / "baseline" / "metrics.jsonl").is_file():
        base = read_run(out / "baseline")
        runs.append(RunLog("baseline", losses={"L_det": base.losses.get("loss", [])}))
    if (out / "dfmsd" / "metrics.jsonl").is_file():
        dist = read_run(out / "dfmsd")
        losses = {"total": dist.losses.get("loss", []), "L_det": detection_loss(dist)}
        runs.append(RunLog("DFMSD", losses=losses, boundaries=dist.boundaries))
    names = [n for n in results["metrics"] if bbox(results["metrics"][n])]
    bars = {
        n: [(max(0.0, 100 * bbox(results["metrics"][n]).get(c, math.nan)), 0.0) for c in COLUMNS]
        for n in names
    }
    if not runs and not bars:
        raise RuntimeError("nothing to plot: no loss and no metrics were recorded")
    fig, axes = new_figure(2, 1, panel=(7.0, 4.8))
    if runs:
        loss_axes(axes[0, 0], runs)
        axes[0, 0].set_title("training loss per stage (dotted: DFMSD stage boundary)")
    if bars:
        bar_axes(axes[0, 1], COLUMNS, bars, "x100")
        axes[0, 1].set_title("COCO bbox metrics on val (x100)")
    return save(fig, out / "demo.png")


def write_attention_png(results: dict[str, Any], out: Path) -> Path:
    """``out/attention.png``: the stronger teacher's attention and the DFMSD masks (every rule)
    on the first validation image, drawn by ``dfmsd viz masks``' functions from a live
    teacher pass (the stores hold training images only)."""
    from dfmsd_cli.data.geometry import Geometry
    from dfmsd_cli.models.checkpoint import load_teacher
    from dfmsd_cli.viz.common import save
    from dfmsd_cli.viz.masks_fig import masks_figure, method_masks
    from dfmsd_cli.viz.source import dataset_for, live_record

    cfg = results["config"]
    teacher = results["teachers"][-1]
    geometry = Geometry(img_scale=tuple(cfg["img_scale"]))
    ds = dataset_for(out / "data", "val2017", geometry)
    sample = next(s for s in (ds.get(i, "orig") for i in range(len(ds.image_ids))) if s)
    model = load_teacher(teacher, ds.num_classes, results["teacher_weights"][teacher], cfg["seed"])
    rec = live_record(model, sample, geometry)
    panels = method_masks(rec, "dfmsd", results["student"], sample["boxes"], seed=cfg["seed"])
    title = f"teacher {teacher}: attention and DFMSD masks, val image {sample['image_id']}"
    return save(
        masks_figure(panels, sample["raw"], tuple(sample["size"]), title), out / "attention.png"
    )


def write_report(results: dict[str, Any], out: Path) -> None:
    """Print the tables; write ``results.json`` and ``demo.png`` into ``out``."""
    from dfmsd_cli.utils.io import atomic_write_text

    d = margin(results, "mAP")
    results["margin_mAP"] = None if math.isnan(d) else d
    results["png"] = str(write_png(results, out))
    results["attention_png"] = str(write_attention_png(results, out))
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=str) + "\n")
    print_report(results)
    console.print(
        f"results: {out / 'results.json'}  plots: {results['png']} {results['attention_png']}"
    )

"""The demo's outputs: a rich table, ``results.json`` and ``demo.png`` (loss curves + mAP bars).

Metrics are COCO bbox fractions in [0, 1] (``dfmsd_cli.eval``), printed x100 as in the paper.
The PNG puts two PIL charts (``dfmsd_cli.utils.plot``) side by side: the total training loss
of the baseline and of each DFMSD stage against the optimizer step, and grouped bars of
mAP / APs / APm / APl / mAR for the teachers, the baseline and the DFMSD student.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from dfmsd_cli.engine.progress import console

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


DISTILL_TERMS = ("loss_kd", "loss_sfa", "loss_me")


def loss_series(
    metrics_jsonl: Path, stage: int | None = None, det_only: bool = False
) -> list[tuple[float, float]]:
    """(step, loss) from a ``metrics.jsonl`` (one stage's rows when ``stage``); ``det_only``
    subtracts the distillation terms, leaving the detection loss."""
    if not metrics_jsonl.is_file():
        return []
    pts = []
    for line in metrics_jsonl.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec.get("phase") != "train" or "loss" not in rec:
            continue
        if stage is not None and rec.get("stage") != stage:
            continue
        y = float(rec["loss"])
        if det_only:
            y -= sum(float(rec.get(k, 0.0)) for k in DISTILL_TERMS)
        pts.append((float(rec["iteration"]), y))
    return pts


def write_png(results: dict[str, Any], out: Path) -> Path:
    """``out/demo.png``: loss curves (left) and metric bars (right) in one image."""
    import tempfile

    from PIL import Image

    from dfmsd_cli.utils.plot import bar_chart, line_chart

    series: dict[str, list[tuple[float, float]]] = {}
    base = loss_series(out / "baseline" / "metrics.jsonl")
    if base:
        series["baseline (L_det)"] = base
    offset = 0.0
    for st in results["distill"]["stages"]:
        k = st["stage"]
        pts = loss_series(out / "dfmsd" / "metrics.jsonl", k)
        det = loss_series(out / "dfmsd" / "metrics.jsonl", k, det_only=True)
        if pts:
            series[f"DFMSD stage {k} total"] = [(x + offset, y) for x, y in pts]
            series[f"DFMSD stage {k} L_det"] = [(x + offset, y) for x, y in det]
            offset += pts[-1][0]
    names = [n for n in results["metrics"] if bbox(results["metrics"][n])]
    bars = {
        n: [max(0.0, 100 * bbox(results["metrics"][n]).get(c, math.nan)) for c in COLUMNS]
        for n in names
    }
    with tempfile.TemporaryDirectory() as tmp:
        left = right = None
        if series:
            left = line_chart(
                series,
                Path(tmp) / "loss.png",
                title="training loss per stage",
                xlabel="optimizer step",
                ylabel="loss",
                size=(700, 480),
            )
        if bars:
            right = bar_chart(
                list(COLUMNS),
                bars,
                Path(tmp) / "bars.png",
                title="COCO bbox metrics on val (x100)",
                ylabel="x100",
                size=(700, 480),
            )
        images = [Image.open(p).convert("RGB") for p in (left, right) if p is not None]
        if not images:
            raise RuntimeError("nothing to plot: no loss and no metrics were recorded")
        w = sum(i.width for i in images)
        h = max(i.height for i in images)
        canvas = Image.new("RGB", (w, h), (255, 255, 255))
        x = 0
        for im in images:
            canvas.paste(im, (x, 0))
            x += im.width
        path = out / "demo.png"
        canvas.save(path, format="PNG")
    return path


def write_report(results: dict[str, Any], out: Path, ann_val: Path | None = None) -> None:
    """Print the tables; write ``results.json`` and ``demo.png`` into ``out``."""
    from dfmsd_cli.utils.io import atomic_write_text

    d = margin(results, "mAP")
    results["margin_mAP"] = None if math.isnan(d) else d
    results["png"] = str(write_png(results, out))
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=str) + "\n")
    print_report(results)
    console.print(f"results: {out / 'results.json'}  plot: {results['png']}")

"""``dfmsd viz compare``: the compare table (``examples/compare.sh``) as grouped bars.

``COMPARE_DIR/<method>/s<seed>/`` holds one finished ``dfmsd distill`` run per method and seed
(``student.pth`` and its last ``eval_stage*_val2017.json``), the layout
``examples/compare_table.py`` aggregates. One bar group per metric (mAP, APs, APm, APl, mAR),
one bar per method: the mean over seeds x100, error bars ± one sample standard deviation
(none for a single seed). COCO's -1 ("no such objects") is left out.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np

from dfmsd_cli.errors import UserError
from dfmsd_cli.viz.common import PALETTE, new_figure

COLUMNS = ("mAP", "APs", "APm", "APl", "mAR")
ORDER = ("none", "mgd", "pkd", "fgd", "dmkd", "dfmsd", "dfmsd-no-sal", "dfmsd-no-me",
         "dfmsd-no-sfa")  # fmt: skip


def final_metrics(run: Path) -> dict[str, float] | None:
    """The last stage's bbox metrics of a finished run, else None."""
    files = sorted(run.glob("eval_stage*_val2017.json"))
    if not files or not (run / "student.pth").is_file():
        return None
    try:
        d = json.loads(files[-1].read_text())
    except json.JSONDecodeError:
        return None
    return d.get("bbox") or d.get("metrics", {}).get("bbox")


def read_compare(root: str | Path) -> dict[str, list[dict[str, float]]]:
    """``{method: [metrics per finished seed]}`` in the table's order (unknown methods last)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder: pass the OUT of examples/compare.sh")
    found = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        vals = [m for m in (final_metrics(r) for r in sorted(d.glob("s*"))) if m]
        if vals:
            found[d.name] = vals
    if not found:
        raise UserError(
            f"no finished run under {root} (expected METHOD/sSEED/student.pth with its "
            "eval_stage*_val2017.json): run examples/compare.sh first"
        )
    rank = {m: i for i, m in enumerate(ORDER)}
    return dict(sorted(found.items(), key=lambda kv: (rank.get(kv[0], len(ORDER)), kv[0])))


def summarize(values: list[dict[str, float]], column: str) -> tuple[float, float]:
    """(mean, sample std) x100 over seeds, ignoring COCO's -1; NaN when no value."""
    xs = [100 * v[column] for v in values if column in v and v[column] >= 0]
    if not xs:
        return math.nan, math.nan
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def bar_axes(ax, groups, series: dict[str, list[tuple[float, float]]], ylabel: str = "") -> None:
    """Grouped bars on ``ax``: per group one bar per named series of (value, error) pairs
    (NaN values leave a gap; error 0 draws no bar cap)."""
    width = 0.8 / max(1, len(series))
    for i, (name, stats) in enumerate(series.items()):
        xs = np.arange(len(groups)) + (i - (len(series) - 1) / 2) * width
        errs = [e if e and math.isfinite(e) else 0.0 for _, e in stats]
        ax.bar(xs, [m for m, _ in stats], width, yerr=errs if any(errs) else None, capsize=2,
               color=PALETTE[i % len(PALETTE)], label=name)  # fmt: skip
    ax.set_xticks(np.arange(len(groups)), list(groups))
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, ncol=2)


def compare_figure(rows: dict[str, list[dict[str, float]]], title: str = ""):
    """Grouped bars with error bars (see the module doc)."""
    fig, axes = new_figure(1, 1, panel=(max(6.0, 1.3 * len(COLUMNS) * max(1, len(rows)) / 3), 4.0))
    ax = axes[0, 0]
    series = {f"{m} (n={len(v)})": [summarize(v, c) for c in COLUMNS] for m, v in rows.items()}
    bar_axes(ax, COLUMNS, series, "x100 (mean ± std over seeds)")
    ax.set_title(title or "methods compared", fontsize=9)
    return fig

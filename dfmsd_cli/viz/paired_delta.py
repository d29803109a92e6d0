"""``dfmsd viz compare RESULTS.json``: the benchmark's paired Δ vs the student alone as bars.

``RESULTS.json`` is written by ``examples/compare_table.py --json`` (``examples/compare.sh``):
per pair and row, ``delta[METRIC]`` = the paired difference Δ_s = metric(row, s) −
metric(student alone, s) over the seeds s both have, x100, as ``mean``, ``std``, ``n``,
``better`` (seeds with Δ_s > 0) and ``significant`` (a paired t-test at 5 % rejects Δ = 0).

One panel per pair; one horizontal bar per row: the mean paired Δ, error bar ± one sample std
of the paired Δ (not of the raw metric: the seed-to-seed spread the pairing removes is not
drawn), "k/n" written next to it; rows whose Δ is significant are drawn solid, the others
hatched and pale. Rows the pair could not run (skipped) or without a common seed are left out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from dfmsd_cli.errors import UserError
from dfmsd_cli.viz.common import PALETTE, new_figure


def read_results(path: str | Path) -> dict[str, Any]:
    """The parsed RESULTS.json (a folder: its ``results.json``); one-line errors."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise UserError(
            f"{path} does not exist: pass the results.json of examples/compare.sh "
            "(python examples/compare_table.py OUT --json OUT/results.json writes it)"
        )
    try:
        results = json.loads(path.read_text())
    except ValueError as exc:
        raise UserError(f"{path} is not JSON ({exc}): rewrite it with compare_table.py") from exc
    if not isinstance(results, dict) or not isinstance(results.get("pairs"), dict):
        raise UserError(f"{path} has no 'pairs': pass a results.json of examples/compare_table.py")
    return results


def delta_rows(pair: dict[str, Any], metric: str) -> list[tuple[str, dict[str, Any]]]:
    """``(label, delta)`` of every row of ``pair`` with a paired Δ of ``metric``, table order."""
    rows = []
    for entry in pair.get("rows", {}).values():
        d = (entry.get("delta") or {}).get(metric)
        if d and d.get("n"):
            rows.append((entry.get("label", "?"), d))
    return rows


def delta_figure(results: dict[str, Any], metric: str = "mAP"):
    """The figure of the module doc."""
    columns = results.get("columns") or [metric]
    if metric not in columns:
        raise UserError(f"--metric {metric} is not in the results: use one of {', '.join(columns)}")
    pairs = {k: delta_rows(p, metric) for k, p in results["pairs"].items()}
    pairs = {k: v for k, v in pairs.items() if v}
    if not pairs:
        raise UserError(
            "no row with a paired difference in the results (each needs finished runs of the "
            "row and of 'none' on a common seed): finish examples/compare.sh first"
        )
    height = max(len(v) for v in pairs.values())
    fig, axes = new_figure(len(pairs), 1, panel=(5.2, 0.9 + 0.32 * height))
    for ax, (name, rows) in zip(axes[0], pairs.items(), strict=True):
        y = np.arange(len(rows))[::-1]
        means = [d["mean"] for _, d in rows]
        errs = [d.get("std") or 0.0 for _, d in rows]
        for yi, m, e, (_, d) in zip(y, means, errs, rows, strict=True):
            sig = bool(d.get("significant"))
            color = PALETTE[0] if m >= 0 else PALETTE[3]
            ax.barh(yi, m, xerr=e if e else None, capsize=2, color=color,
                    alpha=1.0 if sig else 0.45, hatch=None if sig else "//",
                    edgecolor=color)  # fmt: skip
            ax.annotate(f"{d.get('better', 0)}/{d['n']}", (0, yi), xytext=(2, 0), fontsize=6,
                        textcoords="offset points", va="center", ha="left")  # fmt: skip
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(y, [label for label, _ in rows], fontsize=7)
        ax.set_xlabel(f"paired Δ {metric} vs student alone (x100, mean ± std over seeds)",
                      fontsize=7)  # fmt: skip
        title = results["pairs"][name].get("title", name)
        ax.set_title(f"{title}\nsolid: paired t-test 5 %; k/n: seeds better", fontsize=8)
    return fig


__all__ = ["delta_figure", "delta_rows", "read_results"]

"""Aggregate several `dfmsd demo` results.json files: per-seed rows and DFMSD − baseline as
mean ± std (x100), as a markdown table."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

COLUMNS = ("mAP", "APs", "APm", "APl", "mAR")


def row(m: dict | None) -> dict[str, float]:
    return (m or {}).get("bbox", m or {})


def main(paths: list[str]) -> str:
    runs = [json.loads(Path(p).read_text()) for p in paths]
    runs.sort(key=lambda r: r["config"]["seed"])
    t = [r["teachers"] for r in runs][0]
    head = ["seed", f"{t[0]} mAP", f"{t[1]} mAP", "baseline mAP", "DFMSD mAP"]
    head += [f"Δ {c}" for c in COLUMNS] + ["wall s", "CPU s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    deltas: dict[str, list[float]] = {c: [] for c in COLUMNS}
    for r in runs:
        m = r["metrics"]
        d = {c: 100 * (row(m["DFMSD"])[c] - row(m["baseline"])[c]) for c in COLUMNS}
        for c in COLUMNS:
            deltas[c].append(d[c])
        cpu = sum(p["cpu_s"] for p in r["phases"].values())
        cells = [str(r["config"]["seed"])]
        cells += [f"{100 * row(m[f'teacher {x}'])['mAP']:.1f}" for x in t]
        cells += [f"{100 * row(m['baseline'])['mAP']:.1f}", f"{100 * row(m['DFMSD'])['mAP']:.1f}"]
        cells += [f"{d[c]:+.1f}" for c in COLUMNS]
        cells += [f"{r['total_wall_s']:.0f}", f"{cpu:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    summary = ["**mean ± std**", "", "", "", ""]
    for c in COLUMNS:
        sd = statistics.stdev(deltas[c]) if len(deltas[c]) > 1 else 0.0
        summary.append(f"**{statistics.mean(deltas[c]):+.1f} ± {sd:.1f}**")
    summary += ["", ""]
    lines.append("| " + " | ".join(summary) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(main(sys.argv[1:]))

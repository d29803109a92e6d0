"""Aggregate examples/compare.sh runs into a markdown table (mean ± std over seeds, x100).

Reads OUT/<method>/s<seed>/eval_stage*_val2017.json (the last stage's evaluation, written by
`dfmsd distill`) and prints one row per method with mAP, APs, APm, APl, mAR and Δ mAP against
`none` (the student alone), in the style of the DFMSD paper's Tables 6 and 10.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

COLUMNS = ("mAP", "APs", "APm", "APl", "mAR")
ORDER = ("none", "mgd", "pkd", "fgd", "fgd-warmup", "dmkd", "dfmsd", "dfmsd-no-sal",
         "dfmsd-no-me", "dfmsd-no-sfa", "dfmsd-adv")  # fmt: skip
LABEL = {"none": "student alone", "dfmsd-no-sal": "DFMSD w/o SAL", "dfmsd-no-me": "DFMSD w/o ME",
         "dfmsd-no-sfa": "DFMSD w/o SFA", "dfmsd": "DFMSD", "fgd-warmup": "FGD + KD warm-up",
         "dfmsd-adv": "DFMSD + adv view"}  # fmt: skip


def final_metrics(run: Path) -> dict[str, float] | None:
    files = sorted(run.glob("eval_stage*_val2017.json"))
    if not files or not (run / "student.pth").is_file():  # unfinished: its last stage is missing
        return None
    d = json.loads(files[-1].read_text())
    return d.get("bbox") or d.get("metrics", {}).get("bbox")


def main(root: Path) -> str:
    rows = {}
    others = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in ORDER)
    for method in (*ORDER, *others):  # others: methods registered since (compare.sh runs all)
        runs = sorted((root / method).glob("s*"))
        vals = [m for m in (final_metrics(r) for r in runs) if m]
        if vals:
            rows[method] = vals
    base = statistics.mean(v["mAP"] for v in rows["none"]) if "none" in rows else None
    lines = [
        "| method | seeds | " + " | ".join(COLUMNS) + " | Δ mAP |",
        "|---|---|" + "---|" * (len(COLUMNS) + 1),
    ]
    for method, vals in rows.items():
        cells = []
        for c in COLUMNS:
            xs = [100 * v[c] for v in vals if v[c] >= 0]  # COCO reports -1: no such objects
            if not xs:
                cells.append("–")
                continue
            sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
            cells.append(f"{statistics.mean(xs):.1f} ± {sd:.1f}")
        mean_map = statistics.mean(v["mAP"] for v in vals)
        delta = "" if base is None or method == "none" else f"{100 * (mean_map - base):+.1f}"
        lines.append(f"| {LABEL.get(method, method)} | {len(vals)} | " + " | ".join(cells)
                     + f" | {delta} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    print(main(Path(sys.argv[1] if len(sys.argv) > 1 else "dfmsd-demo/compare")))

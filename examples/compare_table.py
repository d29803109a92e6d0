"""Aggregate examples/compare.sh runs: the paper's Table 2/6 layout with **paired** differences.

Reads ``ROOT/<pair>/<row>/s<seed>/`` (``summary.json``: the last stage's bbox metrics and the
optimizer steps; ``config.json``: the run's options; ``student.pth`` marks a finished run) and
``ROOT/<pair>/<row>/s<seed>.skipped`` (a method the pair cannot serve: its one-line error) and
``s<seed>.time.json`` (wall/CPU seconds measured by /usr/bin/time, one line per sitting).

Per pair and row: mean ± std over seeds of mAP, APs, APm, APl, mAR, ARs, ARm, ARl (x100), and
the paired difference against ``none`` (the student alone) **of the same seed**:
Δ_s = metric(row, s) − metric(none, s), reported as mean ± std over the seeds both have, the
sign count "better on k of n", and whether a two-sided paired t-test at 5 % rejects Δ = 0
(``t = mean / (std / √n)`` against Student's t quantile with n − 1 degrees of freedom).
``--json RESULTS.json`` writes every run's numbers and configuration and every row's statistics
(read by ``dfmsd viz compare``). ``--prior OLD.json`` adds the finished and skipped runs of an
earlier results.json (each marked ``"from": OLD.json``) that ROOT does not hold finished: a
benchmark grows across sittings and machines without rerunning what it already measured
(``examples/compare.sh`` skips those runs when ``PRIOR=OLD.json``).

    python examples/compare_table.py runs/compare --json runs/compare/results.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

COLUMNS = ("mAP", "APs", "APm", "APl", "mAR", "ARs", "ARm", "ARl")
BASELINE = "none"
PAPER_BASELINE = "none-paper"  # the student alone at dfmsd-paper's 2x budget
PAIRS = {  # the pairs compare.sh knows; another folder with runs is shown under its own name
    "het": "heterogeneous: retina_tiny ← fcos_tiny, gfl_tiny",
    "hom": "homogeneous: gfl_tiny ← gfl_tiny",
}
ORDER = ("none", "fkd", "fgd", "fgd-warmup", "mgd", "amd", "dmkd", "pkd", "crosskd", "samkd",
         "samkd-no-sld", "samkd-grid1", "gdetkd", "gdetkd-no-sgfi", "gdetkd-no-ckd", "dfmsd",
         "none-paper", "dfmsd-paper", "dfmsd-no-sal", "dfmsd-no-me", "dfmsd-no-sfa", "dfmsd-adv",
         "dfmsd-pca32", "dfmsd-uint8", "dfmsd-bf16kb3", "dfmsd-float32", "dfmsd-lr")  # fmt: skip
LABEL = {
    "none": "student alone",
    "fgd-warmup": "FGD + KD warm-up (100 it.)",
    "dfmsd": "DFMSD",
    "dfmsd-paper": "DFMSD, paper budget (each stage the full budget: 2x steps)",
    "none-paper": "student alone, 2x steps (dfmsd-paper's budget)",
    "dfmsd-no-sal": "DFMSD w/o SAL",
    "dfmsd-no-me": "DFMSD w/o ME",
    "dfmsd-no-sfa": "DFMSD w/o SFA",
    "dfmsd-adv": "DFMSD + adversarial view",
    "dfmsd-pca32": "DFMSD on --pca 32 stores",
    "dfmsd-uint8": "DFMSD on --dtype uint8 stores",
    "dfmsd-bf16kb3": "DFMSD on bfloat16 --keepbits 3 stores",
    "dfmsd-float32": "DFMSD on --dtype float32 stores (lossless)",
    "dfmsd-lr": "DFMSD, --lr 0.0200001 (a change of no consequence)",
    "samkd-no-sld": "SAMKD w/o SLD (SFD alone)",
    "samkd-grid1": "SAMKD, one 1x1 window level",
    "gdetkd-no-sgfi": "G-DetKD w/o SGFI",
    "gdetkd-no-ckd": "G-DetKD w/o CKD",
}
# two-sided 95 % quantiles of Student's t, degrees of freedom 1..30 (beyond: the normal's)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


def t_quantile(df: int) -> float:
    return T975[df - 1] if df <= len(T975) else 1.960


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_run(run: Path) -> dict[str, Any]:
    """One run's record: status, metrics (fractions, as COCOeval gives them), steps, config."""
    pair, row, seed = run.parent.parent.name, run.parent.name, int(run.name[1:])
    rec: dict[str, Any] = {"pair": pair, "row": row, "seed": seed, "dir": str(run)}
    skipped = run.with_name(run.name + ".skipped")
    if skipped.is_file():
        return {**rec, "status": "skipped", "reason": skipped.read_text().strip()}
    summary = _read_json(run / "summary.json")
    if summary is None or not (run / "student.pth").is_file():
        return {**rec, "status": "unfinished"}
    stages = summary.get("stages", [])
    bbox = (stages[-1].get("val") or {}).get("bbox") if stages else None
    evals = sorted(run.glob("eval_stage*_val*.json"))
    last_eval = _read_json(evals[-1]) if evals else None
    if bbox is None and last_eval:
        bbox = last_eval.get("bbox")
    config = _read_json(run / "config.json") or {}
    times = []
    tfile = run.with_name(run.name + ".time.json")
    if tfile.is_file():
        # /usr/bin/time writes "Command exited with non-zero status N" before a failed sitting
        times = [json.loads(x) for x in tfile.read_text().splitlines() if x.startswith("{")]
    return {
        **rec,
        "status": "done" if bbox else "no-metrics",
        "metrics": {c: bbox.get(c) for c in COLUMNS} if bbox else None,
        "val_images": (last_eval or {}).get("images"),
        "steps": sum(int(s.get("iterations", 0)) for s in stages),
        "stage_epochs": [s.get("epochs_done") for s in stages],
        "seconds": summary.get("seconds"),
        "cpu_seconds": round(sum(t["user_s"] + t["sys_s"] for t in times), 1) if times else None,
        "wall_seconds": round(sum(t["wall_s"] for t in times), 1) if times else None,
        "stopped": any(s.get("stopped") for s in stages),
        "method": summary.get("method"),
        "config": config.get("options", config),
    }


def _is_pair(name: str) -> bool:
    """compare.sh's data and store folders (data, cache, cache-adv, cache-NAME) are not pairs."""
    return name != "data" and not name.startswith("cache")


def collect(root: Path) -> list[dict[str, Any]]:
    """Every run under ROOT/<pair>/<row>/s<seed> (finished, unfinished or skipped)."""
    runs = []
    for pair in sorted(p for p in root.iterdir() if p.is_dir() and _is_pair(p.name)):
        for row in sorted(p for p in pair.iterdir() if p.is_dir()):
            seeds = {p.name.split(".")[0] for p in row.iterdir() if p.name[:1] == "s"}
            for s in sorted(x for x in seeds if x[1:].isdigit()):
                runs.append(read_run(row / s))
    return runs


def merge_prior(runs: list[dict[str, Any]], prior: list[Path]) -> list[dict[str, Any]]:
    """``runs`` plus each earlier results.json's finished/skipped runs that ``runs`` lacks.

    A run under ROOT that is finished or skipped wins over an earlier record of the same
    (pair, row, seed); an unfinished one does not (the earlier, finished record is kept).
    """
    key = lambda r: (r["pair"], r["row"], r["seed"])  # noqa: E731
    have = {key(r) for r in runs if r["status"] in ("done", "skipped")}
    out = [r for r in runs if r["status"] in ("done", "skipped")]
    unfinished = [r for r in runs if r["status"] not in ("done", "skipped")]
    for path in prior:
        data = _read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
            raise SystemExit(f"error: {path} is not a compare_table.py results.json")
        for r in data["runs"]:
            if r.get("status") in ("done", "skipped") and key(r) not in have:
                have.add(key(r))
                out.append({**r, "from": r.get("from", str(path))})
    out += [r for r in unfinished if key(r) not in have]
    return sorted(out, key=lambda r: (r["pair"], r["row"], r["seed"]))


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def paired_delta(row: dict[int, dict], base: dict[int, dict], col: str) -> dict[str, Any] | None:
    """Δ_s = row − base over the seeds both have (x100): mean, std, n, better (Δ_s > 0),
    and the paired t-test at 5 % (``significant``); None without a common seed."""
    seeds = sorted(s for s in row if s in base and row[s][col] >= 0 and base[s][col] >= 0)
    if not seeds:
        return None
    d = {s: 100 * (row[s][col] - base[s][col]) for s in seeds}
    mean, sd = _mean_sd(list(d.values()))
    n = len(seeds)
    if sd > 0:
        sig = n > 1 and abs(mean) / (sd / math.sqrt(n)) > t_quantile(n - 1)
    else:
        sig = n > 1 and mean != 0
    return {"mean": round(mean, 2), "std": round(sd, 2), "n": n,
            "better": sum(v > 0 for v in d.values()), "significant": bool(sig),
            "per_seed": {str(s): round(v, 2) for s, v in d.items()}}  # fmt: skip


def _row_order(rows: list[str]) -> list[str]:
    known = [r for r in ORDER if r in rows]
    return known + sorted(r for r in rows if r not in ORDER)


def aggregate(runs: list[dict[str, Any]], versus: tuple[str, ...] = ()) -> dict[str, Any]:
    """Per pair and row: n, seeds, mean/std per column (x100), steps, paired Δ vs none, and
    the paired Δ mAP vs each row of ``versus`` (``entry["versus"][row]``)."""
    pairs: dict[str, Any] = {}
    for pair in sorted({r["pair"] for r in runs}, key=lambda p: (p not in PAIRS, p)):
        mine = [r for r in runs if r["pair"] == pair]
        done = {}
        for r in mine:
            if r["status"] == "done":
                done.setdefault(r["row"], {})[r["seed"]] = r["metrics"]
        base = done.get(BASELINE, {})
        rows: dict[str, Any] = {}
        for row in _row_order(sorted({r["row"] for r in mine})):
            per = done.get(row, {})
            entry: dict[str, Any] = {"label": LABEL.get(row, row), "n": len(per),
                                     "seeds": sorted(per)}  # fmt: skip
            skipped = [r for r in mine if r["row"] == row and r["status"] == "skipped"]
            if skipped:
                entry["skipped"] = skipped[0]["reason"]
            steps = sorted({r["steps"] for r in mine if r["row"] == row and r.get("steps")})
            entry["steps"] = steps
            cpu = [r["cpu_seconds"] for r in mine if r["row"] == row and r.get("cpu_seconds")]
            if cpu and steps:
                entry["cpu_seconds_per_step"] = round(sum(cpu) / len(cpu) / max(steps), 3)
            entry["mean"], entry["std"] = {}, {}
            for c in COLUMNS:
                xs = [100 * m[c] for m in per.values() if m[c] is not None and m[c] >= 0]
                if xs:
                    entry["mean"][c], entry["std"][c] = (round(v, 2) for v in _mean_sd(xs))
            # a 2x-budget row (dfmsd-paper) is paired with the student alone at that budget
            own = (
                done.get(PAPER_BASELINE)
                if row.endswith("-paper") and row != PAPER_BASELINE
                else None
            )
            if row != BASELINE and (own or base):
                entry["baseline"] = PAPER_BASELINE if own else BASELINE
                entry["delta"] = {c: paired_delta(per, own or base, c) for c in COLUMNS}
            for v in versus:
                if row != v and done.get(v) and per:
                    entry.setdefault("versus", {})[v] = paired_delta(per, done[v], "mAP")
            rows[row] = entry
        pairs[pair] = {"title": PAIRS.get(pair, pair), "rows": rows}
    return pairs


def _pm(mean: float, sd: float, n: int, sign: bool = False) -> str:
    """``mean ± std``; one seed has no spread, so its value stands alone."""
    m = f"{mean:+.1f}" if sign else f"{mean:.1f}"
    return f"{m} ± {sd:.1f}" if n > 1 else m


def render_versus(pairs: dict[str, Any], versus: tuple[str, ...]) -> str:
    """Markdown: per pair and ``versus`` row, every other row's paired Δ mAP against it."""
    out = []
    for p in pairs.values():
        for v in versus:
            lines = []
            for e in p["rows"].values():
                d = (e.get("versus") or {}).get(v)
                if d:
                    lines.append(f"| {e['label']} | {_pm(d['mean'], d['std'], d['n'], sign=True)}"
                                 f" | {d['better']}/{d['n']} | "
                                 f"{'yes' if d['significant'] else 'no'} |")  # fmt: skip
            if lines:
                name = p["rows"].get(v, {}).get("label", v)
                out += [f"### {p['title']}: paired Δ mAP vs {name}", "",
                        f"| method | Δ mAP vs {name} | better | t 5 % |", "|---|---|---|---|",
                        *lines, ""]  # fmt: skip
    return "\n".join(out)


def render(pairs: dict[str, Any]) -> str:
    """Markdown: one table per pair (x100, mean ± std over seeds; paired Δ mAP vs alone)."""
    out = []
    head = "| method | n | " + " | ".join(COLUMNS) + " | steps | Δ mAP (paired) | better | t 5 % |"
    for p in pairs.values():
        out += [f"### {p['title']}", "", head, "|---|---|" + "---|" * (len(COLUMNS) + 4)]
        notes = []
        for e in p["rows"].values():
            if e.get("skipped") and not e["n"]:
                notes.append(f"- {e['label']}: skipped — {e['skipped']}")
                continue
            if not e["n"]:
                continue
            cells = [_pm(e["mean"][c], e["std"][c], e["n"]) if c in e["mean"] else "–"
                     for c in COLUMNS]  # fmt: skip
            d = (e.get("delta") or {}).get("mAP")
            dm = _pm(d["mean"], d["std"], d["n"], sign=True) if d else ""
            better = f"{d['better']}/{d['n']}" if d else ""
            sig = ("yes" if d["significant"] else "no") if d else ""
            steps = "/".join(str(s) for s in e["steps"])
            out.append(f"| {e['label']} | {e['n']} | " + " | ".join(cells)
                       + f" | {steps} | {dm} | {better} | {sig} |")  # fmt: skip
        out += ["", *notes, ""] if notes else [""]
    out.append(
        "bbox x100 on the validation split; mean ± std over seeds; Δ = row − student alone of "
        "the same seed (same initial weights and data order), mean ± std over seeds (rows "
        "`*-paper`: against `none-paper`, the student alone at the same 2x budget); better: "
        "seeds with Δ > 0; t 5 %: a paired t-test rejects Δ = 0."
    )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path, nargs="?", default=Path("runs/compare"))
    ap.add_argument("--json", type=Path, default=None, help="also write results.json here")
    ap.add_argument(
        "--versus",
        action="append",
        default=[],
        metavar="ROW",
        help="also the paired Δ mAP of every row against ROW (repeatable)",
    )
    ap.add_argument(
        "--prior",
        type=Path,
        action="append",
        default=[],
        metavar="RESULTS.json",
        help="also the finished runs of an earlier results.json that ROOT lacks (repeatable)",
    )
    args = ap.parse_args(argv)
    runs = merge_prior(collect(args.root) if args.root.is_dir() else [], args.prior)
    versus = tuple(args.versus)
    pairs = aggregate(runs, versus)
    if args.json is not None:
        val = sorted({r["val_images"] for r in runs if r.get("val_images")})
        result = {"root": str(args.root), "columns": list(COLUMNS), "baseline": BASELINE,
                  "seeds": sorted({r["seed"] for r in runs}), "val_images": val,
                  "pairs": pairs, "runs": runs}  # fmt: skip
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return render(pairs) + ("\n\n" + render_versus(pairs, versus) if versus else "")


if __name__ == "__main__":
    print(main(sys.argv[1:]))

"""Rich tables for ``dfmsd bench`` results (every number is in the JSON; tables: the key ones)."""

from __future__ import annotations

import math
from typing import Any

from rich.table import Table


def _f(v: Any, fmt: str = "{:.3g}") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return fmt.format(v) if isinstance(v, (int, float)) else str(v)


def _kb(v: Any) -> str:
    return "-" if v is None else f"{v / 1024:.1f} KB"


def precompute_tables(r: dict[str, Any]) -> list[Table]:
    t = Table(title=f"precompute {r['teacher']} on {r['images']} images ({r['img_scale']})")
    for c in ("encoding", "teacher only s", "precompute s", "loop ÷ teacher", "total ÷ teacher",
              "CPU ÷ teacher CPU", "bytes/image", "compression", "h / 118k images"):  # fmt: skip
        t.add_column(c, justify="right")
    h = r.get("hours_per_118k_images")
    for dt, p in r.get("precompute", {}).items():
        t.add_row(
            dt,
            _f(p["teacher_only_s"], "{:.2f}"),
            _f(p["precompute_s"], "{:.2f}"),
            _f(p["ratio"], "{:.3f}"),
            _f(p["ratio_total"], "{:.3f}"),
            _f(p.get("ratio_cpu"), "{:.3f}"),
            _kb(p.get("bytes_per_image")),
            _f(p.get("compression_ratio"), "{:.2f}"),
            _f(h, "{:.1f}") if dt == "float16" else "",
        )
    tables = [t]
    writer = {dt: p for dt, p in r.get("precompute", {}).items() if p.get("writer_cpu_s")}
    if writer:  # what one writer thread sustains: compare a GPU teacher's images/s with it
        t = Table(title="store writer threads: CPU per image (compression, files, rows)")
        for c in ("encoding", "writer CPU ms/image", "images/s per writer thread"):
            t.add_column(c, justify="right")
        for dt, p in writer.items():
            per = p["writer_cpu_s"] / r["images"]
            t.add_row(dt, f"{1000 * per:.1f}", f"{1 / per:.1f}")
        tables.append(t)
    rounds = {dt: p for dt, p in r.get("precompute", {}).items() if p.get("ratio_cpu_runs")}
    if rounds:  # bench precompute --repeats N: the medians above, and their spread
        n = len(next(iter(rounds.values()))["ratio_cpu_runs"])
        t = Table(title=f"precompute ÷ teacher only over {n} rounds: median (min–max)")
        for c in ("encoding", "loop ÷ teacher", "CPU ÷ teacher CPU"):
            t.add_column(c, justify="right")
        for dt, p in rounds.items():
            spread = [f"{p[k]:.3f} ({min(p[k + '_runs']):.3f}–{max(p[k + '_runs']):.3f})"
                      for k in ("ratio", "ratio_cpu")]  # fmt: skip
            t.add_row(dt, *spread)
        tables.append(t)
    return [*tables, _memory_table(r)]


def store_tables(r: dict[str, Any]) -> list[Table]:
    tables = []
    q = r.get("quantization")
    if q:
        t = Table(
            title=f"store encodings on {q['images']} {r['teacher']} images "
            "(blosc-zstd3, byte shuffle; bit shuffle for uint8)"
        )
        for c in ("encoding", "bytes/image", "÷ float32", "encode MB/s", "decode MB/s",
                  "rel. RMSE", "loss change"):  # fmt: skip
            t.add_column(c, justify="right")
        for name, d in q["encodings"].items():
            t.add_row(
                name,
                _kb(d["bytes_per_image"]),
                _f(d["vs_float32"], "{:.3f}"),
                _f(d["encode_MBps"], "{:.0f}"),
                _f(d["decode_MBps"], "{:.0f}"),
                _f(d["relative_rmse_mean"], "{:.2e}"),
                _f(d.get("loss_relative_change_mean"), "{:.2e}"),
            )
        tables.append(t)
    if r.get("read"):
        rate = r.get("student_train_images_per_s")
        t = Table(title=f"store read vs student ({r['student']} train step: {_f(rate)} img/s)")
        for c in ("dtype", "read img/s", "workers", "read ÷ student"):
            t.add_column(c, justify="right")
        for dt, d in r["read"].items():
            t.add_row(
                dt,
                _f(d["images_per_s"], "{:.1f}"),
                str(d["num_workers"]),
                _f(r["read_vs_student"][dt], "{:.1f}"),
            )
        tables.append(t)
    if r.get("flip_cosine"):
        t = Table(title="cosine(teacher(flip x), flip(teacher(x))) per level")
        t.add_column("stride", justify="right")
        t.add_column("mean", justify="right")
        t.add_column("min", justify="right")
        for s, d in r["flip_cosine"].items():
            t.add_row(s, _f(d["mean"], "{:.4f}"), _f(d["min"], "{:.4f}"))
        tables.append(t)
    if r.get("precompute"):
        tables += precompute_tables(r)[:1]
    tables.append(_memory_table(r))
    return tables


def _memory_table(r: dict[str, Any]) -> Table:
    m = r.get("memory", {})
    t = Table(title="peak memory of the measurement process")
    for c in ("peak RSS MB", "after imports MB", "CUDA peak MB", "isolated"):
        t.add_column(c, justify="right")
    t.add_row(
        _f(m.get("peak_rss_mb"), "{:.0f}"),
        _f(m.get("base_rss_mb"), "{:.0f}"),
        _f(m.get("cuda_peak_mb"), "{:.0f}"),
        str(r.get("isolated")),
    )
    return t


def distill_tables(r: dict[str, Any]) -> list[Table]:
    t = Table(
        title=f"distill step: {r['student']} ← {','.join(r['teachers'])}, batch {r['batch_size']},"
        f" {r['img_scale']}, {r['steps']} timed steps"
    )
    unit = "CPU s/step" if r.get("clock") == "cpu" else "s/step"
    for c in ("run", unit, "÷ student", "peak RSS MB", "work RSS MB"):
        t.add_column(c, justify="right")
    student = r["runs"].get("student", {})
    for name, d in r["runs"].items():
        base = student.get("seconds_per_step")
        t.add_row(
            name,
            _f(d["seconds_per_step"], "{:.3f}"),
            _f(d["seconds_per_step"] / base if base else None, "{:.3f}"),
            _f(d["peak_rss_mb"], "{:.0f}"),
            _f(d["work_rss_mb"], "{:.0f}"),
        )
    r2 = Table(title="ratios")
    r2.add_column("ratio")
    r2.add_column("value", justify="right")
    for k, v in r["ratios"].items():
        r2.add_row(k, _f(v, "{:.3f}"))
    parts = sorted({k for d in r["runs"].values() for k in d.get("split", {})})
    t3 = Table(title=f"step split ({unit}, steady steps)")
    t3.add_column("run")
    for k in parts:
        t3.add_column(k, justify="right")
    for name, d in r["runs"].items():
        t3.add_row(name, *(_f(d.get("split", {}).get(k), "{:.4f}") for k in parts))
    return [t, t3, r2]


TABLES = {"precompute": precompute_tables, "store": store_tables, "distill": distill_tables}

"""``bench precompute`` / ``bench store``: the store engineer's measurements, user-facing.

The measurements themselves live in :mod:`dfmsd_cli.store.measure` (``bench_store``); this module
runs them in a fresh process (so the reported peak memory is theirs) and shapes the result:

* ``precompute``: precompute wall time ÷ teacher-only wall time over the same batches (the
  loop ratio excludes the one-off store creation; the total ratio includes it), per dtype;
  bytes/image and compression ratio of the written store; hours per 118k images (COCO train).
* ``store``: bytes/image per dtype and codec with the relative RMSE of float16 / uint8 and the
  change of a distillation loss computed from the store; shuffled read throughput (images/s
  through a DataLoader) against the images/s a student train step consumes; the flip cosine
  (teacher(flip x) vs flip(teacher(x))), which is why the store keeps an ``hflip`` view.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from dfmsd_cli.bench.isolate import run_isolated

PARTS = {"precompute": ("precompute",), "store": ("flip", "quant", "precompute", "read")}


def store_measure(
    ann_file: str,
    image_dir: str,
    img_scale: tuple[int, int],
    threads: int | None = None,
    quiet: bool = False,
    **kw,
) -> dict[str, Any]:
    """Child-process entry: ``bench_store`` with a geometry built from ``img_scale``."""
    import torch

    from dfmsd_cli.data.geometry import Geometry
    from dfmsd_cli.store.measure import bench_store

    if threads:
        torch.set_num_threads(int(threads))
    if quiet:
        kw["log"] = lambda *a: None
    return bench_store(ann_file, image_dir, geometry=Geometry(img_scale=tuple(img_scale)), **kw)


def bench_store_cmd(
    what: str,
    data: str | Path,
    split: str = "train2017",
    teacher: str = "retina_r50",
    student: str = "retina_r18",
    images: int = 16,
    img_scale: tuple[int, int] = (1333, 800),
    batch_size: int = 2,
    num_workers: int = 2,
    isolate: bool = True,
    work_dir: str | Path | None = None,
    seed: int = 0,
    threads: int | None = None,
    quiet: bool = False,
    repeats: int = 1,
) -> dict[str, Any]:
    """Run the ``what`` ("precompute" or "store") measurements; returns a JSON-able dict."""
    from dfmsd_cli.data.loader import resolve_data

    ann, image_dir = resolve_data(Path(data), split, None, None)
    work = Path(work_dir or tempfile.mkdtemp(prefix=f"dfmsd-bench-{what}-"))
    kwargs = dict(
        ann_file=str(ann),
        image_dir=str(image_dir),
        img_scale=tuple(img_scale),
        teacher=teacher,
        student=student,
        images=images,
        work_dir=str(work),
        num_workers=num_workers,
        batch_size=batch_size,
        seed=seed,
        parts=PARTS[what],
        threads=threads,
        quiet=quiet,
        repeats=repeats,
    )
    res = run_isolated("dfmsd_cli.bench.store:store_measure", kwargs, isolate=isolate)
    out = {"bench": what, "data": str(data), "split": split, **res["result"]}
    out["batch_size"] = batch_size
    out["num_workers"] = num_workers
    out["memory"] = {k: v for k, v in res.items() if k != "result"}
    out["isolated"] = isolate
    out["work_dir"] = str(work)
    return out

"""``bench_distill``: what a distillation step costs with the store, without it, and alone.

Three runs of :func:`dfmsd_cli.distill.run.distill` on the same images, batch and student,
each in a fresh process (:mod:`dfmsd_cli.bench.isolate`) so its peak memory is its own:

* ``student``  ``--method none``: the student alone (detection loss only);
* ``store``    ``--method dfmsd`` reading the teacher stores: the measured stage is the last one
               (stronger teacher: L_DFM + L_ME on the regenerated enhanced view + L_SFA), the
               most expensive stage of a DFMSD run;
* ``online``   the same with ``--online``: the teachers in the loop (the stronger teacher on the
               original and the enhanced view, the weaker one for the area ratio that picks the
               enhancement) — what a store-less distiller pays.

The measured time is the steady-state seconds per optimizer step (the first step, with its
start-up costs, and a checkpoint written when the run stops mid-epoch excluded;
``steady_seconds_per_step`` of the engine), with its split (``split``: data wait, forward and
backward of each pass — ``main``/``all``, ``me``, ``adv`` — and the optimizer step). The store's
own cost is ``store_overhead_seconds_per_step``: the store-fed step's data wait minus the
student-alone step's (with ``--num-workers 0`` the store reads happen in that wait). With two
teachers the first stage runs one epoch over the benchmark images first (not timed). Teachers
are precomputed here into ``work_dir/cache`` (``--max-images``), so stores and runs never touch
the user's cache. Ratios: store ÷ student (the issue's target ≤ 1.15), online ÷ store, and
peak memory store ÷ student.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

from dfmsd_cli.bench.isolate import run_isolated
from dfmsd_cli.errors import UserError


def subset_annotations(ann: Path, images: int, out: Path) -> Path:
    """Write the first ``images`` images of ``ann`` (file order) with their annotations."""
    import json

    from dfmsd_cli.utils.io import atomic_write_text

    d = json.loads(Path(ann).read_text())
    imgs = d["images"][:images]
    ids = {im["id"] for im in imgs}
    sub = {
        **d,
        "images": imgs,
        "annotations": [a for a in d["annotations"] if a["image_id"] in ids],
    }
    atomic_write_text(out, json.dumps(sub))
    return out


def _stage1_steps(ann: Path, image_dir: Path, batch_size: int) -> int:
    """Optimizer steps of one epoch of the first stage (images with boxes, as distill trains)."""
    from dfmsd_cli.data.coco import CocoDetection

    ds = CocoDetection(ann, image_dir, train=True, skip_empty=True)
    return max(1, math.ceil(len(ds.image_ids) / batch_size))


def distill_steps(**kw: Any) -> dict[str, Any]:
    """One measured distill run (runs in the child process): the last stage's timing."""
    import torch

    from dfmsd_cli.distill.run import DistillOptions, distill

    threads = kw.pop("threads", None)
    if threads:
        torch.set_num_threads(int(threads))
    # "cpu": the process CPU clock (all threads), which a busy shared machine does not inflate
    clock = time.process_time if kw.pop("clock", "wall") == "cpu" else time.perf_counter
    for k in ("out", "data", "ann", "images"):
        kw[k] = Path(kw[k])
    summary = distill(DistillOptions(**kw), clock=clock)
    last = summary["stages"][-1]
    return {
        "stage": last["stage"],
        "teacher": last["teacher"],
        "steps": last["steps_this_run"],
        "seconds_per_step": last.get("steady_seconds_per_step") or last["seconds_per_step"],
        "split": last.get("split_seconds_per_step", {}),
    }


def bench_distill(
    data: str | Path,
    split: str = "train2017",
    student: str = "retina_tiny",
    teachers: tuple[str, ...] = ("fcos_tiny", "gfl_tiny"),
    teacher_weights: tuple[str | None, ...] = (),
    images: int = 16,
    steps: int = 10,
    img_scale: tuple[int, int] = (1333, 800),
    batch_size: int = 2,
    num_workers: int = 0,
    device: str = "cpu",
    online: bool = True,
    isolate: bool = True,
    work_dir: str | Path | None = None,
    seed: int = 0,
    threads: int | None = None,
    clock: str = "wall",
    log=print,
) -> dict[str, Any]:
    """Measure the three runs; returns a JSON-able dict (``runs``, ``ratios``, settings).

    ``clock="cpu"`` times steps in process CPU seconds instead of wall seconds (use it on a
    shared machine; with ``isolate=True`` so that each run's clock is its own process's)."""
    from dfmsd_cli.data.geometry import Geometry
    from dfmsd_cli.data.loader import resolve_data
    from dfmsd_cli.store.precompute import PrecomputeOptions, precompute

    if not teachers or len(teachers) > 2:
        raise UserError(f"--teachers takes one or two names (weaker,stronger), got {teachers}")
    if clock not in ("wall", "cpu"):
        raise UserError(f"--clock must be wall or cpu, got '{clock}'")
    if steps < 2 or images < 1:
        raise UserError(
            "--num-steps must be >= 2 (the first step is not timed) and --num-images >= 1"
        )
    weights = list(teacher_weights) + [None] * (len(teachers) - len(teacher_weights))
    full_ann, image_dir = resolve_data(Path(data), split, None, None)
    work = Path(work_dir or tempfile.mkdtemp(prefix="dfmsd-bench-distill-"))
    # every run (stores, student, online) sees exactly the same first ``images`` images
    ann = subset_annotations(full_ann, images, work / f"instances_{split}_first{images}.json")
    cache = work / "cache"
    geometry = Geometry(img_scale=tuple(img_scale))

    t0 = time.perf_counter()
    for k, t in enumerate(teachers):
        last = k == len(teachers) - 1 and len(teachers) == 2
        precompute(
            ann,
            image_dir,
            PrecomputeOptions(
                teacher=t,
                split=split,
                weights=weights[k],
                cache=str(cache),
                views=["orig", "hflip"],
                enhance_from=teachers[0] if last else None,
                geometry=geometry,
                batch_size=batch_size,
                num_workers=num_workers,
                device=device,
                seed=seed,
                progress=False,
            ),
        )
    log(f"stores ready in {time.perf_counter() - t0:.1f}s: {cache}")

    steps1 = _stage1_steps(ann, image_dir, batch_size) if len(teachers) == 2 else 0
    common = dict(
        student=student,
        data=str(data),
        ann=str(ann),
        images=str(image_dir),
        split=split,
        img_scale=tuple(img_scale),
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        seed=seed,
        evaluate=False,
        overwrite=True,
        warmup_iters=1,
        threads=threads,
        clock=clock,
    )
    big = 10**6  # epochs: the run is cut by max_steps
    configs: dict[str, dict[str, Any]] = {
        "student": dict(method="none", epochs=(big,), max_steps=steps),
        "store": dict(
            method="dfmsd",
            stages=tuple(teachers),
            cache=str(cache),
            epochs=(1, big) if steps1 else (big,),
            max_steps=steps1 + steps,
        ),
    }
    if online:
        configs["online"] = dict(configs["store"], online=True, teacher_weights=tuple(weights))
    runs: dict[str, dict[str, Any]] = {}
    for name, cfg in configs.items():
        kwargs = {**common, **cfg, "out": str(work / f"run_{name}")}
        log(f"measuring {name} ({steps} steps)...")
        res = run_isolated("dfmsd_cli.bench.distill:distill_steps", kwargs, isolate=isolate)
        runs[name] = {
            "seconds_per_step": res["result"]["seconds_per_step"],
            "split": res["result"].get("split", {}),
            "steps": res["result"]["steps"],
            "stage": res["result"]["stage"],
            "peak_rss_mb": res["peak_rss_mb"],
            "base_rss_mb": res["base_rss_mb"],
            "work_rss_mb": round(res["peak_rss_mb"] - res["base_rss_mb"], 1),
            **({"cuda_peak_mb": res["cuda_peak_mb"]} if "cuda_peak_mb" in res else {}),
        }
        log(f"  {name}: {runs[name]}")

    def ratio(a: str, b: str, key: str = "seconds_per_step") -> float | None:
        if a not in runs or b not in runs or not runs[b][key]:
            return None
        return round(runs[a][key] / runs[b][key], 3)

    ratios = {
        "store_step_over_student_step": ratio("store", "student"),
        "online_step_over_store_step": ratio("online", "store"),
        "store_peak_rss_over_student": ratio("store", "student", "peak_rss_mb"),
        "store_work_rss_over_student": ratio("store", "student", "work_rss_mb"),
    }
    # the store's own cost: data wait of the store-fed step minus the student's (image decode is
    # common to both; with --num-workers 0 the store reads happen in that wait)
    if "store" in runs and "student" in runs:
        d_store = runs["store"]["split"].get("data")
        d_student = runs["student"]["split"].get("data")
        if d_store is not None and d_student is not None:
            ratios["store_overhead_seconds_per_step"] = round(d_store - d_student, 5)
    if "cuda_peak_mb" in runs.get("store", {}):
        ratios["store_cuda_peak_over_student"] = ratio("store", "student", "cuda_peak_mb")
    return {
        "bench": "distill",
        "data": str(data),
        "split": split,
        "student": student,
        "teachers": list(teachers),
        "teacher_weights": [w or "random init" for w in weights],
        "images": images,
        "steps": steps,
        "img_scale": list(img_scale),
        "batch_size": batch_size,
        "num_workers": num_workers,
        "device": device,
        "isolated": isolate,
        "clock": clock,
        "measured_stage": "last (DFM + ME + SFA)" if len(teachers) == 2 else "single (DFM + SFA)",
        "runs": runs,
        "ratios": ratios,
        "work_dir": str(work),
    }

"""``run_demo``: the whole DFMSD pipeline on a synthetic dataset, small enough for a 2-core CPU.

Phases (each timed; all through the library functions the CLI commands wrap):

1. ``data``       ``make_synthetic``: a COCO-layout dataset of coloured shapes (seeded).
2. ``teachers``   the weaker and the stronger teacher (``fcos_tiny``, ``gfl_tiny``; one-stage
                  detectors of other heads than the ``retina_tiny`` student): the shipped
                  checkpoints, or trained here; both evaluated on val.
3. ``baseline``   the student alone (``dfmsd train``) for the sum of the stage epochs.
4. ``precompute`` the weaker teacher with views orig+hflip, the stronger one with orig+hflip
                  and the masking-enhancement view built from the weaker teacher's area ratios.
5. ``distill``    DFMSD in two stages (SAL: weaker, then stronger; ME and SFA in the last
                  stage) from the stores, with the same batch size, learning rate and epochs as
                  the baseline; the student is evaluated after each stage.
6. ``report``     the table, ``results.json``, ``demo.png`` (curves + bars) and ``attention.png``
                  (the stronger teacher's attention and DFMSD masks on a validation image),
                  drawn by ``dfmsd viz``'s functions (``dfmsd_cli.demo.report``).

The comparison is fair by construction: same data, same initial weights (same seed), same
number of optimizer steps, same recipe; only the teachers' knowledge differs.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dfmsd_cli.errors import UserError
from dfmsd_cli.utils.console import console

SPLIT, VAL_SPLIT = "train2017", "val2017"


@dataclass
class DemoConfig:
    """Every knob of the demo; defaults: the measured configuration of docs/demo.md."""

    out: Path = Path("dfmsd-demo")
    seed: int = 0
    images: int = 200
    val_images: int = 100
    img_scale: tuple[int, int] = (320, 256)
    image_sizes: tuple[int, int] = (160, 320)  # synthetic images' long side, min..max
    student: str = "retina_tiny"
    teachers: tuple[str, ...] = ("fcos_tiny", "gfl_tiny")  # weaker first (SAL order)
    teacher_dir: Path | None = None  # shipped checkpoints; None: examples/demo_teachers
    train_teachers: bool = False  # train the teachers here instead of loading shipped ones
    teacher_epochs: int | None = None  # only with train_teachers (None: the shipped recipe)
    epochs: tuple[int, ...] = (5, 5)  # per stage; the baseline trains for their sum
    batch_size: int = 4
    lr: float = 0.02
    warmup_iters: int = 50
    grad_clip: float = 35.0
    alpha: float | None = None  # None: the method's defaults (dfmsd_cli.distill.methods)
    beta: float | None = None
    gamma: float | None = None
    num_workers: int = 0
    device: str = "auto"
    overwrite: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # more method options (by name)

    @classmethod
    def quick(cls, out: str | Path, seed: int = 0, **kw: Any) -> DemoConfig:
        """A seconds-long configuration for tests: 8 tiny images, one epoch per stage, teachers
        trained for a few steps here (the result is meaningless, the pipeline is the same)."""
        base = dict(
            out=Path(out),
            seed=seed,
            images=8,
            val_images=4,
            img_scale=(128, 96),
            image_sizes=(64, 128),
            train_teachers=True,
            teacher_epochs=1,
            epochs=(1, 1),
            batch_size=4,
            warmup_iters=2,
        )
        base.update(kw)
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


class _Timer:
    """Wall and process-CPU seconds per phase (CPU time ≈ wall × cores used when unloaded)."""

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, float]] = {}

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                console.rule(f"[bold]demo: {name}")
                self.t0, self.c0 = time.perf_counter(), time.process_time()

            def __exit__(self, *exc):
                timer.phases[name] = {
                    "wall_s": round(time.perf_counter() - self.t0, 2),
                    "cpu_s": round(time.process_time() - self.c0, 2),
                }

        return _Ctx()


def _prepare_out(cfg: DemoConfig) -> Path:
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: pass a folder path")
    if out.is_dir() and any(out.iterdir()):
        marker = out / "config.json"
        is_demo = marker.is_file() and json.loads(marker.read_text()).get("command") == "demo"
        if not is_demo:
            raise UserError(f"{out} is not empty and holds no demo run: choose another --out")
        if not cfg.overwrite:
            raise UserError(
                f"{out} already holds a demo run: pass --overwrite to replace it or choose "
                "another --out"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    from dfmsd_cli.engine.rundir import write_config

    write_config(out, cfg.to_dict(), "demo")
    return out


def _check(cfg: DemoConfig) -> None:
    if len(cfg.teachers) != 2:
        raise UserError(f"the demo needs two teachers (weaker,stronger), got {list(cfg.teachers)}")
    if len(cfg.epochs) != len(cfg.teachers) or any(e < 1 for e in cfg.epochs):
        raise UserError(f"--epochs needs one positive value per stage, got {list(cfg.epochs)}")
    if cfg.student in cfg.teachers:
        raise UserError("the student must differ from the teachers: pick another --student")
    if cfg.images < 2 or cfg.val_images < 1:
        raise UserError("the demo needs at least 2 training and 1 validation image")


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run every phase; returns (and writes to ``OUT/results.json``) the results dict."""
    from dfmsd_cli.data.synthetic import make_synthetic

    _check(cfg)
    out = _prepare_out(cfg)
    timer = _Timer()
    t_start = time.perf_counter()
    data = out / "data"

    with timer("data"):
        make_synthetic(
            data,
            images=cfg.images,
            seed=cfg.seed,
            val_images=cfg.val_images,
            min_size=cfg.image_sizes[0],
            max_size=cfg.image_sizes[1],
            progress=True,
        )

    with timer("teachers"):
        weights = _teachers(cfg, out)
    metrics: dict[str, dict] = {}
    with timer("teacher eval"):
        for name in cfg.teachers:
            metrics[f"teacher {name}"] = _evaluate_checkpoint(name, weights[name], cfg, out)

    with timer("baseline"):
        base = _baseline(cfg, data, out / "baseline")
    metrics["baseline"] = base.get("val", {})

    cache = out / "cache"
    stores: dict[str, dict] = {}
    with timer("precompute"):
        stores = _precompute(cfg, data, cache, weights)

    with timer("distill"):
        dist = _distill(cfg, data, cache, out / "dfmsd")
    stage_metrics = [s.get("val", {}) for s in dist["stages"]]
    for k, m in enumerate(stage_metrics[:-1]):
        metrics[f"DFMSD after stage {k + 1}"] = m
    metrics["DFMSD"] = stage_metrics[-1]

    from dfmsd_cli.demo.report import write_report

    results = {
        "config": cfg.to_dict(),
        "student": cfg.student,
        "teachers": list(cfg.teachers),
        "teacher_weights": {k: str(v) for k, v in weights.items()},
        "metrics": metrics,
        "phases": timer.phases,
        "stores": stores,
        "distill": {"method": dist.get("method"), "stages": dist["stages"]},
        "baseline_run": {k: v for k, v in base.items() if k != "val"},
        "total_wall_s": round(time.perf_counter() - t_start, 2),
        "torch_threads": torch.get_num_threads(),
    }
    write_report(results, out)
    return results


def _teachers(cfg: DemoConfig, out: Path) -> dict[str, Path]:
    """Checkpoint path of each teacher: shipped, or trained on the teacher dataset here."""
    from dfmsd_cli.demo.teachers import (
        TEACHER_DATA_SEED,
        TEACHER_RECIPE,
        shipped_teacher,
        teacher_train_options,
    )

    found = {t: shipped_teacher(t, cfg.teacher_dir) for t in cfg.teachers}
    if not cfg.train_teachers and all(found.values()):
        for t, p in found.items():
            console.print(f"teacher {t}: shipped checkpoint {p}")
        return found  # type: ignore[return-value]
    if not cfg.train_teachers:
        missing = [t for t, p in found.items() if p is None]
        console.print(
            f"[yellow]no shipped checkpoint for {', '.join(missing)} in "
            f"{cfg.teacher_dir or 'examples/demo_teachers'}: training the teachers here "
            "(adds several minutes)"
        )
    from dfmsd_cli.data.synthetic import make_synthetic
    from dfmsd_cli.engine.train import train

    quick = cfg.teacher_epochs is not None
    n_img = cfg.images if quick else TEACHER_RECIPE["images"]
    tdata = make_synthetic(
        out / "teacher_data",
        images=n_img,
        seed=TEACHER_DATA_SEED,
        val_images=max(1, n_img // 5),
        min_size=cfg.image_sizes[0],
        max_size=cfg.image_sizes[1],
        progress=True,
    )
    paths = {}
    for t in cfg.teachers:
        opts = teacher_train_options(
            t,
            tdata,
            out / "teachers" / t,
            epochs=cfg.teacher_epochs,
            img_scale=cfg.img_scale if quick else None,
            num_workers=cfg.num_workers,
            device=cfg.device,
        )
        train(opts)
        paths[t] = out / "teachers" / t / "model.pth"
    return paths


def _evaluate_checkpoint(name: str, weights: Path, cfg: DemoConfig, out: Path) -> dict:
    from dfmsd_cli.data.geometry import Geometry
    from dfmsd_cli.data.synthetic import CLASSES
    from dfmsd_cli.models.checkpoint import load_teacher

    from .report import evaluate_model

    model = load_teacher(name, len(CLASSES), str(weights), cfg.seed)
    return evaluate_model(model, out / "data", Geometry(img_scale=cfg.img_scale), cfg, out)


def _baseline(cfg: DemoConfig, data: Path, run: Path) -> dict[str, Any]:
    from dfmsd_cli.engine.train import TrainOptions, train

    opts = TrainOptions(
        model=cfg.student,
        out=run,
        data=data,
        epochs=sum(cfg.epochs),
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        warmup_iters=cfg.warmup_iters,
        grad_clip=cfg.grad_clip,
        img_scale=tuple(cfg.img_scale),
        seed=cfg.seed,
        num_workers=cfg.num_workers,
        device=cfg.device,
        evaluate=True,
    )
    return train(opts)


def _precompute(
    cfg: DemoConfig, data: Path, cache: Path, weights: dict[str, Path]
) -> dict[str, dict]:
    """Weaker teacher: orig+hflip; stronger: orig+hflip+me (enhancement from the weaker)."""
    from dfmsd_cli.data.geometry import Geometry
    from dfmsd_cli.store.inspect import store_info
    from dfmsd_cli.store.precompute import PrecomputeOptions, precompute

    ann = data / "annotations" / f"instances_{SPLIT}.json"
    stores = {}
    weaker = cfg.teachers[0]
    for k, t in enumerate(cfg.teachers):
        opts = PrecomputeOptions(
            teacher=t,
            split=SPLIT,
            weights=str(weights[t]),
            cache=str(cache),
            views=["orig", "hflip"],
            enhance_from=weaker if k == len(cfg.teachers) - 1 else None,
            geometry=Geometry(img_scale=tuple(cfg.img_scale)),
            batch_size=cfg.batch_size,
            num_workers=cfg.num_workers,
            device=cfg.device,
            seed=cfg.seed,
        )
        summary = precompute(ann, data / SPLIT, opts)
        info = store_info(summary["path"])
        stores[t] = {
            "path": summary["path"],
            "views": list(info.get("views", [])),
            "images": summary["images"],
            "bytes": info.get("bytes_on_disk"),
            "bytes_per_image": info.get("bytes_per_image"),
            "wall_s": round(summary["wall_s"], 2),
            "teacher_s": round(summary["teacher_s"], 2),
        }
    return stores


def _distill(cfg: DemoConfig, data: Path, cache: Path, run: Path) -> dict[str, Any]:
    from dfmsd_cli.distill.run import DistillOptions, distill

    opts = DistillOptions(
        student=cfg.student,
        out=run,
        stages=tuple(cfg.teachers),
        data=data,
        cache=str(cache),
        epochs=tuple(cfg.epochs),
        method="dfmsd",
        method_options={"alpha": cfg.alpha, "beta": cfg.beta, "gamma": cfg.gamma, **cfg.extra},
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        warmup_iters=cfg.warmup_iters,
        grad_clip=cfg.grad_clip,
        img_scale=tuple(cfg.img_scale),
        seed=cfg.seed,
        num_workers=cfg.num_workers,
        device=cfg.device,
        evaluate=True,
    )
    return distill(opts)

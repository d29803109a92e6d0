"""``dfmsd demo``: the whole pipeline on synthetic data in minutes on a CPU (README's first command)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dfmsd_cli.cli.app import app, parse_int_list
from dfmsd_cli.cli.options import command
from dfmsd_cli.data.geometry import parse_img_scale
from dfmsd_cli.utils.options import (
    BatchOptions,
    DeviceOptions,
    GeometryOptions,
    NumImagesOptions,
    OutOptions,
    opt,
    reuse,
)


@dataclass(kw_only=True)
class DemoCLI(NumImagesOptions, OutOptions, GeometryOptions, BatchOptions, DeviceOptions):
    out: Path = reuse(OutOptions, "out", default=Path("dfmsd-demo"))
    seed: int = opt(0, "Seed of the dataset, weights and data order.")
    overwrite: bool = reuse(OutOptions, "overwrite", help="Replace an earlier demo in --out.")
    num_images: int = reuse(
        NumImagesOptions, "num_images", default=200, help="Synthetic training images."
    )
    val_images: int = opt(100, "Synthetic validation images.")
    epochs: str = opt("5,5", "Epochs per DFMSD stage; the baseline trains for their sum.")
    img_scale: str = reuse(GeometryOptions, "img_scale", default="320,256")
    student: str = opt("retina_tiny", "Student zoo name.")
    teachers: str = opt("fcos_tiny,gfl_tiny", "Weaker,stronger teacher (zoo names).")
    teacher_dir: Path | None = opt(
        None, "Folder with TEACHER.pth checkpoints (default: examples/demo_teachers)."
    )
    train_teachers: bool = opt(
        False, "Train the teachers here instead of loading the shipped checkpoints."
    )
    batch_size: int = reuse(BatchOptions, "batch_size", default=4, help="Images per step.")
    lr: float = opt(0.02, "SGD learning rate (baseline and every stage).")
    alpha: float | None = opt(None, "DFM loss weight (default: the method's).")
    beta: float | None = opt(None, "ME loss weight (default: the method's).")
    gamma: float | None = opt(None, "SFA loss weight (default: the method's).")
    num_workers: int = reuse(
        DeviceOptions,
        "num_workers",
        default=0,
        help="DataLoader workers (0 is fastest on 2 cores).",
    )
    quick: bool = opt(False, "Seconds-long smoke run (tests).", hidden=True)


@command(app, "demo", DemoCLI)
def demo_cmd(o: DemoCLI) -> None:
    """Run DFMSD end to end on a synthetic dataset: teachers, baseline student, precompute, two-stage distillation, evaluation; prints baseline vs DFMSD and writes results.json + demo.png."""
    from dfmsd_cli.demo import DemoConfig, run_demo
    from dfmsd_cli.errors import UserError

    names = tuple(t.strip() for t in o.teachers.split(",") if t.strip())
    if len(names) != 2:
        raise UserError(f"--teachers needs two names WEAKER,STRONGER, got '{o.teachers}'")
    if o.quick:
        cfg = DemoConfig.quick(
            o.out, o.seed, overwrite=o.overwrite, device=o.device, student=o.student, teachers=names
        )
    else:
        cfg = DemoConfig(
            out=o.out,
            seed=o.seed,
            overwrite=o.overwrite,
            images=o.num_images,
            val_images=o.val_images,
            epochs=tuple(parse_int_list(o.epochs, "--epochs")),
            img_scale=parse_img_scale(o.img_scale),
            student=o.student,
            teachers=names,
            teacher_dir=o.teacher_dir,
            train_teachers=o.train_teachers,
            batch_size=o.batch_size,
            lr=o.lr,
            alpha=o.alpha,
            beta=o.beta,
            gamma=o.gamma,
            num_workers=o.num_workers,
            device=o.device,
        )
    run_demo(cfg)

"""``dfmsd demo``: the whole pipeline on synthetic data in minutes on a CPU (README's first command)."""

from __future__ import annotations

from pathlib import Path

import typer

from dfmsd_cli.cli.app import ConfigOption, app, parse_int_list
from dfmsd_cli.data.geometry import parse_img_scale


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("dfmsd-demo"), "--out", "-o", help="Output folder."),
    seed: int = typer.Option(0, "--seed", help="Seed of the dataset, weights and data order."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier demo in --out."),
    images: int = typer.Option(200, "--images", help="Synthetic training images."),
    val_images: int = typer.Option(100, "--val-images", help="Synthetic validation images."),
    epochs: str = typer.Option(
        "5,5", "--epochs", help="Epochs per DFMSD stage; the baseline trains for their sum."
    ),
    img_scale: str = typer.Option(
        "320,256", "--img-scale", help="Keep-ratio resize bound LONG,SHORT."
    ),
    student: str = typer.Option("retina_tiny", "--student", help="Student zoo name."),
    teachers: str = typer.Option(
        "fcos_tiny,gfl_tiny", "--teachers", help="Weaker,stronger teacher (zoo names)."
    ),
    teacher_dir: Path | None = typer.Option(
        None,
        "--teacher-dir",
        help="Folder with TEACHER.pth checkpoints (default: examples/demo_teachers).",
    ),
    train_teachers: bool = typer.Option(
        False,
        "--train-teachers",
        help="Train the teachers here instead of loading the shipped checkpoints.",
    ),
    batch_size: int = typer.Option(4, "--batch-size", "-b", help="Images per step."),
    lr: float = typer.Option(0.02, "--lr", help="SGD learning rate (baseline and every stage)."),
    alpha: float | None = typer.Option(
        None, "--alpha", help="DFM loss weight (default: the method's)."
    ),
    beta: float | None = typer.Option(
        None, "--beta", help="ME loss weight (default: the method's)."
    ),
    gamma: float | None = typer.Option(
        None, "--gamma", help="SFA loss weight (default: the method's)."
    ),
    num_workers: int = typer.Option(
        0, "--num-workers", help="DataLoader workers (0 is fastest on 2 cores)."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    quick: bool = typer.Option(
        False, "--quick", hidden=True, help="Seconds-long smoke run (tests)."
    ),
    config: str | None = ConfigOption,
) -> None:
    """Run DFMSD end to end on a synthetic dataset: teachers, baseline student, precompute, two-stage distillation, evaluation; prints baseline vs DFMSD and writes results.json + demo.png."""
    from dfmsd_cli.demo import DemoConfig, run_demo
    from dfmsd_cli.errors import UserError

    names = tuple(t.strip() for t in teachers.split(",") if t.strip())
    if len(names) != 2:
        raise UserError(f"--teachers needs two names WEAKER,STRONGER, got '{teachers}'")
    if quick:
        cfg = DemoConfig.quick(
            out, seed, overwrite=overwrite, device=device, student=student, teachers=names
        )
    else:
        cfg = DemoConfig(
            out=out,
            seed=seed,
            overwrite=overwrite,
            images=images,
            val_images=val_images,
            epochs=tuple(parse_int_list(epochs, "--epochs")),
            img_scale=parse_img_scale(img_scale),
            student=student,
            teachers=names,
            teacher_dir=teacher_dir,
            train_teachers=train_teachers,
            batch_size=batch_size,
            lr=lr,
            alpha=alpha,
            beta=beta,
            gamma=gamma,
            num_workers=num_workers,
            device=device,
        )
    run_demo(cfg)

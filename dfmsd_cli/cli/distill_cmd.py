"""``dfmsd distill``: stage-wise distillation of a student from precomputed teacher stores."""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from dfmsd_cli.cli.app import ConfigOption, app, parse_int_list
from dfmsd_cli.cli.checks import declare_registry_checked
from dfmsd_cli.data.geometry import parse_img_scale
from dfmsd_cli.distill.methods.registry import all_options, method_help, option_help
from dfmsd_cli.utils.console import console


def with_method_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add a flag for every registered method option ``func`` does not declare by hand (its
    parameter ``name`` or ``no_name``): ``--name-with-dashes`` (a switch ``--x/--no-x``), default
    None (the method's resolved default), help from the method modules. Their values reach
    ``func`` as keyword arguments; ``method_config`` checks them (another method's option is
    refused with a one-line error)."""
    sig = inspect.signature(func, eval_str=True)  # real types: the checks read __signature__
    hand = set(sig.parameters) | {n[3:] for n in sig.parameters if n.startswith("no_")}
    extra = []
    for name, opt in all_options().items():
        if name in hand:
            continue
        declare_registry_checked(name)  # method_config runs its check before any work
        flag = f"{opt.flag}/--no-{opt.flag[2:]}" if opt.type is bool else opt.flag
        extra.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(None, flag, help=option_help(name)),
                annotation=opt.type | None,
            )
        )
    plain = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    func.__signature__ = sig.replace(parameters=[*plain, *extra])  # type: ignore[attr-defined]
    func.method_options = tuple(p.name for p in extra)  # type: ignore[attr-defined]
    return func


@app.command("distill")
@with_method_options
def distill_cmd(
    student: str = typer.Option(..., "--student", "-s", help="Student zoo name, e.g. retina_r50."),
    stages: str = typer.Option(
        "",
        "--stages",
        help="Teachers weaker→stronger, e.g. cmr_r101,cmr_x101 (their stores must exist in "
        "--cache; a path ending in .zarr names a store directly). Not needed for --method none.",
    ),
    data: Path | None = typer.Option(
        None, "--data", help="COCO root: ROOT/annotations/instances_{split}.json and ROOT/{split}/."
    ),
    out: Path = typer.Option(
        ...,
        "--out",
        "-o",
        help="Run folder (config.json, metrics.jsonl, last.pth, stage*.pth, student.pth).",
    ),
    cache: str = typer.Option(
        "cache", "--cache", help="Store root: CACHE/TEACHER/SPLIT.zarr (an fsspec URL works)."
    ),
    epochs: str = typer.Option(
        "12", "--epochs", help="Epochs per stage, e.g. 12,12 (one value: the same for all)."
    ),
    method: str = typer.Option("dfmsd", "--method", help=method_help()),
    no_sal: bool = typer.Option(False, "--no-sal", help=option_help("sal")),
    no_me: bool = typer.Option(False, "--no-me", help=option_help("me")),
    no_sfa: bool = typer.Option(False, "--no-sfa", help=option_help("sfa")),
    # method options: help (and checks) declared by the method modules (distill/methods/)
    adv: bool | None = typer.Option(None, "--adv/--no-adv", help=option_help("adv")),
    adv_weight: float | None = typer.Option(None, "--adv-weight", help=option_help("adv_weight")),
    me_stages: str = typer.Option("last", "--me-stages", help=option_help("me_stages")),
    alpha: float | None = typer.Option(None, "--alpha", help=option_help("alpha")),
    beta: float | None = typer.Option(None, "--beta", help=option_help("beta")),
    gamma: float | None = typer.Option(None, "--gamma", help=option_help("gamma")),
    lambda_s: float | None = typer.Option(None, "--lambda-s", help=option_help("lambda_s")),
    lambda_c: float | None = typer.Option(None, "--lambda-c", help=option_help("lambda_c")),
    tau: float | None = typer.Option(None, "--tau", help=option_help("tau")),
    mask_rule: str | None = typer.Option(None, "--mask-rule", help=option_help("mask_rule")),
    sfa_levels: str | None = typer.Option(None, "--sfa-levels", help=option_help("sfa_levels")),
    kd_warmup: int | None = typer.Option(None, "--kd-warmup", help=option_help("kd_warmup")),
    split: str = typer.Option("train2017", "--split", help="Training split (the stores' split)."),
    val_split: str = typer.Option("val2017", "--val-split", help="Split evaluated after stages."),
    ann: Path | None = typer.Option(None, "--ann", help="Annotation file (overrides --data)."),
    images: Path | None = typer.Option(None, "--images", help="Image folder (overrides --data)."),
    batch_size: int = typer.Option(2, "--batch-size", "-b", help="Images per step (per process)."),
    lr: float = typer.Option(0.01, "--lr", help="Base learning rate of SGD (each stage)."),
    warmup_iters: int = typer.Option(500, "--warmup-iters", help="Linear warm-up iterations."),
    grad_clip: float = typer.Option(
        35.0, "--grad-clip", help="Gradient-norm clip (MGD/FGD configs: 35; 0 disables)."
    ),
    weights: str | None = typer.Option(
        None, "--weights", help="Initial student weights: checkpoint, state dict or 'torchvision'."
    ),
    img_scale: str | None = typer.Option(
        None, "--img-scale", help="LONG,SHORT resize bound (default: the stores' geometry)."
    ),
    flip: bool = typer.Option(
        True, "--flip/--no-flip", help="Replay the stores' hflip view (augmentation replay)."
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed (weights, order, views, masks)."),
    num_workers: int = typer.Option(2, "--num-workers", help="DataLoader worker processes."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    no_eval: bool = typer.Option(False, "--no-eval", help="Skip evaluation after each stage."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from last.pth."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run already in --out."),
    save_interval: int = typer.Option(
        0, "--save-interval", help="Also checkpoint every N steps (0: each epoch only)."
    ),
    max_steps: int | None = typer.Option(
        None, "--max-steps", help="Stop after N steps in all (quick runs, benchmarks)."
    ),
    online: bool = typer.Option(
        False,
        "--online",
        help="Teachers in the loop instead of the stores (no disk needed; slower, more memory).",
    ),
    teacher_weights: str = typer.Option(
        "",
        "--teacher-weights",
        help="--online: teacher checkpoints, one per --stages entry (empty: seeded random init).",
    ),
    config: str | None = ConfigOption,
    **method_options: Any,
) -> None:
    """Distill a student stage by stage from teacher stores (never loads a teacher)."""
    from dfmsd_cli.distill.engine import DistillOptions, distill

    opts = DistillOptions(
        student=student,
        out=out,
        stages=tuple(t.strip() for t in stages.split(",") if t.strip()),
        data=data,
        split=split,
        val_split=val_split,
        ann=ann,
        images=images,
        cache=cache,
        epochs=tuple(parse_int_list(epochs, "--epochs")),
        method=method,
        sal=not no_sal,
        me=not no_me,
        sfa=not no_sfa,
        adv=adv,
        adv_weight=adv_weight,
        me_stages=me_stages,
        alpha=alpha,
        beta=beta,
        gamma=gamma,
        lambda_s=lambda_s,
        lambda_c=lambda_c,
        tau=tau,
        mask_rule=mask_rule,
        sfa_levels=sfa_levels,
        kd_warmup=kd_warmup,
        batch_size=batch_size,
        lr=lr,
        warmup_iters=warmup_iters,
        grad_clip=grad_clip or None,
        weights=weights,
        img_scale=parse_img_scale(img_scale) if img_scale else None,
        flip=flip,
        seed=seed,
        num_workers=num_workers,
        device=device,
        evaluate=not no_eval,
        resume=resume,
        overwrite=overwrite,
        save_interval=save_interval,
        max_steps=max_steps,
        online=online,
        teacher_weights=tuple(w.strip() or None for w in teacher_weights.split(","))
        if teacher_weights
        else (),
    )
    summary = distill(_set_method_options(opts, method_options))
    if int(os.environ.get("RANK", "0")) == 0:
        _print_summary(summary)
        from dfmsd_cli.utils.io import atomic_write_text

        if out.is_dir():
            atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str))


def _set_method_options(opts, values: dict[str, Any]):
    """Hand the generated flags' values (those given) to the run's options: its
    ``method_options`` dict (read by ``registry.given_options``)."""
    from dataclasses import fields, replace

    given = {k: v for k, v in values.items() if v is not None}
    if any(f.name == "method_options" for f in fields(opts)):
        return replace(opts, method_options=given)
    # until DistillOptions has that field, today's resolve_method reads each option by name
    for name, value in given.items():
        setattr(opts, name, value)
    return opts


def _print_summary(summary: dict) -> None:
    from rich.table import Table

    table = Table(title="distill")
    for col in ("stage", "teacher", "epochs", "iterations", "s/step", "mAP"):
        table.add_column(col)
    for st in summary["stages"]:
        val = st.get("val") or {}
        bbox = val.get("bbox", val) if isinstance(val, dict) else {}
        m = bbox.get("mAP") if isinstance(bbox, dict) else None
        table.add_row(
            str(st["stage"]),
            str(st["teacher"] or "-"),
            str(st["epochs_done"]),
            str(st["iterations"]),
            f"{st['seconds_per_step']:.3f}",
            f"{m:.3f}" if isinstance(m, float) else "-",
        )
    console.print(table)
    if summary.get("student"):
        console.print(f"student weights: {summary['student']}")

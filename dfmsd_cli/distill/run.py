"""``distill()``: stage-wise distillation of a student from precomputed teacher stores.

Never builds or loads a teacher: all teacher knowledge is read from the stores written by
``dfmsd precompute`` (``dfmsd_cli.store``). Per step (DFMSD, arXiv 2407.13147, Eq. 8 and our
docs/method.md)::

    L = L_det(student, original/hflip view) + α·L_stage + β·L_ME + γ·L_SFA

``L_stage`` is the method's feature loss against the stored features of the view the sample
drew (augmentation replay); ``L_ME`` runs the student's backbone+FPN on the masking-enhancement
input regenerated from the stored parameters and compares with the stored ``me``-view features
(last stage by default); ``L_SFA`` is PKD's standardised MSE on every shared level.

Each stage is a :class:`dfmsd_cli.distill.task.StageTask` run by the one training loop
:func:`dfmsd_cli.engine.fit.fit`: SGD + MMDetection schedule (fresh per stage), gradient-norm
clip 35 by default (MGD/FGD configs; docs/distill.md), the replayable view sampler, atomic
checkpoints with RNG state (``--resume`` continues mid-stage, bit-exact on CPU), run folders,
DDP, progress bars and ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dfmsd_cli.data.geometry import parse_img_scale
from dfmsd_cli.distill.methods import (
    COMMON_OPTIONS,
    MethodConfig,
    all_options,
    get_method,
    method_config,
    method_help,
    options_class,
)
from dfmsd_cli.distill.stages import (
    StageStore,
    open_stage_store,
    plan_stages,
    print_plan,
    run_geometry,
)
from dfmsd_cli.distill.task import RunContext, StageTask
from dfmsd_cli.engine.distributed import barrier, cleanup, init_distributed
from dfmsd_cli.engine.fit import FitOptions, fit
from dfmsd_cli.engine.progress import MetricsLog
from dfmsd_cli.engine.rundir import prepare_run_dir, run_lock, write_config
from dfmsd_cli.engine.state import load_state, rng_state, seed_everything, set_rng_state
from dfmsd_cli.engine.train import write_summary
from dfmsd_cli.errors import UserError
from dfmsd_cli.utils.console import console
from dfmsd_cli.utils.device import resolve_device
from dfmsd_cli.utils.options import (
    BatchOptions,
    DataOptions,
    DeviceOptions,
    GeometryOptions,
    OptimOptions,
    OutOptions,
    ValidationOptions,
    int_tuple,
    name_tuple,
    opt,
    record,
    reuse,
)


def _teacher_weights(text: str) -> tuple[str | None, ...]:
    return tuple(w.strip() or None for w in text.split(",")) if text else ()


@dataclass(kw_only=True)
class DistillOptions(
    DeviceOptions, GeometryOptions, BatchOptions, ValidationOptions, OptimOptions, DataOptions,
    OutOptions,
):  # fmt: skip
    """Options of ``dfmsd distill`` (also usable from Python): the typer command, the
    ``--config`` keys and ``config.json`` come from these fields (``dfmsd_cli.utils.options``).

    ``method_options`` holds the method options by name (``alpha``, ``sal``, ``lambda_s``, ...:
    ``COMMON_OPTIONS`` and each registered method's ``MethodSpec.options``); absent or None:
    the method's default. Each is a flag of ``dfmsd distill`` generated from the registry.
    ``stages``, ``epochs``, ``img_scale`` and ``teacher_weights`` are typed as text on the
    command line and parsed here (``opt(parse=...)``)."""

    student: str = opt(help="Student zoo name, e.g. retina_r50.", short="-s")
    stages: tuple[str, ...] = opt(
        "",
        "Teachers weaker→stronger, e.g. cmr_r101,cmr_x101 (their stores must exist in --cache; "
        "a path ending in .zarr names a store directly). Not needed for --method none.",
        parse=name_tuple,
    )
    out: Path = reuse(
        OutOptions,
        "out",
        help="Run folder (config.json, metrics.jsonl, last.pth, stage*.pth, student.pth).",
    )
    cache: str = opt("cache", "Store root: CACHE/TEACHER/SPLIT.zarr (an fsspec URL works).")
    epochs: tuple[int, ...] = reuse(
        OptimOptions,
        "epochs",
        default="12",
        help="Epochs per stage, e.g. 12,12 (one value: the same for all).",
        parse=int_tuple("--epochs"),
    )
    method: str = opt("dfmsd", method_help)
    method_options: dict[str, Any] = opt(
        {}, "Method options by name (flags from the registry).", options_from=options_class
    )
    split: str = reuse(DataOptions, "split", help="Training split (the stores' split).")
    val_split: str = reuse(ValidationOptions, "val_split", help="Split evaluated after stages.")
    batch_size: int = reuse(BatchOptions, "batch_size", help="Images per step (per process).")
    lr: float = reuse(OptimOptions, "lr", help="Base learning rate of SGD (each stage).")
    grad_clip: float | None = reuse(
        OptimOptions,
        "grad_clip",
        default=35.0,
        help="Gradient-norm clip (MGD/FGD configs: 35; 0 disables).",
    )
    weights: str | None = reuse(
        OptimOptions,
        "weights",
        help="Initial student weights: checkpoint, state dict or 'torchvision'.",
    )
    img_scale: tuple[int, int] | None = reuse(
        GeometryOptions,
        "img_scale",
        default=None,
        help="LONG,SHORT resize bound (default: the stores' geometry).",
        parse=parse_img_scale,
    )
    flip: bool = opt(
        True, "Replay the stores' hflip view (augmentation replay).", flag="--flip/--no-flip"
    )
    skip_empty: bool = True  # library only: store rows are matched by image id
    seed: int = reuse(OptimOptions, "seed", help="Random seed (weights, order, views, masks).")
    num_workers: int = reuse(DeviceOptions, "num_workers", help="DataLoader worker processes.")
    evaluate: bool = reuse(ValidationOptions, "evaluate", help="Skip evaluation after each stage.")
    overwrite: bool = reuse(OutOptions, "overwrite", help="Replace a run already in --out.")
    max_steps: int | None = reuse(
        OptimOptions, "max_steps", help="Stop after N steps in all (quick runs, benchmarks)."
    )
    store_concurrency: int | None = opt(
        None,
        "Stores on object storage: most chunk requests in flight per process "
        "(default: DFMSD_STORE_CONCURRENCY, else 64).",
    )
    cache_local: str | None = opt(
        None,
        "Stores on object storage: a local folder keeping a read-through copy of the chunks "
        "read, so later epochs read local disk (default: DFMSD_CACHE_LOCAL).",
    )
    online: bool = opt(
        False,
        "Teachers in the loop instead of the stores (no disk needed; slower, more memory).",
    )
    teacher_weights: tuple[str | None, ...] = opt(
        "",
        "--online: teacher checkpoints, one per --stages entry (empty: seeded random init).",
        parse=_teacher_weights,
    )

    def __post_init__(self) -> None:
        if not self.grad_clip:  # --grad-clip 0 disables clipping (recorded as None)
            self.grad_clip = None


def resolve_method(opts: DistillOptions) -> MethodConfig:
    """The method config for ``opts``: every method option ``opts.method_options`` sets (the
    flags generated from the registry); one the method does not declare counts only when it
    differs from its CLI default (``--no-sal`` etc. default to on), and then ``method_config``
    refuses it."""
    spec = get_method(opts.method)
    declared = {o.name for o in (*COMMON_OPTIONS, *spec.options)}
    known = all_options()
    unknown = sorted(set(opts.method_options) - set(known))
    if unknown:
        raise UserError(
            f"unknown method option(s) {', '.join(unknown)}: use one of {', '.join(known)}"
        )
    given = {}
    for name, value in opts.method_options.items():
        if name in declared or value != known[name].default:
            given[name] = value
    return method_config(opts.method, opts.student, **given)


def identity_of(opts: DistillOptions) -> dict[str, Any]:
    """The options that define a run: a resumed run must match them."""
    return {
        "student": opts.student,
        "stages": list(opts.stages),
        "data": str(opts.data) if opts.data else None,
        "split": opts.split,
        "epochs": list(opts.epochs),
        "method": opts.method,
        "batch_size": opts.batch_size,
        "seed": opts.seed,
    }


def distill(opts: DistillOptions, *, clock: Callable[[], float] = time.perf_counter) -> dict:
    """Run every stage of ``opts``; returns a summary (per-stage steps, time, val metrics).

    ``clock`` times the run and its steps (``bench distill`` passes the process CPU clock).
    Writes ``OUT/config.json``, ``OUT/metrics.jsonl``, ``OUT/last.pth`` (training state, every
    epoch), ``OUT/stage{k}_{teacher}.pth`` (the student after stage k) and ``OUT/student.pth``
    (the final student only: a dfmsd checkpoint whose ``state_dict`` is a plain state dict;
    also after a stop by ``max_steps``, marked ``distill.stopped``) and ``OUT/summary.json``.
    ``OUT`` is locked for the run (``engine.rundir.run_lock``).
    """
    with ExitStack() as held:
        return _distill(opts, clock, held)


def _distill(opts: DistillOptions, clock: Callable[[], float], held: ExitStack) -> dict:
    from dfmsd_cli.data.coco import CocoDetection
    from dfmsd_cli.data.loader import resolve_data
    from dfmsd_cli.models import build_model
    from dfmsd_cli.utils.io import sha256_file

    cfg = resolve_method(opts)
    if opts.online and cfg.adv_required:
        raise UserError(
            "--adv replays perturbations stored by precompute: drop --online or drop --adv"
        )
    plans = plan_stages(cfg, list(opts.stages), list(opts.epochs))
    if opts.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {opts.batch_size}")
    device = resolve_device(opts.device)
    dist_info = init_distributed(device)
    if dist_info.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    out = Path(opts.out)
    ann_file, image_dir = resolve_data(opts.data, opts.split, opts.ann, opts.images)
    geometry = run_geometry(opts.img_scale, opts.cache, opts.split, plans, cfg, online=opts.online)

    # -- the dataset, the student, and every stage's store, checked before any training
    coco = CocoDetection(
        ann_file,
        image_dir,
        geometry=geometry,
        views=("orig", "hflip"),
        train=True,
        skip_empty=opts.skip_empty,  # store rows are matched by image id, so this is safe
    )
    keep = list(range(len(coco.image_ids)))
    if not keep:
        raise UserError(f"no training images in {image_dir}: check --data/--split or annotations")
    seed_everything(opts.seed)
    student = build_model(opts.student, num_classes=coco.num_classes)
    stores: list[StageStore | None] = [None] * len(plans)
    if cfg.needs_store and not opts.online:
        ann_sha = sha256_file(ann_file)
        for k, plan in enumerate(plans):
            stores[k] = open_stage_store(
                plan,
                opts.cache,
                opts.split,
                geometry=geometry,
                ann_sha256=ann_sha,
                image_ids=coco.image_ids,
                train_images=keep,
                student_strides=tuple(student.strides),
                want_views=("orig", "hflip") if opts.flip else ("orig",),
                warn=console.print if dist_info.is_main else (lambda *_: None),
                adv_required=cfg.adv_required,
                concurrency=opts.store_concurrency,
                cache_local=opts.cache_local,
            )

    if cfg.spec.with_stores is not None:  # e.g. samkd's SLD: only with teacher logits
        teachers = [p.teacher for p in plans]
        cfg = cfg.spec.with_stores(cfg, student, stores, bool(opts.online), teachers=teachers)

    resuming = False
    if dist_info.is_main:
        held.enter_context(run_lock(out))
        resuming = prepare_run_dir(out, "distill", identity_of(opts), opts.resume, opts.overwrite)
        write_config(out, {**record(opts), "resolved": cfg.to_dict()}, "distill")
    barrier(dist_info)
    resuming = opts.resume and (out / "last.pth").is_file()
    state = load_state(out / "last.pth") if resuming else None
    if state is not None:
        if state.get("model") != opts.student:
            raise UserError(
                f"{out}/last.pth is a '{state.get('model')}' run, not '{opts.student}': "
                "use another --out or --overwrite"
            )
        student.load_state_dict(state["state_dict"])
    elif opts.weights:
        from dfmsd_cli.models.trunk import init_weights

        say = console.print if dist_info.is_main else None
        init_weights(student, opts.weights, opts.reinit_heads, say=say)
    student.to(device)

    if dist_info.is_main:
        print_plan(cfg, plans, stores, opts, console)
    log = MetricsLog(out / "metrics.jsonl", enabled=dist_info.is_main)
    ctx = RunContext(opts, cfg, coco, geometry, device, dist_info, keep)
    summary: dict[str, Any] = {"method": cfg.to_dict(), "stages": []}
    t0 = clock()
    stopped, steps_done = False, 0  # optimizer steps of this process, all stages (--max-steps)
    for plan, ss in zip(plans, stores, strict=True):
        if state is not None and state["stage"] > plan.index:
            # finished before the interruption; its weights are in the state
            task = StageTask(ctx, student, plan, ss, None)
            summary["stages"].append(_finished_stage(task, state, log, dist_info.is_main))
            continue
        stage_state = state if state is not None and state["stage"] == plan.index else None
        task = StageTask(ctx, student, plan, ss, stage_state)
        mid_stage = stage_state is not None and stage_state.get("optimizer") is not None
        result = fit(
            task,
            _fit_options(opts, out, plan.epochs, steps_done),
            device=device,
            dist=dist_info,
            log=log,
            state=stage_state if mid_stage else None,
            clock=clock,
        )
        steps_done += result["steps_this_run"]
        state = None
        summary["stages"].append(result)
        if not result["complete"] or (result["stopped"] and plan is not plans[-1]):
            stopped = True
            break
    summary["seconds"] = round(clock() - t0, 2)
    # a run stopped by --max-steps also writes student.pth: the student the user stopped at
    if dist_info.is_main:
        from dfmsd_cli.models.checkpoint import make_checkpoint
        from dfmsd_cli.utils.io import atomic_torch_save

        final = make_checkpoint(student, categories=coco.categories, geometry=geometry)
        final["distill"] = {
            "method": cfg.to_dict(),
            "stages": [p.teacher for p in plans],
            "stopped": stopped,  # True: --max-steps ended the run before its last epoch
        }
        atomic_torch_save(final, out / "student.pth")
        summary["student"] = str(out / "student.pth")
        write_summary(out, summary)
    cleanup(dist_info)
    return summary


def _finished_stage(
    task: StageTask, state: dict[str, Any], log: MetricsLog, is_main: bool
) -> dict[str, Any]:
    """The summary entry of a stage a resumed run skips because it finished before.

    Its validation metrics are read back from ``OUT/eval_{tag}_{split}.json``; when that file
    is missing and the state is the stage's final checkpoint (the student in it IS the stage's
    result: a run killed during the stage's evaluation), the evaluation runs now instead of
    being lost.
    """
    plan, opts = task.plan, task.ctx.opts
    entry: dict[str, Any] = {
        **task.summary_fields(),
        "epochs_done": plan.epochs,
        "iterations": _logged_iterations(Path(opts.out) / "metrics.jsonl", plan.index + 1),
        "complete": True,
        "finished_before_resume": True,
    }
    if not opts.evaluate:
        return entry
    path = Path(opts.out) / f"eval_{plan.tag}_{opts.val_split}.json"
    if path.is_file():
        try:
            entry["val"] = json.loads(path.read_text())
        except (OSError, ValueError):
            pass  # a torn file from an old run: the summary just lacks it
    elif is_main and state["stage"] == plan.index + 1 and state.get("optimizer") is None:
        saved = rng_state()  # as in fit: evaluation must not shift the training RNG stream
        metrics = task.evaluate()
        set_rng_state(saved)
        if metrics is not None:
            entry["val"] = metrics
            if metrics:
                log.write({"phase": "val", **task.log_fields(), "epoch": plan.epochs, **metrics})
    return entry


def _logged_iterations(path: Path, stage: int) -> int | None:
    """The last logged training iteration of ``stage`` in ``metrics.jsonl`` (None: none)."""
    last = None
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line torn by a kill
        if rec.get("phase") == "train" and rec.get("stage") == stage:
            last = rec.get("iteration", last)
    return last


def _fit_options(opts: DistillOptions, out: Path, epochs: int, steps_done: int) -> FitOptions:
    """One stage's recipe: a fresh schedule over its epochs, the rest of the step budget."""
    return FitOptions(
        out=out,
        epochs=epochs,
        batch_size=opts.batch_size,
        lr=opts.lr,
        warmup_iters=opts.warmup_iters,
        grad_clip=opts.grad_clip,
        save_interval=opts.save_interval,
        max_steps=None if opts.max_steps is None else opts.max_steps - steps_done,
        seed=opts.seed,
        num_workers=opts.num_workers,
    )


__all__ = ["DistillOptions", "distill", "resolve_method"]

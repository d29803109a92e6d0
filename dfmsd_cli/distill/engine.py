"""``distill()``: stage-wise distillation of a student from precomputed teacher stores.

Never builds or loads a teacher: all teacher knowledge is read from the stores written by
``dfmsd precompute`` (``dfmsd_cli.store``). Per step (DFMSD, arXiv 2407.13147, Eq. 8 and our
docs/method.md)::

    L = L_det(student, original/hflip view) + α·L_stage + β·L_ME + γ·L_SFA

``L_stage`` is the method's feature loss against the stored features of the view the sample
drew (augmentation replay); ``L_ME`` runs the student's backbone+FPN on the masking-enhancement
input regenerated from the stored parameters and compares with the stored ``me``-view features
(last stage by default); ``L_SFA`` is PKD's standardised MSE on every shared level.

Reuses the training machinery of ``dfmsd_cli.engine``: SGD + MMDetection schedule (fresh per
stage), the replayable view sampler, atomic checkpoints with RNG state (``--resume`` continues
mid-stage, bit-exact on CPU), run folders, DDP helpers, progress bars and ``metrics.jsonl``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfmsd_cli.data.geometry import Geometry
from dfmsd_cli.distill.dataset import DistillDataset, collate_distill
from dfmsd_cli.distill.methods import (
    COMMON_OPTIONS,
    MethodConfig,
    all_options,
    build_stage_losses,
    get_method,
    method_config,
)
from dfmsd_cli.distill.model import DistillModel
from dfmsd_cli.distill.online import stage_online_teacher
from dfmsd_cli.distill.stages import (
    StagePlan,
    StageStore,
    open_stage_store,
    plan_stages,
    print_plan,
    run_geometry,
)
from dfmsd_cli.distill.step import train_step
from dfmsd_cli.engine.distributed import all_reduce_mean, barrier, cleanup, init_distributed
from dfmsd_cli.engine.loop import epoch_loader, evaluate_split, options_dict
from dfmsd_cli.engine.progress import MetricsLog, RunningMean
from dfmsd_cli.engine.rundir import prepare_run_dir, write_config
from dfmsd_cli.engine.sampler import ViewSampler
from dfmsd_cli.engine.schedule import StepSchedule, build_sgd
from dfmsd_cli.engine.state import (
    load_state,
    rng_state,
    save_state,
    seed_everything,
    set_rng_state,
)
from dfmsd_cli.errors import UserError
from dfmsd_cli.utils.console import console, format_losses, make_progress
from dfmsd_cli.utils.device import resolve_device


@dataclass
class DistillOptions:
    """Options of ``dfmsd distill`` (also usable from Python)."""

    student: str
    out: Path
    stages: tuple[str, ...] = ()
    data: Path | None = None
    split: str = "train2017"
    val_split: str = "val2017"
    ann: Path | None = None
    images: Path | None = None
    cache: str = "cache"
    epochs: tuple[int, ...] = (12,)
    method: str = "dfmsd"
    sal: bool = True
    me: bool = True
    sfa: bool = True
    adv: bool | None = None  # None: L_adv when the last store has the 'adv' view
    adv_weight: float | None = None
    me_stages: str = "last"
    alpha: float | None = None
    beta: float | None = None
    gamma: float | None = None
    lambda_s: float | None = None
    lambda_c: float | None = None
    tau: float | None = None
    mask_rule: str | None = None
    sfa_levels: str | None = None  # dfmsd: 'all' or N finest shared levels (default 3)
    kd_warmup: int | None = None  # linear warm-up of the distillation weights (iterations)
    batch_size: int = 2
    lr: float = 0.01
    warmup_iters: int = 500
    grad_clip: float | None = 35.0
    weights: str | None = None
    img_scale: tuple[int, int] | None = None
    flip: bool = True
    skip_empty: bool = True
    seed: int = 0
    num_workers: int = 2
    device: str = "auto"
    evaluate: bool = True
    resume: bool = False
    overwrite: bool = False
    save_interval: int = 0
    max_steps: int | None = None  # stop after this many optimizer steps (tests, benchmarks)
    online: bool = False  # teachers in the loop instead of the stores
    teacher_weights: tuple[str | None, ...] = ()  # --online: one per --stages entry


def resolve_method(opts: DistillOptions) -> MethodConfig:
    """The method config for ``opts``: every registered method option (``all_options``) that
    ``opts`` sets; one the method does not declare counts only when it differs from its CLI
    default (``--no-sal`` etc. default to on), and then ``method_config`` refuses it."""
    spec = get_method(opts.method)
    declared = {o.name for o in (*COMMON_OPTIONS, *spec.options)}
    given = {}
    for name, opt in all_options().items():
        value = getattr(opts, name, None)
        if name in declared or value != opt.default:
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


def distill(opts: DistillOptions) -> dict[str, Any]:
    """Run every stage of ``opts``; returns a summary (per-stage steps, time, val metrics).

    Writes ``OUT/config.json``, ``OUT/metrics.jsonl``, ``OUT/last.pth`` (training state, every
    epoch), ``OUT/stage{k}_{teacher}.pth`` (the student after stage k) and ``OUT/student.pth``
    (the final student only: a dfmsd checkpoint whose ``state_dict`` is a plain state dict;
    also after a stop by ``max_steps``, marked ``distill.stopped``).
    """
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
            )

    resuming = False
    if dist_info.is_main:
        resuming = prepare_run_dir(out, "distill", identity_of(opts), opts.resume, opts.overwrite)
        write_config(out, {**options_dict(opts), "resolved": cfg.to_dict()}, "distill")
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
        from dfmsd_cli.models.checkpoint import load_weights

        load_weights(student, opts.weights)
    student.to(device)

    if dist_info.is_main:
        print_plan(cfg, plans, stores, opts, console)
    log = MetricsLog(out / "metrics.jsonl", enabled=dist_info.is_main)
    ctx = _RunContext(opts, cfg, coco, geometry, device, dist_info, out, log, keep)
    summary: dict[str, Any] = {"method": cfg.to_dict(), "stages": []}
    t0 = time.perf_counter()
    stopped = False
    for plan, ss in zip(plans, stores, strict=True):
        if state is not None and state["stage"] > plan.index:
            continue  # finished before the interruption; its weights are in the state
        stage_state = state if state is not None and state["stage"] == plan.index else None
        result = _run_stage(ctx, student, plan, ss, stage_state)
        state = None
        summary["stages"].append(result)
        if not result["complete"] or (result["stopped"] and plan is not plans[-1]):
            stopped = True
            break
    summary["seconds"] = round(time.perf_counter() - t0, 2)
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
    cleanup(dist_info)
    return summary


@dataclass
class _RunContext:
    opts: DistillOptions
    cfg: MethodConfig
    coco: Any
    geometry: Geometry
    device: torch.device
    dist: Any
    out: Path
    log: MetricsLog
    train_images: list[int]
    steps_done: int = 0  # optimizer steps of this process, all stages (--max-steps)


def _run_stage(
    ctx: _RunContext,
    student: nn.Module,
    plan: StagePlan,
    ss: StageStore | None,
    state: dict | None,
) -> dict[str, Any]:
    """Train one stage (resuming from ``state`` when it belongs to this stage)."""
    from dfmsd_cli.models.checkpoint import make_checkpoint
    from dfmsd_cli.utils.io import atomic_torch_save

    opts, cfg, device, dist_info = ctx.opts, ctx.cfg, ctx.device, ctx.dist
    views = ss.views if ss is not None else (("orig", "hflip") if opts.flip else ("orig",))
    ctx.coco.views = views
    mid_stage = state is not None and state.get("optimizer") is not None
    if state is not None and not mid_stage:
        set_rng_state(state["rng"])  # stage boundary: modules are built from the saved stream
    online = (
        stage_online_teacher(
            opts, cfg.sal, plan, student, ctx.coco.num_classes, ctx.geometry, device, console.print
        )
        if opts.online and cfg.needs_store
        else None
    )
    dataset = DistillDataset(
        ctx.coco,
        ss.store if ss is not None else None,
        ss.store_index if ss is not None else None,
        strides=tuple(ss.levels) if ss is not None else None,
        me=ss.me if ss is not None else False,
        keep_raw=online is not None and online.me,
        adv=ss.adv if ss is not None else False,
    )
    if ss is not None:
        losses = build_stage_losses(
            cfg,
            ss.levels,
            student.out_channels,
            ss.store.meta.channels,
            with_me=ss.me,
            with_adv=ss.adv,
        ).to(device)
    elif online is not None:
        losses = build_stage_losses(
            cfg, online.levels, student.out_channels, online.teacher.out_channels, online.me
        ).to(device)
    else:
        losses = nn.ModuleDict()
    model = DistillModel(student, losses, cfg)
    optimizer = build_sgd(model.parameters(), lr=opts.lr)
    schedule = StepSchedule.mmdet(opts.lr, plan.epochs, None, opts.warmup_iters)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    epoch = step = iteration = 0
    if mid_stage:
        losses.load_state_dict(state["distill_state"])
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        epoch, step, iteration = state["epoch"], state["step"], state["iteration"]
        set_rng_state(state["rng"])
        if dist_info.is_main:
            console.print(f"resuming {plan.tag} at epoch {epoch + 1}, step {step}")

    sampler = ViewSampler(
        len(ctx.coco.image_ids),
        len(views),
        shuffle=True,
        seed=opts.seed + 7919 * plan.index,
        keep=ss.train_images if ss is not None else ctx.train_images,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
    )
    steps_per_epoch = max(1, -(-len(sampler) // opts.batch_size))
    ddp_model: nn.Module = model
    if dist_info.enabled:
        ddp_model = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,
        )

    def checkpoint(ep: int, st: int, it: int, done: bool = False) -> None:
        if not dist_info.is_main:
            return
        payload = make_checkpoint(student, categories=ctx.coco.categories, geometry=ctx.geometry)
        payload.update(
            kind="distill-state",
            stage=plan.index + 1 if done else plan.index,
            epoch=ep,
            step=st,
            iteration=it,
            distill_state=None if done else losses.state_dict(),
            optimizer=None if done else optimizer.state_dict(),
            scaler=None if done else scaler.state_dict(),
            options=options_dict(opts),
        )
        save_state(ctx.out / "last.pth", payload)

    smooth = RunningMean()
    t0 = time.perf_counter()
    done_steps, stopped, t_first = 0, False, t0
    t_last, step_split = t0, {}  # end of the last step; summed split of the steady steps
    with make_progress(disable=not dist_info.is_main) as progress:
        task = progress.add_task(
            f"{plan.tag} ({cfg.name})",
            total=plan.epochs * steps_per_epoch,
            completed=epoch * steps_per_epoch + step,
            info="",
        )
        while epoch < plan.epochs and not stopped:
            loader = epoch_loader(
                dataset,
                sampler,
                batch_size=opts.batch_size,
                collate_fn=collate_distill,
                num_workers=opts.num_workers,
                device=device,
                seed=opts.seed,
                epoch=epoch,
                start_step=step,
            )
            model.train()
            t_prev = time.perf_counter()
            for batch in loader:
                if batch is None:
                    continue
                tm: dict[str, float] = {"data": time.perf_counter() - t_prev}
                lr = schedule.apply(optimizer, iteration, epoch)
                optimizer.zero_grad(set_to_none=True)
                model.kd_scale = kd_warmup_factor(iteration, cfg.kd_warmup)
                values, loss = train_step(
                    ddp_model, batch, device, use_amp, scaler, online, tm, time.perf_counter
                )
                t_opt = time.perf_counter()
                if not torch.isfinite(loss):
                    last = ctx.out / "last.pth"
                    kept = (
                        f"the last good checkpoint {last} is kept; "
                        if last.is_file()
                        else "no checkpoint was written yet; "
                    )
                    raise UserError(
                        f"{plan.tag}: loss became {float(loss.detach())} at epoch {epoch + 1} step "
                        f"{step + 1} (parts: {format_losses(values, 10)}): {kept}lower --lr or "
                        "the loss weights (--alpha/--beta/--gamma) or set --grad-clip, then "
                        "--resume (or start anew with --overwrite)"
                    )
                if opts.grad_clip:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                tm["optimizer"] = time.perf_counter() - t_opt
                step, iteration, done_steps = step + 1, iteration + 1, done_steps + 1
                t_last = time.perf_counter()  # a stop checkpoint after the loop is not a step
                if done_steps == 1:
                    t_first = t_last  # steady-state timing excludes start-up
                else:
                    for k, v in tm.items():
                        step_split[k] = step_split.get(k, 0.0) + v
                values = all_reduce_mean(values, dist_info)
                progress.update(
                    task,
                    advance=1,
                    info=f"ep {epoch + 1} lr {lr:.2e} " + format_losses(smooth.update(values), 8),
                )
                ctx.steps_done += 1
                stopped = opts.max_steps is not None and ctx.steps_done >= opts.max_steps
                if iteration % 10 == 0 or step == steps_per_epoch or stopped:
                    ctx.log.write(
                        {
                            "phase": "train",
                            "stage": plan.index + 1,
                            "teacher": plan.teacher,
                            "epoch": epoch + 1,
                            "step": step,
                            "iteration": iteration,
                            "lr": lr,
                            **values,
                        }
                    )
                if opts.save_interval and iteration % opts.save_interval == 0:
                    checkpoint(epoch, step, iteration)
                if stopped:
                    break
                t_prev = time.perf_counter()
            if stopped and step < steps_per_epoch:  # mid-epoch stop (--max-steps)
                checkpoint(epoch, step, iteration)
                break
            epoch, step = epoch + 1, 0
            if epoch < plan.epochs:
                checkpoint(epoch, step, iteration)
            barrier(dist_info)
    elapsed = time.perf_counter() - t0
    result: dict[str, Any] = {
        "stage": plan.index + 1,
        "teacher": plan.teacher,
        "epochs_done": epoch,
        "iterations": iteration,
        "steps_this_run": done_steps,
        "seconds": round(elapsed, 2),
        "seconds_per_step": round(elapsed / max(done_steps, 1), 4),
        "steady_seconds_per_step": (
            round((t_last - t_first) / (done_steps - 1), 4) if done_steps > 1 else None
        ),
        # steady steps' split: data wait, forward/backward per pass, optimizer (bench distill)
        "split_seconds_per_step": {
            k: round(v / (done_steps - 1), 5) for k, v in step_split.items() if done_steps > 1
        },
        "stopped": stopped,
        "complete": epoch >= plan.epochs,
    }
    if not result["complete"]:
        return result
    if dist_info.is_main:
        stage_file = ctx.out / f"{plan.tag}.pth"
        atomic_torch_save(
            make_checkpoint(student, categories=ctx.coco.categories, geometry=ctx.geometry),
            stage_file,
        )
        checkpoint(0, 0, 0, done=True)
        if opts.evaluate:
            saved = rng_state()  # evaluation must not shift the training RNG stream
            result["val"] = evaluate_split(
                student,
                ctx.opts.data,
                ctx.opts.val_split,
                geometry=ctx.geometry,
                batch_size=ctx.opts.batch_size,
                device=ctx.device,
                out=ctx.out / f"eval_{plan.tag}_{ctx.opts.val_split}.json",
            )
            set_rng_state(saved)
            if result["val"]:
                ctx.log.write({"phase": "val", "stage": plan.index + 1, **result["val"]})
    barrier(dist_info)
    return result


def kd_warmup_factor(iteration: int, warmup: int) -> float:
    """The factor on every distillation weight at 0-based ``iteration`` of a stage: a linear
    ramp ``min(1, (iteration + 1) / warmup)``, 1 when ``warmup`` is 0 (``--kd-warmup``)."""
    if warmup <= 0:
        return 1.0
    return min(1.0, (iteration + 1) / warmup)


__all__ = ["DistillModel", "DistillOptions", "distill", "resolve_method"]

"""One distillation stage as a :class:`dfmsd_cli.engine.fit.Task`.

The stage trains ``DistillModel(student, stage losses)``: the student's detection loss plus
the method's losses against the stage's teacher store (or its online teacher), one step by
:func:`dfmsd_cli.distill.step.train_step`. The loop itself (optimizer, schedule, clipping,
checkpoints, resume, timings) is :func:`dfmsd_cli.engine.fit.fit`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfmsd_cli.data.geometry import Geometry
from dfmsd_cli.distill.dataset import DistillDataset, collate_distill
from dfmsd_cli.distill.methods import MethodConfig, build_stage_losses
from dfmsd_cli.distill.model import DistillModel
from dfmsd_cli.distill.online import stage_online_teacher
from dfmsd_cli.distill.stages import StagePlan, StageStore
from dfmsd_cli.distill.step import train_step
from dfmsd_cli.engine.distributed import DistInfo
from dfmsd_cli.engine.fit import StepContext, Task
from dfmsd_cli.engine.loop import evaluate_split, options_dict
from dfmsd_cli.engine.sampler import ViewSampler
from dfmsd_cli.engine.state import set_rng_state
from dfmsd_cli.utils.console import console


@dataclass
class RunContext:
    """What every stage of one ``distill`` run shares."""

    opts: Any  # DistillOptions
    cfg: MethodConfig
    coco: Any  # CocoDetection of the training split
    geometry: Geometry
    device: torch.device
    dist: DistInfo
    train_images: list[int]


class StageTask(Task):
    """Stage ``plan.index`` of a run; ``state`` is the run state when it belongs to this stage
    (mid-stage: restored by ``fit``; at the stage's start: only its RNG streams)."""

    weight_flags = "--alpha/--beta/--gamma"

    def __init__(
        self,
        ctx: RunContext,
        student: nn.Module,
        plan: StagePlan,
        ss: StageStore | None,
        state: dict | None,
    ) -> None:
        self.ctx, self.student, self.plan, self.ss, self.state = ctx, student, plan, ss, state
        self.tag = plan.tag
        self.label = f"{plan.tag} ({ctx.cfg.name})"
        self.collate_fn = collate_distill

    def build(self, device: torch.device, dist: DistInfo) -> None:
        ctx, opts, cfg, plan, ss = self.ctx, self.ctx.opts, self.ctx.cfg, self.plan, self.ss
        views = ss.views if ss is not None else (("orig", "hflip") if opts.flip else ("orig",))
        ctx.coco.views = views
        if self.state is not None and self.state.get("optimizer") is None:
            set_rng_state(self.state["rng"])  # stage boundary: modules are built from it
        self.online = (
            stage_online_teacher(
                opts,
                cfg.sal,
                plan,
                self.student,
                ctx.coco.num_classes,
                ctx.geometry,
                device,
                console.print,
                logits=any(t.logits and t.enabled(cfg) for t in cfg.spec.terms),
            )  # fmt: skip
            if opts.online and cfg.needs_store
            else None
        )
        online = self.online
        self.dataset = DistillDataset(
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
                self.student.out_channels,
                ss.store.meta.channels,
                with_me=ss.me,
                with_adv=ss.adv,
            ).to(device)
        elif online is not None:
            losses = build_stage_losses(
                cfg, online.levels, self.student.out_channels, online.teacher.out_channels,
                online.me,
            ).to(device)  # fmt: skip
        else:
            losses = nn.ModuleDict()
        self.losses = losses
        self.model = DistillModel(self.student, losses, cfg)
        self.sampler = ViewSampler(
            len(ctx.coco.image_ids),
            len(views),
            shuffle=True,
            seed=opts.seed + 7919 * plan.index,
            keep=ss.train_images if ss is not None else ctx.train_images,
            rank=dist.rank,
            world_size=dist.world_size,
        )

    def restore(self, state: dict[str, Any]) -> None:
        self.losses.load_state_dict(state["distill_state"])  # the student is loaded by distill

    def step(self, model: nn.Module, batch: dict, ctx: StepContext):
        self.model.kd_scale = kd_warmup_factor(ctx.iteration, self.ctx.cfg.kd_warmup)
        return train_step(
            model, batch, ctx.device, ctx.use_amp, ctx.scaler, self.online, ctx.timings, ctx.clock
        )

    def payload(self, done: bool) -> dict[str, Any]:
        from dfmsd_cli.models.checkpoint import make_checkpoint

        ctx = self.ctx
        payload = make_checkpoint(
            self.student, categories=ctx.coco.categories, geometry=ctx.geometry
        )
        payload.update(
            kind="distill-state",
            stage=self.plan.index + 1 if done else self.plan.index,
            options=options_dict(ctx.opts),
        )
        if done:  # the next stage starts fresh: only the student and the RNG streams carry over
            payload.update(epoch=0, step=0, iteration=0, optimizer=None, scaler=None)
        payload["distill_state"] = None if done else self.losses.state_dict()
        return payload

    def log_fields(self) -> dict[str, Any]:
        return {"stage": self.plan.index + 1, "teacher": self.plan.teacher}

    def summary_fields(self) -> dict[str, Any]:
        return {"stage": self.plan.index + 1, "teacher": self.plan.teacher}

    def finish(self, complete: bool) -> None:
        """``OUT/stage{k}_{teacher}.pth``: the student after a complete stage."""
        if not complete:
            return
        from dfmsd_cli.models.checkpoint import make_checkpoint
        from dfmsd_cli.utils.io import atomic_torch_save

        ctx = self.ctx
        atomic_torch_save(
            make_checkpoint(self.student, categories=ctx.coco.categories, geometry=ctx.geometry),
            Path(ctx.opts.out) / f"{self.plan.tag}.pth",
        )

    def evaluate(self) -> dict[str, Any] | None:
        opts = self.ctx.opts
        if not opts.evaluate:
            return None
        return evaluate_split(
            self.student,
            opts.data,
            opts.val_split,
            geometry=self.ctx.geometry,
            batch_size=opts.batch_size,
            device=self.ctx.device,
            out=Path(opts.out) / f"eval_{self.plan.tag}_{opts.val_split}.json",
        )


def kd_warmup_factor(iteration: int, warmup: int) -> float:
    """The factor on every distillation weight at 0-based ``iteration`` of a stage: a linear
    ramp ``min(1, (iteration + 1) / warmup)``, 1 when ``warmup`` is 0 (``--kd-warmup``)."""
    if warmup <= 0:
        return 1.0
    return min(1.0, (iteration + 1) / warmup)

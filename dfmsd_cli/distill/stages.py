"""SAL stage planning and the checks that a teacher store fits the run, before any training.

Stage-wise adaptation learning (DFMSD, arXiv 2407.13147): teachers run weaker → stronger; stage
k reads only teacher k's store and starts from stage k−1's final student weights; each stage
has its own align/generation modules, optimizer and schedule. Without SAL (``--no-sal``) and
for the one-stage baselines, only the last (strongest) listed teacher is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dfmsd_cli.distill.losses.common import match_levels
from dfmsd_cli.distill.methods import MethodConfig, stage_has_adv, stage_has_me
from dfmsd_cli.errors import UserError
from dfmsd_cli.store.schema import DONE_OK, store_path

TRAIN_VIEWS = ("orig", "hflip")


@dataclass(frozen=True)
class StagePlan:
    index: int  # 0-based position in the run
    teacher: str | None  # None: student alone (--method none)
    epochs: int
    me: bool  # add L_ME (if the store holds the 'me' view)
    adv: bool = False  # add L_adv (if the store holds the 'adv' view)

    @property
    def tag(self) -> str:
        return f"stage{self.index + 1}" + (f"_{self.teacher}" if self.teacher else "")


def plan_stages(cfg: MethodConfig, teachers: list[str], epochs: list[int]) -> list[StagePlan]:
    """Stages for ``teachers`` (weaker first) and ``epochs`` (one per teacher, or one for all)."""
    teachers = [t for t in teachers if t]
    if cfg.needs_store and not teachers:
        raise UserError(
            f"--method {cfg.name} needs teachers: pass --stages T1[,T2] (precomputed stores)"
        )
    if not epochs or any(e < 1 for e in epochs):
        raise UserError(f"--epochs must be positive integers, got {epochs}")
    n = max(1, len(teachers))
    if len(epochs) == 1:
        epochs = epochs * n
    if len(epochs) != n:
        raise UserError(
            f"--epochs has {len(epochs)} values for {n} stage(s): give one per --stages entry "
            "or a single value for all"
        )
    if not cfg.needs_store:
        return [StagePlan(0, None, epochs[-1], False)]
    if not cfg.sal:
        teachers, epochs = teachers[-1:], epochs[-1:]
    return [
        StagePlan(
            k, t, e, stage_has_me(cfg, k, len(teachers)), stage_has_adv(cfg, k, len(teachers))
        )
        for k, (t, e) in enumerate(zip(teachers, epochs, strict=True))
    ]


@dataclass
class StageStore:
    """An opened, checked store for one stage."""

    store: object  # TeacherStore
    levels: list[int]  # strides distilled
    views: tuple[str, ...]  # training views replayed from the store
    store_index: list[int]  # dataset image index -> store row
    me: bool  # the stage adds L_ME
    train_images: list[int]  # dataset image indices this stage trains on
    adv: bool = False  # the stage adds L_adv


def open_stage_store(
    plan: StagePlan,
    cache: str | Path,
    split: str,
    *,
    geometry,
    ann_sha256: str,
    image_ids: list[int],
    train_images: list[int],
    student_strides: tuple[int, ...],
    want_views: tuple[str, ...] = TRAIN_VIEWS,
    warn=print,
    adv_required: bool = False,
    concurrency: int | None = None,
    cache_local: str | Path | None = None,
) -> StageStore:
    """Open the stage's store and check it against the run; every mismatch is a UserError.

    Checks: geometry (img-scale, pad divisor, mean/std), annotation file fingerprint, the
    training images (``train_images``, dataset indices) the store holds are complete (a store
    precomputed with ``--max-images`` covers fewer: the stage trains on those, with a note),
    at least one FPN level shared with the student, the ``orig`` view present.
    ``concurrency`` and ``cache_local`` go to :meth:`~dfmsd_cli.store.reader.TeacherStore.open`
    (object storage only; ``None``: ``DFMSD_STORE_CONCURRENCY`` / ``DFMSD_CACHE_LOCAL``).
    """
    from dfmsd_cli.store.reader import TeacherStore

    path = store_path(cache, plan.teacher, split)
    store = TeacherStore.open(path, concurrency=concurrency, cache_local=cache_local)
    store.check(geometry=geometry, ann_sha256=ann_sha256)
    levels = match_levels(student_strides, store.meta.strides)
    if not levels:
        raise UserError(
            f"store {path} has levels {list(store.meta.strides)} and the student "
            f"{list(student_strides)}: no shared stride; precompute with --levels covering the "
            "student's strides"
        )
    row = {int(i): r for r, i in enumerate(store.meta.image_ids)}
    store_index = [row.get(int(i), -1) for i in image_ids]
    keep = [i for i in train_images if store_index[i] >= 0]
    if not keep:
        raise UserError(
            f"store {path} holds none of the dataset's training images: it was precomputed on "
            "another split or dataset; precompute this split"
        )
    if len(keep) < len(train_images):  # same annotation file, fewer images (--max-images)
        warn(
            f"note: store {path} covers {len(keep)} of {len(train_images)} training images "
            "(precomputed with --max-images?): stage trains on those"
        )
    done = store.done()
    incomplete = [image_ids[i] for i in keep if done[store_index[i]] != DONE_OK]
    if incomplete:
        raise UserError(
            f"store {path} has {len(incomplete)} incomplete image(s) (e.g. id {incomplete[0]}): "
            "finish it by running the same 'dfmsd precompute' command again (it resumes)"
        )
    views = tuple(v for v in want_views if v in store.meta.views)
    if "orig" not in views:
        raise UserError(f"store {path} has no 'orig' view: precompute it with --views orig[,hflip]")
    me = plan.me and "me" in store.meta.views
    if plan.me and not me:
        warn(
            f"note: store {path} has no 'me' (masking-enhancement) view, stage {plan.index + 1} "
            "runs without L_ME; precompute it with --enhance-from WEAKER_TEACHER to enable ME"
        )
    adv = plan.adv and "adv" in store.meta.views
    if plan.adv and adv_required and not adv:
        raise UserError(
            f"--adv: store {path} has no 'adv' (adversarial) view: precompute it with "
            "--adv-eps GREY_LEVELS, or drop --adv"
        )
    return StageStore(store, levels, views, store_index, me, keep, adv)


def run_geometry(
    img_scale, cache, split: str, plans: list[StagePlan], cfg: MethodConfig, online: bool = False
):
    """The run's geometry: ``--img-scale`` when given, else the first store's (the stores are
    checked against it), else MMDetection's default 1333×800."""
    from dfmsd_cli.data.geometry import Geometry

    if img_scale is not None:
        return Geometry(img_scale=tuple(img_scale))
    if cfg.needs_store and plans[0].teacher and not online:
        from dfmsd_cli.store.reader import TeacherStore

        return TeacherStore.open(store_path(cache, plans[0].teacher, split)).meta.geometry
    return Geometry()


def print_plan(cfg: MethodConfig, plans, stores, opts, console) -> None:
    """The method summary and a table of the stages (teacher, epochs, levels, views, ME)."""
    from rich.table import Table

    console.print(f"[bold]dfmsd distill[/] {opts.student}: {cfg.summary()}")
    if opts.online and cfg.needs_store:
        console.print("--online: teachers run in the loop (no store is read)")
    table = Table(title="stages")
    for col in ("stage", "teacher", "epochs", "levels", "views", "ME", "adv"):
        table.add_column(col)
    for plan, ss in zip(plans, stores, strict=True):
        table.add_row(
            str(plan.index + 1),
            plan.teacher or "-",
            str(plan.epochs),
            ",".join(map(str, ss.levels)) if ss else "-",
            ",".join(ss.views) if ss else "orig,hflip" if opts.flip else "orig",
            "yes" if ss and ss.me else "no",
            "yes" if ss and ss.adv else "no",
        )
    console.print(table)

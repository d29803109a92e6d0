"""``precompute``: run a teacher once over a split and write its store (library function).

Pipeline (three overlapping parts): DataLoader workers decode and resize images; the main
process runs the teacher (one pass: detections + FPN features, docs/architecture.md);
``BackgroundWriter`` threads quantise, compress and write each image, then its completion
marker.

Exactness: a feature map depends on the zero padding the teacher saw. Every batch therefore
holds images of ONE padded shape, so each image is seen at its own padded size, exactly as if
it were alone. The batch plan is fixed per block of ``block`` images (images sorted by padded
shape inside the block, then cut into batches), so it does not depend on sharding or on what
an earlier, interrupted run finished: a resumed or sharded run recomputes exactly the batches
an uninterrupted run would, and the stores are identical. (CPU kernels are not bit-invariant
to the batch size: ~1e-5 absolute differences between a batch of 1 and of 4, below float16
resolution; a fixed plan avoids even those.)

Scale-out: ``shard=(I, N)`` and torchrun ranks (``RANK``/``WORLD_SIZE``) each take a disjoint,
block-aligned index range (no process group is needed). Views: ``orig``, ``hflip`` (the
teacher on the flipped image) and ``me`` (masking enhancement, ``data/enhance.py``), all run
in the same batch, which has one padded shape.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from dfmsd_cli.data.adversarial import AdvConfig
from dfmsd_cli.data.coco import CocoDetection
from dfmsd_cli.data.enhance import EnhanceConfig
from dfmsd_cli.data.geometry import Geometry
from dfmsd_cli.errors import UserError, free_bytes, io_path, suggest
from dfmsd_cli.models.checkpoint import load_teacher
from dfmsd_cli.store import schema
from dfmsd_cli.store.inspect import pca_energy
from dfmsd_cli.store.lock import store_lock
from dfmsd_cli.store.pca import FIT_IMAGES, check_components, fit_basis
from dfmsd_cli.store.probe import PROBE_IMAGES
from dfmsd_cli.store.projection import dry_run as _dry_run
from dfmsd_cli.store.quantize import check_keepbits
from dfmsd_cli.store.reader import TeacherStore
from dfmsd_cli.store.schema import store_path
from dfmsd_cli.store.space import SpaceWatch, StorePlan, check_space, on_teacher
from dfmsd_cli.store.teacher_pass import (
    BatchLoad,
    adversarial_deltas,
    batch_plan,
    identity_collate,
    logit_attrs,
    run_batch,
)
from dfmsd_cli.store.writer import (
    CODECS,
    BackgroundWriter,
    ImageResult,
    StoreSpec,
    StoreWriter,
    create_or_open,
    feature_codec,
    store_exists,
)
from dfmsd_cli.utils.io import sha256_file


@dataclass
class PrecomputeOptions:
    """Everything ``precompute`` needs besides the dataset files (CLI flags map 1:1)."""

    teacher: str
    split: str = "train2017"
    weights: str | None = None
    cache: str = "cache"
    levels: list[int] | None = None
    dtype: str = "float16"
    keepbits: int | None = None  # mantissa bits kept (float16 / bfloat16), numcodecs BitRound
    for_student: str | None = None  # store only the levels this student can use
    store_logits: bool = False  # dense teachers: class logits per level and view (float16)
    pca: int | None = None  # store K principal components per level (store/pca.py)
    views: list[str] = field(default_factory=lambda: ["orig"])
    enhance_from: str | None = None
    enhance: EnhanceConfig = field(default_factory=EnhanceConfig)
    adv: AdvConfig | None = None  # the 'adv' view (data/adversarial.py); None: no such view
    geometry: Geometry = field(default_factory=Geometry)
    batch_size: int = 2
    num_workers: int = 2
    shard: tuple[int, int] = (0, 1)
    device: str = "auto"
    topk: int = 100
    score_thr: float = 0.3
    block: int = 64
    codec: str = "blosc"
    writer_threads: int = 2
    seed: int = 0
    max_images: int | None = None
    strict: bool = False
    progress: bool = True
    space_check: bool = True  # refuse a local store projected beyond its disk (store/space.py)
    probe_images: int = PROBE_IMAGES  # --dry-run: encodings measured on this many (store/probe.py)


def _check_options(o: PrecomputeOptions) -> list[str]:
    if o.dtype not in schema.DTYPES:
        raise UserError(
            f"unknown --dtype '{o.dtype}'{suggest(o.dtype, schema.DTYPES)}: use float16, "
            "bfloat16, uint8 or float32"
        )
    check_keepbits(o.dtype, o.keepbits)
    views = list(dict.fromkeys(o.views))
    for v in views:
        if v not in schema.VIEWS_ALL:
            raise UserError(
                f"unknown view '{v}'{suggest(v, schema.VIEWS_ALL)}: use orig, hflip "
                "(and --enhance-from WEAKER for the 'me' view)"
            )
    if "orig" not in views:
        raise UserError("--views must include orig: the distillation loss uses it")
    if o.enhance_from and "me" not in views:
        views.append("me")
    if o.adv is not None and "adv" not in views:
        views.append("adv")
    if "adv" in views and o.adv is None:
        raise UserError("view 'adv' needs a perturbation budget: add --adv-eps GREY_LEVELS")
    if "me" in views and not o.enhance_from:
        raise UserError("view 'me' needs the weaker teacher's area ratios: add --enhance-from NAME")
    if o.codec not in CODECS:
        raise UserError(
            f"unknown --codec '{o.codec}'{suggest(o.codec, CODECS)}: use {', '.join(CODECS)}"
        )
    if o.codec == "pcodec":
        feature_codec(o.codec, o.dtype)  # before any teacher pass: uint8, pcodec not installed
    if o.batch_size < 1 or o.block < 1 or o.topk < 1:
        raise UserError("--batch-size, --block and --topk must be >= 1")
    return views


def _student_levels(student: str, strides: list[int], teacher: str) -> list[int]:
    """The teacher levels a student can use: the strides both have (no student reads a level it
    lacks: a Cascade R-CNN teacher's stride-4 map, 61 % of its bytes, is useless to RetinaNet)."""
    from dfmsd_cli.models import get_spec

    try:
        have = set(get_spec(student).strides)
    except Exception as exc:  # noqa: BLE001 - unknown names get the registry's message
        raise UserError(f"--for-student {student}: {exc}") from exc
    keep = [s for s in strides if s in have]
    if not keep:
        raise UserError(
            f"--for-student {student}: it shares no level with {teacher} ({strides} vs "
            f"{sorted(have)}): precompute without --for-student"
        )
    return keep


def unused_levels_note(
    teacher: str, strides: list[int], pad_size: tuple[int, int], reference: str = "retina_r50"
) -> str | None:
    """A note when the teacher stores levels a single-stage student (RetinaNet, FCOS, GFL,
    RepPoints: the strides of ``reference``) cannot read, e.g. a Cascade R-CNN teacher's
    stride-4 map, with those levels' share of the feature bytes at ``pad_size`` (h, w)."""
    from dfmsd_cli.models import get_spec

    dense = set(get_spec(reference).strides)
    extra = [s for s in strides if s not in dense]
    if not extra:
        return None
    h, w = pad_size
    cells = {s: -(-h // s) * -(-w // s) for s in strides}
    share = sum(cells[s] for s in extra) / sum(cells.values())
    levels = ",".join(map(str, extra))
    return (
        f"note: {teacher}'s stride {levels} is {share:.0%} of this store's feature values and no "
        f"single-stage student ({reference}, fcos, gfl, reppoints) reads it: for such a student "
        "add --for-student NAME (docs/store.md)"
    )


def _rank_shard(shard: tuple[int, int]) -> tuple[int, int]:
    """Combine ``--shard I/N`` with torchrun's RANK/WORLD_SIZE into one (part, parts)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    i, n = shard
    return i * world + rank, n * world


def _device(name: str) -> torch.device:
    from dfmsd_cli.utils.device import resolve_device

    dev = resolve_device(name)
    if dev.type == "cuda" and dev.index is None and "LOCAL_RANK" in os.environ:
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return dev


def _weaker_ratios(
    o: PrecomputeOptions, ds: CocoDetection, ann_sha: str
) -> tuple[np.ndarray, np.ndarray]:
    """The weaker teacher's (area ratios, completion markers) from its store, checked."""
    path = store_path(o.cache, o.enhance_from, o.split)
    if not store_exists(path):
        raise UserError(
            f"--enhance-from {o.enhance_from}: no store at {path}: precompute the weaker "
            f"teacher first (dfmsd precompute --teacher {o.enhance_from} ...)"
        )
    weak = TeacherStore.open(path)
    weak.check(image_ids=ds.image_ids, ann_sha256=ann_sha, geometry=o.geometry)
    return weak.area_ratios("orig"), weak.done()


def precompute(
    ann_file: str | Path,
    image_dir: str | Path,
    options: PrecomputeOptions,
    dry_run: bool = False,
    on_batch: Callable[[], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write (or resume) the store of ``options.teacher`` for one split; returns a summary.

    The summary holds path, images (total, in this shard, written now, done, unreadable),
    wall time, teacher forward time, and for ``dry_run`` the projected bytes and seconds
    (nothing is written then). ``on_batch`` is called after each teacher batch is queued;
    ``warn`` receives notes before the pass (e.g. levels no single-stage student reads).
    """
    o = options
    views = _check_options(o)
    t_start = time.perf_counter()
    ds = CocoDetection(
        ann_file,
        image_dir,
        geometry=o.geometry,
        train=False,
        strict=o.strict,
        max_images=o.max_images,
    )
    ds.keep_raw = "me" in views or "adv" in views
    ann_sha = sha256_file(ann_file)
    n = len(ds.image_ids)
    if n == 0:
        raise UserError(f"{ann_file} lists no readable image: check --data/--split")
    model = load_teacher(o.teacher, ds.num_classes, o.weights, o.seed)
    strides = list(o.levels or model.strides)
    if o.for_student:
        strides = _student_levels(o.for_student, strides, o.teacher)
    bad = [s for s in strides if s not in model.strides]
    if bad:
        raise UserError(
            f"--levels {bad} are not levels of {o.teacher} (its strides: "
            f"{','.join(map(str, model.strides))}): pick from those"
        )
    check_components(o.pca, model.out_channels)
    if o.store_logits and getattr(model, "logit_anchors", None) is None:
        raise UserError(
            f"--store-logits: {o.teacher} is a two-stage detector, whose class scores are per "
            "proposal, not per FPN position: drop --store-logits (SAMKD then runs SFD alone)"
        )
    if hasattr(model, "predict_masks"):  # the store keeps boxes and features, never masks
        model.predict_masks = False
    device = _device(o.device)
    model.to(device)
    part, parts = _rank_shard(o.shard)
    start, stop = schema.shard_range(n, part, parts, o.block)
    path = store_path(o.cache, o.teacher, o.split)
    pad_sizes = []
    for i in range(n):
        info = ds.image_info(i)
        w, h = o.geometry.padded_size(info["width"], info["height"])
        pad_sizes.append((h, w))
    enhance_cfg = None
    ratios = weak_done = None
    if "me" in views:
        ratios, weak_done = _weaker_ratios(o, ds, ann_sha)
        enhance_cfg = {**o.enhance.to_dict(), "source": o.enhance_from}

    note = None if o.for_student or o.levels else unused_levels_note(o.teacher, strides,
                                                                      pad_sizes[0])  # fmt: skip
    if warn is not None and note:
        warn(note)
    lc = int(model.logit_anchors) * int(model.num_classes) if o.store_logits else 0
    plan = StorePlan(ds, o, strides, model.out_channels, views, lc)
    if dry_run:
        summary = _dry_run(ds, o, model, device, strides, views, start, stop, pad_sizes, path)
        summary["free_bytes"] = None if "://" in path else free_bytes(path)
        images = range(start, min(stop, start + o.probe_images))  # this teacher's own figures
        summary.update(on_teacher(plan, model, device, images, summary["todo"]))
        error = summary["probe"] and summary["probe"]["encodings"][0]["error"]  # the plan's own
        if warn is not None and error:
            warn(f"note: the real run would stop: {error}")
        return summary
    if o.space_check and "://" not in path:  # the whole store's remaining images (one disk)
        done = TeacherStore.open(path).done() if store_exists(path) else np.zeros(n)
        check_space(plan, path, int((done == schema.DONE_PENDING).sum()), bool(note))

    # one writer per (store, image range); an OSError without a file name names the store
    with io_path(path), store_lock(path, start, stop, f"{part}/{parts}"):
        return _write_store(
            ds, o, model, device, path, (start, stop), views, strides, pad_sizes,
            ann_sha, enhance_cfg, ratios, weak_done, t_start, on_batch,
        )  # fmt: skip


def _write_store(
    ds: CocoDetection,
    o: PrecomputeOptions,
    model: torch.nn.Module,
    device: torch.device,
    path: str,
    rng: tuple[int, int],
    views: list[str],
    strides: list[int],
    pad_sizes: list[tuple[int, int]],
    ann_sha: str,
    enhance_cfg: dict | None,
    ratios: np.ndarray | None,
    weak_done: np.ndarray | None,
    t_start: float,
    on_batch: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Create or open the store and write images [start, stop) still pending (locked)."""
    (start, stop), n = rng, len(ds.image_ids)
    pca, basis = _pca_spec(ds, o, model, device, path, strides, pad_sizes)
    spec = StoreSpec(
        teacher=o.teacher,
        num_classes=ds.num_classes,
        weights_sha256=schema.state_dict_sha256(model.state_dict()),
        weights_path=o.weights,
        split=o.split,
        ann_sha256=ann_sha,
        image_ids=list(ds.image_ids),
        geometry=o.geometry.to_dict(),
        strides=strides,
        channels=model.out_channels,
        dtype=o.dtype,
        views=views,
        block=o.block,
        topk=o.topk,
        score_thr=o.score_thr,
        enhance=enhance_cfg,
        adv=o.adv.to_dict() if o.adv is not None else None,
        codec=o.codec,
        keepbits=o.keepbits,
        categories=ds.categories,
        logits=logit_attrs(model) if o.store_logits else None,
        pca=pca,
        pca_basis=basis,
    )
    group = create_or_open(
        path, spec, fix=f"delete {path} or pass another --cache to precompute with these settings"
    )
    writer = StoreWriter(group)
    done = writer.done()
    if ratios is not None:
        missing = [i for i in range(start, stop) if weak_done[i] == schema.DONE_PENDING]
        if missing:
            raise UserError(
                f"--enhance-from {o.enhance_from}: {len(missing)} images of this range are not "
                f"complete in its store: finish 'dfmsd precompute --teacher {o.enhance_from}' first"
            )
    plan = [
        b
        for b in batch_plan(pad_sizes, start, stop, o.block, o.batch_size)
        if any(done[i] == schema.DONE_PENDING for i in b)
    ]
    todo = sum(int(done[i] == schema.DONE_PENDING) for b in plan for i in b)
    writer.expect(i for b in plan for i in b if done[i] == schema.DONE_PENDING)
    watch = SpaceWatch(path, todo, o) if o.space_check else None
    stats = {"written": 0, "unreadable": 0}

    from dfmsd_cli.utils.console import make_progress

    progress = make_progress(disable=not o.progress)
    task = progress.add_task(f"precompute {o.teacher}", total=todo, info="")

    def on_written(item: ImageResult | int) -> None:
        stats["unreadable" if isinstance(item, int) else "written"] += 1
        progress.advance(task)

    loader = DataLoader(
        BatchLoad(ds, plan),
        batch_size=None,
        shuffle=False,
        num_workers=o.num_workers,
        collate_fn=identity_collate,
        persistent_workers=False,
        prefetch_factor=4 if o.num_workers > 0 else None,
    )
    bg = BackgroundWriter(
        writer,
        maxsize=max(4, 2 * o.batch_size),
        on_written=on_written,
        threads=o.writer_threads,
    )
    t_forward = t_data = 0.0
    t_loop, c_loop = time.perf_counter(), time.process_time()
    try:
        with progress:
            batches = iter(loader)
            while True:
                t0 = time.perf_counter()
                items = next(batches, None)  # decoding (main thread) or waiting for workers
                t_data += time.perf_counter() - t0
                if items is None:
                    break
                pending = [(i, s) for i, s in items if done[i] == schema.DONE_PENDING]
                for i, s in pending:
                    if s is None:
                        bg.submit(i)
                ok = [(i, s) for i, s in items if s is not None]
                if not any(s is not None for _, s in pending):
                    continue
                t0 = time.perf_counter()
                advs = adversarial_deltas(model, ok, o, device) if "adv" in views else None
                results = run_batch(model, ok, views, o, device, ratios, strides, advs)
                t_forward += time.perf_counter() - t0
                for r in results:
                    if done[r.index] == schema.DONE_PENDING:
                        bg.submit(r)
                el = time.perf_counter() - t_loop  # the pace so far: what a user would tune
                progress.update(task, info=f"loading {t_data / el:.0%} · writer wait "
                                f"{bg.wait_s / el:.0%}")  # fmt: skip
                if watch is not None:  # the first block's real bytes, against the free space
                    watch.check(writer.chunked_images, writer.chunk_bytes)
                if on_batch is not None:
                    on_batch()
            bg.close()
        t_loop, c_loop = time.perf_counter() - t_loop, time.process_time() - c_loop
    except BaseException:
        bg.close()
        raise
    final_store = TeacherStore.open(path)
    final = final_store.done()
    return {
        "path": path,
        "teacher": o.teacher,
        "split": o.split,
        "images": n,
        "range": [start, stop],
        "written": stats["written"],
        "unreadable": stats["unreadable"],
        "done": int((final == schema.DONE_OK).sum()),
        "pending": int((final == schema.DONE_PENDING).sum()),
        "wall_s": time.perf_counter() - t_start,
        "teacher_s": t_forward,
        "data_s": t_data,
        "writer_wait_s": bg.wait_s,
        "writer_cpu_s": bg.cpu_s,  # the writer threads' own work (not the final flush)
        "loop_s": t_loop,
        "loop_cpu_s": c_loop,  # this process, all threads (writer threads included)
        "load_stats": dict(ds.stats),
        "pca": pca_energy(final_store) if o.pca else None,  # energy kept per level
    }


# Our choice: a wait above this share of the loop is worth a line after the run.
PACE_NOTE_SHARE = 0.2


def pace_note(summary: dict[str, Any], o: PrecomputeOptions) -> str | None:
    """One line naming what held the teacher back — image loading (``data_s``: decoding in the
    main process or waiting for ``--num-workers``) or the store's writer threads
    (``writer_wait_s``: a full queue, then the final drain) — when it took more than
    ``PACE_NOTE_SHARE`` of the loop; None otherwise. On a GPU the teacher is fast and the CPU
    side (decoding, compression) is what a user tunes."""
    loop = float(summary.get("loop_s") or 0.0)
    waits = {"writer": summary.get("writer_wait_s", 0.0), "data": summary.get("data_s", 0.0)}
    kind, t = max(waits.items(), key=lambda kv: kv[1])
    if loop <= 0 or t < PACE_NOTE_SHARE * loop:
        return None
    held = f"held the teacher back {t:.1f} s of the {loop:.1f} s loop ({t / loop:.0%})"
    if kind == "writer":
        return (
            f"note: the store's writer threads (compression and files) {held}: raise "
            f"--writer-threads (now {o.writer_threads}) where cores are idle"
        )
    return f"note: loading images {held}: raise --num-workers (now {o.num_workers})"


def _pca_spec(ds, o, model, device, path, strides, pad_sizes) -> tuple[dict | None, dict | None]:
    """``--pca K``: the store's projection attribute and, for a store not created yet, its basis
    fitted on the first ``FIT_IMAGES`` images (views orig/hflip, their fixed batch plan). An
    existing store keeps its own basis: resume, repair and other shards never refit."""
    if not o.pca:
        return None, None
    if store_exists(path):
        return {"components": int(o.pca)}, None
    m = min(len(ds.image_ids), FIT_IMAGES)
    views = [v for v in o.views if v in ("orig", "hflip")] or ["orig"]

    def run(batch: list[int]) -> list[ImageResult]:
        ok = [(i, s) for i, s in ((i, ds.get(i, "orig")) for i in batch) if s is not None]
        return run_batch(model, ok, views, o, device, None, strides) if ok else []

    plan = batch_plan(pad_sizes, 0, m, o.block, o.batch_size)
    bases, levels = fit_basis(plan, run, int(o.pca))
    attrs = {"components": int(o.pca), "fit_images": m, "fit_views": views, "levels": levels}
    return attrs, bases

"""The ``dfmsd viz`` commands as library functions: each reads its inputs, draws one figure
and returns the written path (the CLI module ``dfmsd_cli/cli/viz_cmd.py`` only wraps them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dfmsd_cli.errors import UserError
from dfmsd_cli.viz.common import resolve_index, save


def _store_record(store_path, image, index, view):
    from dfmsd_cli.store.reader import TeacherStore

    store = TeacherStore.open(store_path)
    i = resolve_index(store.meta.image_ids, image, index, f"store {store_path}")
    return store, store.get(i, view)


def _pixels(store, record: dict, data, split) -> dict[str, Any]:
    """The view's input, the original, GT boxes (the view's pixels) and categories."""
    out: dict[str, Any] = {"input": None, "original": None, "note": "", "gt": None}
    out["categories"] = store.meta.attrs.get("categories")
    if data is None:
        out["note"] = " (no --data: attention on a grey canvas)"
        return out
    from dfmsd_cli.viz.source import dataset_for, load_sample, view_input

    ds = dataset_for(data, split or store.meta.split, store.meta.geometry)
    sample = load_sample(ds, record["image_id"])
    if tuple(sample["size"]) != tuple(record["size"]):
        raise UserError(
            f"image {record['image_id']} is {sample['size']} after resizing but the store holds "
            f"{record['size']}: pass the --data the store was precomputed from"
        )
    x, note = view_input(sample, record["view"], record)
    boxes = sample["boxes"]
    if record["view"] == "hflip":
        from dfmsd_cli.data.geometry import hflip_boxes

        boxes = hflip_boxes(boxes, sample["size"][1])
    out.update(input=x, note=note, gt=boxes, categories=ds.categories, sample=sample)
    out["original"] = sample["raw"] if record["view"] not in ("orig", "hflip") else None
    return out


def viz_store(
    store_path, out, *, image=None, index=None, view="orig", data=None, split=None,
    tau=0.5, topk=10, levels=None, fmt=None, dpi=None,
) -> Path:  # fmt: skip
    """``dfmsd viz store``: teacher attention, channel attention and top-K boxes of one image."""
    from dfmsd_cli.viz.source import enhance_caption
    from dfmsd_cli.viz.store_fig import store_figure

    store, rec = _store_record(store_path, image, index, view)
    px = _pixels(store, rec, data, split)
    caption = enhance_caption(rec) if view == "me" else ""
    fig = store_figure(
        rec,
        px["input"],
        px["original"],
        tau=tau,
        categories=px["categories"],
        levels=_levels(levels, rec["att_spatial"]),
        topk=topk,
        title=f"{store.meta.teacher} on image {rec['image_id']} ({view}){px['note']}",
        caption=caption,
    )
    return save(fig, out, fmt, dpi)


def _levels(levels, available) -> list[int] | None:
    if not levels:
        return None
    bad = [s for s in levels if s not in available]
    if bad:
        raise UserError(f"--levels {bad} not stored (levels: {sorted(available)}): pick from those")
    return [int(s) for s in levels]


def viz_masks(
    store_path, out, *, method, image=None, index=None, view="orig", data=None, split=None,
    student="retina_r50", seed=0, levels=None, fmt=None, dpi=None,
) -> Path:  # fmt: skip
    """``dfmsd viz masks``: the masks ``method`` would apply on one stored image."""
    from dfmsd_cli.viz.masks_fig import masks_figure, method_masks

    store, rec = _store_record(store_path, image, index, view)
    px = _pixels(store, rec, data, split)
    panels = method_masks(
        rec, method, student, px["gt"], seed, levels=_levels(levels, rec["att_spatial"])
    )
    title = f"{method} masks, {store.meta.teacher} on image {rec['image_id']} ({view}){px['note']}"
    return save(masks_figure(panels, px["input"], tuple(rec["size"]), title), out, fmt, dpi)


def viz_features(
    students, store_path, out, *, image=None, index=None, view="orig", data=None, split=None,
    levels=None, fmt=None, dpi=None,
) -> Path:  # fmt: skip
    """``dfmsd viz features``: teacher vs student FPN features on one stored image."""
    from dfmsd_cli.models.checkpoint import build_from_checkpoint
    from dfmsd_cli.viz.features_fig import features_figure
    from dfmsd_cli.viz.source import student_features

    if not students:
        raise UserError("pass at least one --student CKPT")
    if data is None:
        raise UserError("viz features runs the students on the image: pass --data ROOT")
    store, rec = _store_record(store_path, image, index, view)
    px = _pixels(store, rec, data, split)
    feats = {}
    for ckpt in students:
        model, _ = build_from_checkpoint(ckpt)
        name = f"{Path(ckpt).parent.name}/{Path(ckpt).stem}"
        feats[name] = student_features(model, px["input"], store.meta.geometry)
    shared = [s for s in rec["features"] if all(s in f for f in feats.values())]
    lv = _levels(levels, rec["features"]) or shared
    if not lv:
        raise UserError("no FPN level is shared by the store and every student: check the models")
    fig = features_figure(
        rec["features"],
        feats,
        tuple(rec["size"]),
        levels=lv,
        title=f"{store.meta.teacher} (teacher) vs students on image {rec['image_id']} ({view})",
    )
    return save(fig, out, fmt, dpi)


def viz_run(runs, out, *, log_y=False, fmt=None, dpi=None) -> Path:
    """``dfmsd viz run``: curves of one or more run folders."""
    from dfmsd_cli.viz.run_curves import read_run, run_figure

    if not runs:
        raise UserError("pass at least one RUN_DIR")
    logs = [read_run(r, _run_name(r)) for r in runs]
    return save(run_figure(logs, log_y=log_y), out, fmt, dpi)


def _run_name(run) -> str:
    p = Path(run).resolve()
    return (
        f"{p.parent.name}/{p.name}" if p.name.startswith("s") and p.name[1:].isdigit() else p.name
    )


def viz_compare(compare_dir, out, *, metric="mAP", fmt=None, dpi=None) -> Path:
    """``dfmsd viz compare``: a results.json (or a folder holding one) -> the paired Δ vs the
    student alone per row (``paired_delta.py``); a folder of METHOD/sSEED runs without one ->
    the metrics as grouped bars with error bars (``compare_bars.py``)."""
    from dfmsd_cli.viz.compare_bars import compare_figure, read_compare

    src = Path(compare_dir)
    if src.suffix == ".json" or (src / "results.json").is_file():
        from dfmsd_cli.viz.paired_delta import delta_figure, read_results

        return save(delta_figure(read_results(src), metric), out, fmt, dpi)
    rows = read_compare(compare_dir)
    return save(compare_figure(rows, title=f"{Path(compare_dir).name}: bbox on val"), out, fmt, dpi)


def viz_detections(
    checkpoints,
    out,
    *,
    data,
    split="val2017",
    image=None,
    index=None,
    score_thr=0.3,
    fmt=None,
    dpi=None,
) -> Path:
    """``dfmsd viz detections``: predictions of each checkpoint vs ground truth on one image."""
    from dfmsd_cli.data.geometry import Geometry
    from dfmsd_cli.data.images import load_rgb
    from dfmsd_cli.models.checkpoint import build_from_checkpoint
    from dfmsd_cli.viz.detections_fig import detections_figure, predict_one
    from dfmsd_cli.viz.source import dataset_for, load_sample

    if not checkpoints:
        raise UserError("pass at least one checkpoint")
    ds0 = dataset_for(data, split, Geometry())
    i = resolve_index(ds0.image_ids, image, index, f"{ds0.ann_file}")
    image_id = ds0.image_ids[i]
    preds, categories = {}, None
    for ckpt in checkpoints:
        model, meta = build_from_checkpoint(ckpt)
        geom = Geometry.from_dict(meta["geometry"]) if meta.get("geometry") else Geometry()
        sample = load_sample(dataset_for(data, split, geom), image_id)
        preds[f"{Path(ckpt).parent.name}/{Path(ckpt).stem}"] = predict_one(
            model, sample, geom.pad_divisor
        )
        categories = categories or meta.get("categories")
    gt = {"boxes": sample["boxes"] / float(sample["scale"]), "labels": sample["labels"]}
    pixels = load_rgb(ds0.image_path(i))
    fig = detections_figure(
        pixels, gt, preds, categories or ds0.categories, score_thr, title=f"image {image_id}"
    )
    return save(fig, out, fmt, dpi)


__all__ = ["viz_compare", "viz_detections", "viz_features", "viz_masks", "viz_run", "viz_store"]

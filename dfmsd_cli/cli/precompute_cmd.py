"""``dfmsd precompute``: run a teacher once and write its features to a zarr v3 store."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dfmsd_cli.cli.app import app, parse_int_list, write_config
from dfmsd_cli.cli.options import command, emit_json
from dfmsd_cli.data.geometry import Geometry, parse_img_scale
from dfmsd_cli.utils.console import console
from dfmsd_cli.utils.fmt import format_bytes
from dfmsd_cli.utils.options import (
    BatchOptions,
    DataOptions,
    DeviceOptions,
    GeometryOptions,
    JsonOptions,
    opt,
    record,
    reuse,
)


def pca_row(e: dict) -> str:
    """``--pca`` energy kept of one level: on the fit images and over the stored ones."""
    fit, got = e.get("energy_kept_fit"), e.get("energy_kept_stored")
    fmt = "{:.4f}".format
    return f"{fmt(got) if got == got else '-'} (fit: {fmt(fit) if fit is not None else '-'})"


def _free(free: int | None) -> str:
    return "- (object storage)" if free is None else format_bytes(free)


def _probed(summary: dict) -> str:
    """Where the dry run's ratio comes from: this teacher's images or the r50 constants."""
    probe = summary.get("probe")
    if "relative_rmse" in summary:  # measured (store.space.measured_size)
        n = probe["images"]
        return f"this teacher, {n} image{'s' if n != 1 else ''}"
    if probe and probe["encodings"][0]["error"]:
        return "retina_r50 constants (the teacher's values do not fit)"
    return "retina_r50 constants" + (" (no image read)" if probe else "")


def _held(summary: dict) -> str:
    """Whether the probe's --pca energy was measured on held-out images or on its fit image."""
    probe = summary.get("probe") or {}
    return "held out" if probe.get("held_out_images") else "on the fit images"


def _rmse(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"


def _energy(kept: dict | None) -> str:
    """--pca energy kept over the probe's held-out images: lowest-highest over the levels."""
    if not kept:
        return "-"
    lo, hi = min(kept.values()), max(kept.values())
    return f"{lo:.3f}" if round(lo, 3) == round(hi, 3) else f"{lo:.3f}-{hi:.3f}"


def _smaller_table(rows: list[dict], free: int | None, probe: dict | None):
    """--dry-run: the smaller encodings, their projected size and feature error (measured on
    this teacher when the dry run probed it, else the retina_r50 constants)."""
    from rich.table import Table

    where = f"this teacher's first {probe['images']} images" if probe and probe["images"] else (
        "rel. RMSE on real-image r50 features"
    )  # fmt: skip
    t = Table(title=f"smaller encodings (projected; {where})")
    for c in ("add", "projected size", "rel. RMSE", "energy kept (--pca)", "fits"):
        t.add_column(c, justify="left" if c == "add" else "right")
    for e in rows:
        fits = "-" if free is None else ("yes" if e["bytes"] <= free else "no")
        t.add_row(e["flags"], format_bytes(e["bytes"]), _rmse(e["relative_rmse"]),
                  _energy(e.get("energy_kept")), fits)  # fmt: skip
    return t


@dataclass(kw_only=True)
class PrecomputeCLI(DataOptions, GeometryOptions, BatchOptions, DeviceOptions, JsonOptions):
    teacher: str = opt(help="Teacher zoo name, e.g. cmr_r101.", short="-t")
    weights: str | None = opt(
        None, "Teacher checkpoint or state dict (default: random init, --seed)."
    )
    split: str = reuse(DataOptions, "split", help="Split to precompute.")
    cache: str = opt("cache", "Store root (local folder or fsspec URL): CACHE/TEACHER/SPLIT.zarr.")
    levels: str | None = opt(None, "FPN strides to store, e.g. 8,16,32,64,128 (default: all).")
    dtype: str = opt(
        "float16",
        "float16, bfloat16 (float32's range), uint8 (per-image, per-channel affine) or float32 "
        "(lossless, 2x float16's bytes).",
    )
    keepbits: int | None = opt(
        None, "Round float mantissas to K bits before compression (smaller store)."
    )
    for_student: str | None = opt(
        None, "Store only the levels this student has (e.g. retina_r50 skips a P2 map)."
    )
    store_logits: bool = opt(
        False, "Also store the dense head's class logits per level and view (float16; for SLD)."
    )
    pca: int | None = opt(
        None,
        "Store K principal components per level instead of all channels (basis fitted on the "
        "first 128 images, applied on read; energy kept in 'cache info').",
    )
    views: str = opt("orig", "Views: orig[,hflip].")
    enhance_from: str | None = opt(
        None, "Weaker teacher whose stored area ratios drive the masking-enhancement view 'me'."
    )
    enhance_theta: float = opt(0.5, "Area-ratio threshold θ.")
    enhance_p: float = opt(0.5, "Noise probability below θ.")
    enhance_sigma: float = opt(10.0, "Noise σ (0–255 scale).")
    crop_min: float = opt(0.05, "Smallest edge-crop fraction.")
    crop_max: float = opt(0.2, "Largest edge-crop fraction.")
    adv_eps: int = opt(
        0,
        "Adversarial view 'adv': budget ε in grey levels (1..127; 0: no such view). "
        "The perturbation maximises the teacher's detection loss on the ground truth.",
    )
    adv_steps: int = opt(1, "Adversarial view: 1 = FGSM, N > 1 = PGD with N sign steps.")
    batch_size: int = reuse(BatchOptions, "batch_size", help="Images per teacher pass.")
    shard: str | None = opt(None, "I/N: this process writes part I of N (block-aligned).")
    topk: int = opt(100, "Teacher detections kept per image and view.")
    score_thr: float = opt(0.3, "Score threshold of the candidate-box area ratio.")
    block: int = opt(64, "Images per chunk of the small arrays.")
    codec: str = opt(
        "blosc",
        "Feature compressor: blosc (zstd 3 + shuffle), zstd (level 3) or pcodec (lossless; 8% smaller than blosc on real-image bfloat16 features, as large on float16, docs/store.md; pip install 'dfmsd[pcodec]'; not with uint8).",
    )
    writer_threads: int = opt(2, "Threads compressing and writing feature chunks.")
    seed: int = opt(0, "Seed of a random-init teacher and of ME.")
    max_images: int | None = opt(None, "Only the first N images (quick runs).")
    strict: bool = opt(False, "Fail on unreadable images.")
    dry_run: bool = opt(False, "Print the projected store size and time; write nothing.")
    probe_images: int = opt(
        8,
        "--dry-run: measure the store's encodings (size, error, --pca energy kept) on this "
        "teacher's features of the first N images (0: the constants measured on retina_r50).",
    )
    space_check: bool = opt(
        True,
        "Start anyway when the projected store exceeds its disk's free space (by default a "
        "one-line error names a smaller encoding that fits).",
        flag="--no-space-check",
        negate=True,
    )
    json: Path | None = reuse(
        JsonOptions, "json", help="Also write the summary as JSON to this file ('-': stdout)."
    )


@command(app, "precompute", PrecomputeCLI)
def precompute_cmd(o: PrecomputeCLI) -> None:
    """Run a teacher once over a split; write its FPN features, attention statistics and top-K
    detections to CACHE/TEACHER/SPLIT.zarr. Re-running resumes (completed images are skipped)."""
    from rich.table import Table

    from dfmsd_cli.data.adversarial import AdvConfig
    from dfmsd_cli.data.enhance import EnhanceConfig
    from dfmsd_cli.data.loader import resolve_data
    from dfmsd_cli.store.precompute import PrecomputeOptions, pace_note, precompute
    from dfmsd_cli.store.schema import parse_shard

    teacher, split, cache, dry_run, seed = o.teacher, o.split, o.cache, o.dry_run, o.seed
    ann_file, image_dir = resolve_data(o.data, split, o.ann, o.images)
    opts = PrecomputeOptions(
        teacher=teacher,
        split=split,
        weights=o.weights,
        cache=cache,
        levels=parse_int_list(o.levels, "--levels") if o.levels else None,
        dtype=o.dtype,
        keepbits=o.keepbits,
        for_student=o.for_student,
        store_logits=o.store_logits,
        pca=o.pca,
        views=[v.strip() for v in o.views.split(",") if v.strip()],
        enhance_from=o.enhance_from,
        enhance=EnhanceConfig(
            theta=o.enhance_theta,
            p=o.enhance_p,
            sigma=o.enhance_sigma,
            crop_min=o.crop_min,
            crop_max=o.crop_max,
            seed=seed,
        ),
        adv=AdvConfig(eps=o.adv_eps, steps=o.adv_steps, seed=seed) if o.adv_eps else None,
        geometry=Geometry(img_scale=parse_img_scale(o.img_scale)),
        batch_size=o.batch_size,
        num_workers=o.num_workers,
        shard=parse_shard(o.shard),
        device=o.device,
        topk=o.topk,
        score_thr=o.score_thr,
        block=o.block,
        codec=o.codec,
        writer_threads=o.writer_threads,
        seed=seed,
        max_images=o.max_images,
        strict=o.strict,
        space_check=o.space_check,
        probe_images=o.probe_images,
    )
    summary = precompute(ann_file, image_dir, opts, dry_run=dry_run, warn=console.print)
    if not dry_run and "://" not in cache:
        write_config(Path(cache) / teacher, record(o), "precompute")
    table = Table(title=f"precompute {teacher} / {split}" + (" (dry run)" if dry_run else ""))
    table.add_column("item")
    table.add_column("value", justify="right")
    rows = [("store", summary["path"]), ("images", str(summary["images"]))]
    rows.append(("this process", f"[{summary['range'][0]}, {summary['range'][1]})"))
    if dry_run:
        rows += [
            ("to compute", str(summary["todo"])),
            ("raw bytes/image", format_bytes(summary["raw_bytes_per_image"])),
            ("projected size", format_bytes(summary["projected_bytes"])),
            ("  of which logits", format_bytes(summary["projected_logit_bytes"])),
            ("free on its disk", _free(summary.get("free_bytes"))),
            (f"stored/raw features ({o.codec})", f"{summary['expected_compression']:.2f}"),
            ("  measured on", _probed(summary)),
            ("features' rel. RMSE", _rmse(summary.get("relative_rmse"))),
            *(
                [(f"--pca energy kept ({_held(summary)})", _energy(summary.get("energy_kept")))]
                if o.pca
                else []
            ),
            ("s/image (probe)", f"{summary['seconds_per_image']:.3f}"),
            ("projected time", f"{summary['projected_seconds']:.0f} s"),
        ]
    else:
        rows += [
            ("written now", str(summary["written"])),
            ("unreadable", str(summary["unreadable"])),
            ("complete", f"{summary['done']}/{summary['images']}"),
            ("wall time", f"{summary['wall_s']:.1f} s"),
            ("teacher time", f"{summary['teacher_s']:.1f} s"),
            ("loading images", f"{summary['data_s']:.1f} s"),
            ("waiting for the writer", f"{summary['writer_wait_s']:.1f} s"),
        ]
        for s, e in ((summary.get("pca") or {}).get("levels") or {}).items():
            rows.append((f"energy kept, stride {s}", pca_row(e)))
    for r in rows:
        table.add_row(*r)
    console.print(table)  # stderr: stdout stays clean for --json -
    note = None if dry_run else pace_note(summary, opts)
    if note:
        console.print(note)
    if dry_run and summary.get("smaller"):
        console.print(
            _smaller_table(summary["smaller"], summary.get("free_bytes"), summary.get("probe"))
        )
    emit_json(summary, o.json)

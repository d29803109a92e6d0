"""``dfmsd precompute``: run a teacher once and write its features to a zarr v3 store."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from dfmsd_cli.cli.app import ConfigOption, app, parse_int_list, write_config
from dfmsd_cli.data.geometry import Geometry, parse_img_scale
from dfmsd_cli.utils.console import console
from dfmsd_cli.utils.fmt import format_bytes


@app.command("precompute")
def precompute_cmd(
    teacher: str = typer.Option(..., "--teacher", "-t", help="Teacher zoo name, e.g. cmr_r101."),
    weights: str | None = typer.Option(
        None, "--weights", help="Teacher checkpoint or state dict (default: random init, --seed)."
    ),
    data: Path | None = typer.Option(
        None, "--data", help="COCO root: ROOT/annotations/instances_{split}.json and ROOT/{split}/."
    ),
    split: str = typer.Option("train2017", "--split", help="Split to precompute."),
    ann: Path | None = typer.Option(None, "--ann", help="Annotation file (overrides --data)."),
    images: Path | None = typer.Option(None, "--images", help="Image folder (overrides --data)."),
    cache: str = typer.Option(
        "cache",
        "--cache",
        help="Store root (local folder or fsspec URL): CACHE/TEACHER/SPLIT.zarr.",
    ),
    levels: str | None = typer.Option(
        None, "--levels", help="FPN strides to store, e.g. 8,16,32,64,128 (default: all)."
    ),
    dtype: str = typer.Option(
        "float16",
        "--dtype",
        help="float16, bfloat16 (float32's range) or uint8 (per-image, per-channel affine).",
    ),
    keepbits: int | None = typer.Option(
        None,
        "--keepbits",
        help="Round float16/bfloat16 mantissas to K bits before compression (smaller store).",
    ),
    for_student: str | None = typer.Option(
        None,
        "--for-student",
        help="Store only the levels this student has (e.g. retina_r50 skips a P2 map).",
    ),
    views: str = typer.Option("orig", "--views", help="Views: orig[,hflip]."),
    enhance_from: str | None = typer.Option(
        None,
        "--enhance-from",
        help="Weaker teacher whose stored area ratios drive the masking-enhancement view 'me'.",
    ),
    enhance_theta: float = typer.Option(0.5, "--enhance-theta", help="Area-ratio threshold θ."),
    enhance_p: float = typer.Option(0.5, "--enhance-p", help="Noise probability below θ."),
    enhance_sigma: float = typer.Option(10.0, "--enhance-sigma", help="Noise σ (0–255 scale)."),
    crop_min: float = typer.Option(0.05, "--crop-min", help="Smallest edge-crop fraction."),
    crop_max: float = typer.Option(0.2, "--crop-max", help="Largest edge-crop fraction."),
    adv_eps: int = typer.Option(
        0,
        "--adv-eps",
        help="Adversarial view 'adv': budget ε in grey levels (1..127; 0: no such view). "
        "The perturbation maximises the teacher's detection loss on the ground truth.",
    ),
    adv_steps: int = typer.Option(
        1, "--adv-steps", help="Adversarial view: 1 = FGSM, N > 1 = PGD with N sign steps."
    ),
    img_scale: str = typer.Option("1333,800", "--img-scale", help="Resize bound LONG,SHORT."),
    batch_size: int = typer.Option(2, "--batch-size", "-b", help="Images per teacher pass."),
    num_workers: int = typer.Option(2, "--num-workers", help="DataLoader decode workers."),
    shard: str | None = typer.Option(
        None, "--shard", help="I/N: this process writes part I of N (block-aligned)."
    ),
    topk: int = typer.Option(100, "--topk", help="Teacher detections kept per image and view."),
    score_thr: float = typer.Option(
        0.3, "--score-thr", help="Score threshold of the candidate-box area ratio."
    ),
    block: int = typer.Option(64, "--block", help="Images per chunk of the small arrays."),
    codec: str = typer.Option(
        "blosc", "--codec", help="Feature compressor: blosc (zstd 3 + shuffle) or zstd (level 3)."
    ),
    writer_threads: int = typer.Option(
        2, "--writer-threads", help="Threads compressing and writing feature chunks."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    seed: int = typer.Option(0, "--seed", help="Seed of a random-init teacher and of ME."),
    max_images: int | None = typer.Option(
        None, "--max-images", help="Only the first N images (quick runs)."
    ),
    strict: bool = typer.Option(False, "--strict", help="Fail on unreadable images."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the projected store size and time; write nothing."
    ),
    json_out: bool = typer.Option(False, "--json", help="Also print the summary as JSON."),
    config: str | None = ConfigOption,
) -> None:
    """Run a teacher once over a split; write its FPN features, attention statistics and top-K
    detections to CACHE/TEACHER/SPLIT.zarr. Re-running resumes (completed images are skipped)."""
    options = dict(locals())
    from rich.table import Table

    from dfmsd_cli.data.adversarial import AdvConfig
    from dfmsd_cli.data.enhance import EnhanceConfig
    from dfmsd_cli.data.loader import resolve_data
    from dfmsd_cli.store.precompute import PrecomputeOptions, precompute
    from dfmsd_cli.store.schema import parse_shard

    ann_file, image_dir = resolve_data(data, split, ann, images)
    opts = PrecomputeOptions(
        teacher=teacher,
        split=split,
        weights=weights,
        cache=cache,
        levels=parse_int_list(levels, "--levels") if levels else None,
        dtype=dtype,
        keepbits=keepbits,
        for_student=for_student,
        views=[v.strip() for v in views.split(",") if v.strip()],
        enhance_from=enhance_from,
        enhance=EnhanceConfig(
            theta=enhance_theta,
            p=enhance_p,
            sigma=enhance_sigma,
            crop_min=crop_min,
            crop_max=crop_max,
            seed=seed,
        ),
        adv=AdvConfig(eps=adv_eps, steps=adv_steps, seed=seed) if adv_eps else None,
        geometry=Geometry(img_scale=parse_img_scale(img_scale)),
        batch_size=batch_size,
        num_workers=num_workers,
        shard=parse_shard(shard),
        device=device,
        topk=topk,
        score_thr=score_thr,
        block=block,
        codec=codec,
        writer_threads=writer_threads,
        seed=seed,
        max_images=max_images,
        strict=strict,
    )
    summary = precompute(ann_file, image_dir, opts, dry_run=dry_run)
    if not dry_run and "://" not in cache:
        write_config(Path(cache) / teacher, options, "precompute")
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
            (f"stored/raw ({codec})", f"{summary['expected_compression']:.2f}"),
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
        ]
    for r in rows:
        table.add_row(*r)
    console.print(table)
    if json_out:
        print(json.dumps(summary, default=str))

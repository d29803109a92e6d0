"""``dfmsd viz store|masks|features|run|compare|detections``: figures (PNG, SVG or PDF)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import typer

from dfmsd_cli.cli.app import app, parse_int_list
from dfmsd_cli.cli.options import command
from dfmsd_cli.utils.console import console
from dfmsd_cli.utils.options import DataOptions, opt, reuse

viz_app = typer.Typer(
    help="Figures: teacher attention, masks, features, run curves, comparisons, detections.",
    no_args_is_help=True,
)
app.add_typer(viz_app, name="viz")


@dataclass(kw_only=True)
class FigureOptions:
    """Where a figure goes: a file (not a folder; --out is a folder in every command)."""

    figure: Path = opt(
        Path("figure.png"), "Output figure file.", short="-f", deprecated=("--out", "-o")
    )
    fmt: str | None = opt(
        None, "png, svg or pdf (default: from --figure, else png).", flag="--format"
    )
    dpi: int | None = opt(None, "Pixels per inch of a PNG (default 100).")


def _figure(default: str) -> Path:
    return reuse(FigureOptions, "figure", default=Path(default))


@dataclass(kw_only=True)
class ImageOptions:
    """One image of a store or of a COCO split."""

    image: int | None = opt(None, "COCO image id.")
    index: int | None = opt(None, "Image position in the store/annotations (0-based).")
    view: str = opt("orig", "A view the store holds: orig, hflip, me, ...")
    data: Path | None = reuse(
        DataOptions, "data", help="COCO root with the images (ROOT/SPLIT/, annotations)."
    )
    split: str | None = reuse(
        DataOptions, "split", default=None, help="Split of --data (default: the store's)."
    )


LEVELS_HELP = "Strides to draw, e.g. 8,16 (default: all)."


def _done(path: Path) -> None:
    console.print(f"figure: {path}")


def _lv(levels: str | None) -> list[int] | None:
    return parse_int_list(levels, "--levels") if levels else None


@dataclass(kw_only=True)
class VizStoreOptions(ImageOptions, FigureOptions):
    store: str = opt(help="Teacher store, e.g. cache/retina_r50/train2017.zarr.", argument=True)
    tau: float = opt(0.5, "Attention temperature τ (losses: 0.5).")
    topk: int = opt(10, "Teacher boxes to draw.")
    levels: str | None = opt(None, LEVELS_HELP)
    figure: Path = _figure("viz_store.png")


@command(viz_app, "store", VizStoreOptions)
def store_cmd(o: VizStoreOptions) -> None:
    """Teacher attention on one stored image.

    Spatial attention per level over the image, channel attention strips, top-K boxes; for
    the me view the original next to the enhanced input."""
    from dfmsd_cli.viz import viz_store

    _done(viz_store(o.store, o.figure, image=o.image, index=o.index, view=o.view, data=o.data,
                    split=o.split, tau=o.tau, topk=o.topk, levels=_lv(o.levels), fmt=o.fmt,
                    dpi=o.dpi))  # fmt: skip


@dataclass(kw_only=True)
class VizMasksOptions(ImageOptions, FigureOptions):
    store: str = opt(help="Teacher store.", argument=True)
    method: str = opt("dfmsd", "dfmsd, dmkd, mgd, fgd, pkd.")
    student: str = opt("retina_r50", "Student name: picks the method's family defaults.")
    seed: int = opt(0, "Seed of the sampled/random masks.")
    levels: str | None = opt(None, LEVELS_HELP)
    figure: Path = _figure("viz_masks.png")


@command(viz_app, "masks", VizMasksOptions)
def masks_cmd(o: VizMasksOptions) -> None:
    """The masks a method applies on one image, per level and rule."""
    from dfmsd_cli.viz import viz_masks

    _done(viz_masks(o.store, o.figure, method=o.method, image=o.image, index=o.index,
                    view=o.view, data=o.data, split=o.split, student=o.student, seed=o.seed,
                    levels=_lv(o.levels), fmt=o.fmt, dpi=o.dpi))  # fmt: skip


@dataclass(kw_only=True)
class VizFeaturesOptions(ImageOptions, FigureOptions):
    checkpoint: list[Path] = opt(
        help="Student checkpoint (repeatable; --student is a zoo name in every command).",
        repeatable=True,
    )
    store: str = opt(help="Teacher store.")
    levels: str | None = opt(None, LEVELS_HELP)
    figure: Path = _figure("viz_features.png")


@command(viz_app, "features", VizFeaturesOptions)
def features_cmd(o: VizFeaturesOptions) -> None:
    """Teacher vs student FPN features on one image.

    Channel-mean maps, shared-basis PCA RGB, squared difference, raw and standardised
    histograms."""
    from dfmsd_cli.viz import viz_features

    _done(viz_features(o.checkpoint, o.store, o.figure, image=o.image, index=o.index, view=o.view,
                       data=o.data, split=o.split, levels=_lv(o.levels), fmt=o.fmt,
                       dpi=o.dpi))  # fmt: skip


@dataclass(kw_only=True)
class VizRunOptions(FigureOptions):
    runs: list[Path] = opt(
        help="Run folders (dfmsd train/distill --out).", argument=True, repeatable=True
    )
    log: bool = opt(False, "Log-scale loss axis.")
    figure: Path = _figure("viz_run.png")


@command(viz_app, "run", VizRunOptions)
def run_cmd(o: VizRunOptions) -> None:
    """Loss components per stage, learning rate, evaluation per stage; runs overlaid."""
    from dfmsd_cli.viz import viz_run

    _done(viz_run(o.runs, o.figure, log_y=o.log, fmt=o.fmt, dpi=o.dpi))


@dataclass(kw_only=True)
class VizCompareOptions(FigureOptions):
    compare_dir: Path = opt(
        help="results.json of examples/compare.sh (or its OUT folder); a folder of "
        "METHOD/sSEED runs without one: grouped bars of the metrics.",
        argument=True,
    )
    figure: Path = _figure("viz_compare.png")
    metric: str = opt("mAP", "Metric of the paired Δ bars (mAP, APs, ..., ARl).")


@command(viz_app, "compare", VizCompareOptions)
def compare_cmd(o: VizCompareOptions) -> None:
    """Paired Δ vs the student alone per method, error bars over seeds (or grouped bars)."""
    from dfmsd_cli.viz import viz_compare

    _done(viz_compare(o.compare_dir, o.figure, metric=o.metric, fmt=o.fmt, dpi=o.dpi))


@dataclass(kw_only=True)
class VizDetectionsOptions(FigureOptions):
    checkpoints: list[Path] = opt(
        help="dfmsd checkpoints, side by side.", argument=True, repeatable=True
    )
    data: Path = reuse(DataOptions, "data", default=dataclasses.MISSING, help="COCO root.")
    split: str = reuse(DataOptions, "split", default="val2017")
    image: int | None = reuse(ImageOptions, "image")
    index: int | None = reuse(ImageOptions, "index")
    score_thr: float = opt(0.3, "Draw predictions scoring above.")
    figure: Path = _figure("viz_detections.png")


@command(viz_app, "detections", VizDetectionsOptions)
def detections_cmd(o: VizDetectionsOptions) -> None:
    """Predictions vs ground truth on one image, one panel per checkpoint."""
    from dfmsd_cli.viz import viz_detections

    _done(viz_detections(o.checkpoints, o.figure, data=o.data, split=o.split, image=o.image,
                         index=o.index, score_thr=o.score_thr, fmt=o.fmt, dpi=o.dpi))  # fmt: skip

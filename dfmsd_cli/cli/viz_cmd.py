"""``dfmsd viz store|masks|features|run|compare|detections``: figures (PNG, SVG or PDF)."""

from __future__ import annotations

from pathlib import Path

import typer

from dfmsd_cli.cli.app import app, parse_int_list
from dfmsd_cli.utils.console import console

viz_app = typer.Typer(
    help="Figures: teacher attention, masks, features, run curves, comparisons, detections.",
    no_args_is_help=True,
)
app.add_typer(viz_app, name="viz")

IMAGE = typer.Option(None, "--image", help="COCO image id.")
INDEX = typer.Option(None, "--index", help="Image position in the store/annotations (0-based).")
VIEW = typer.Option("orig", "--view", help="A view the store holds: orig, hflip, me, ...")
DATA = typer.Option(None, "--data", help="COCO root with the images (ROOT/SPLIT/, annotations).")
SPLIT = typer.Option(None, "--split", help="Split of --data (default: the store's).")
LEVELS = typer.Option(None, "--levels", help="Strides to draw, e.g. 8,16 (default: all).")
FORMAT = typer.Option(None, "--format", help="png, svg or pdf (default: from --out, else png).")
DPI = typer.Option(None, "--dpi", help="Pixels per inch of a PNG (default 100).")


def _out(default: str) -> typer.Option:
    return typer.Option(Path(default), "--out", "-o", help="Output figure file.")


def _done(path: Path) -> None:
    console.print(f"figure: {path}")


def _lv(levels: str | None) -> list[int] | None:
    return parse_int_list(levels, "--levels") if levels else None


@viz_app.command("store")
def store_cmd(
    store: str = typer.Argument(..., help="Teacher store, e.g. cache/retina_r50/train2017.zarr."),
    image: int | None = IMAGE,
    index: int | None = INDEX,
    view: str = VIEW,
    data: Path | None = DATA,
    split: str | None = SPLIT,
    tau: float = typer.Option(0.5, "--tau", help="Attention temperature τ (losses: 0.5)."),
    topk: int = typer.Option(10, "--topk", help="Teacher boxes to draw."),
    levels: str | None = LEVELS,
    out: Path = _out("viz_store.png"),
    fmt: str | None = FORMAT,
    dpi: int | None = DPI,
) -> None:
    """Teacher attention on one stored image.

    Spatial attention per level over the image, channel attention strips, top-K boxes; for
    the me view the original next to the enhanced input."""
    from dfmsd_cli.viz import viz_store

    _done(viz_store(store, out, image=image, index=index, view=view, data=data, split=split,
                    tau=tau, topk=topk, levels=_lv(levels), fmt=fmt, dpi=dpi))  # fmt: skip


@viz_app.command("masks")
def masks_cmd(
    store: str = typer.Argument(..., help="Teacher store."),
    method: str = typer.Option("dfmsd", "--method", help="dfmsd, dmkd, mgd, fgd, pkd."),
    image: int | None = IMAGE,
    index: int | None = INDEX,
    view: str = VIEW,
    data: Path | None = DATA,
    split: str | None = SPLIT,
    student: str = typer.Option(
        "retina_r50", "--student", help="Student name: picks the method's family defaults."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampled/random masks."),
    levels: str | None = LEVELS,
    out: Path = _out("viz_masks.png"),
    fmt: str | None = FORMAT,
    dpi: int | None = DPI,
) -> None:
    """The masks a method applies on one image, per level and rule."""
    from dfmsd_cli.viz import viz_masks

    _done(viz_masks(store, out, method=method, image=image, index=index, view=view, data=data,
                    split=split, student=student, seed=seed, levels=_lv(levels), fmt=fmt, dpi=dpi))  # fmt: skip


@viz_app.command("features")
def features_cmd(
    student: list[Path] = typer.Option(..., "--student", help="Student checkpoint (repeatable)."),
    store: str = typer.Option(..., "--store", help="Teacher store."),
    image: int | None = IMAGE,
    index: int | None = INDEX,
    view: str = VIEW,
    data: Path | None = DATA,
    split: str | None = SPLIT,
    levels: str | None = LEVELS,
    out: Path = _out("viz_features.png"),
    fmt: str | None = FORMAT,
    dpi: int | None = DPI,
) -> None:
    """Teacher vs student FPN features on one image.

    Channel-mean maps, shared-basis PCA RGB, squared difference, raw and standardised
    histograms."""
    from dfmsd_cli.viz import viz_features

    _done(viz_features(student, store, out, image=image, index=index, view=view, data=data,
                       split=split, levels=_lv(levels), fmt=fmt, dpi=dpi))  # fmt: skip


@viz_app.command("run")
def run_cmd(
    runs: list[Path] = typer.Argument(..., help="Run folders (dfmsd train/distill --out)."),
    log: bool = typer.Option(False, "--log", help="Log-scale loss axis."),
    out: Path = _out("viz_run.png"),
    fmt: str | None = FORMAT,
    dpi: int | None = DPI,
) -> None:
    """Loss components per stage, learning rate, evaluation per stage; runs overlaid."""
    from dfmsd_cli.viz import viz_run

    _done(viz_run(runs, out, log_y=log, fmt=fmt, dpi=dpi))


@viz_app.command("compare")
def compare_cmd(
    compare_dir: Path = typer.Argument(..., help="OUT of examples/compare.sh."),
    out: Path = _out("viz_compare.png"),
    fmt: str | None = FORMAT,
    dpi: int | None = DPI,
) -> None:
    """The compare table as grouped bars, error bars over seeds."""
    from dfmsd_cli.viz import viz_compare

    _done(viz_compare(compare_dir, out, fmt=fmt, dpi=dpi))


@viz_app.command("detections")
def detections_cmd(
    checkpoints: list[Path] = typer.Argument(..., help="dfmsd checkpoints, side by side."),
    data: Path = typer.Option(..., "--data", help="COCO root."),
    split: str = typer.Option("val2017", "--split", help="Split of --data."),
    image: int | None = IMAGE,
    index: int | None = INDEX,
    score_thr: float = typer.Option(0.3, "--score-thr", help="Draw predictions scoring above."),
    out: Path = _out("viz_detections.png"),
    fmt: str | None = FORMAT,
    dpi: int | None = DPI,
) -> None:
    """Predictions vs ground truth on one image, one panel per checkpoint."""
    from dfmsd_cli.viz import viz_detections

    _done(viz_detections(checkpoints, out, data=data, split=split, image=image, index=index,
                         score_thr=score_thr, fmt=fmt, dpi=dpi))  # fmt: skip

"""Shared pieces of the figures: the headless backend, saving, image lookup, box drawing.

Every figure is drawn with matplotlib's Agg backend (no display needed) and saved as PNG,
SVG or PDF (``FORMATS``), chosen by ``--format`` or the output file's suffix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: figures are files, never windows

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dfmsd_cli.errors import UserError, suggest  # noqa: E402

FORMATS: tuple[str, ...] = ("png", "svg", "pdf")
DPI = 100
# Tableau-10: distinct on white for up to ten series (matplotlib's default cycle)
PALETTE: tuple[str, ...] = tuple(plt.get_cmap("tab10").colors)  # type: ignore[attr-defined]


def output_path(out: str | Path, fmt: str | None = None) -> Path:
    """``out`` with the suffix of ``fmt`` (or ``out``'s own suffix when it is a known format)."""
    out = Path(out)
    suffix = out.suffix.lstrip(".").lower()
    if fmt is None:
        fmt = suffix if suffix in FORMATS else "png"
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise UserError(f"unknown --format '{fmt}'{suggest(fmt, FORMATS)}: use png, svg or pdf")
    return out if suffix == fmt else out.with_suffix(f".{fmt}")


def save(fig: Any, out: str | Path, fmt: str | None = None, dpi: int | None = None) -> Path:
    """Save ``fig`` to ``out`` at ``dpi`` (default ``DPI``; parent folders created), close it,
    return the path."""
    path = output_path(out, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = path.suffix.lstrip(".")
    extra = {"pil_kwargs": {"optimize": True}} if fmt == "png" else {}  # smaller, same pixels
    if dpi is not None and dpi <= 0:
        raise UserError(f"--dpi must be positive, got {dpi}")
    fig.savefig(path, format=fmt, dpi=dpi or DPI, **extra)
    plt.close(fig)
    return path


def new_figure(cols: int, rows: int, panel: tuple[float, float] = (2.6, 2.2), **kw: Any):
    """A figure of ``rows × cols`` panels of ``panel`` inches each; returns (fig, axes 2-D)."""
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(panel[0] * cols, panel[1] * rows),
        squeeze=False,
        layout="constrained",
        **kw,
    )
    return fig, axes


def resolve_index(image_ids: list[int], image: int | None, index: int | None, where: str) -> int:
    """The position of ``--image ID`` (or ``--index I``) in ``image_ids``; one-line errors."""
    if (image is None) == (index is None):
        raise UserError("pass exactly one of --image ID or --index I")
    n = len(image_ids)
    if index is not None:
        if not 0 <= index < n:
            raise UserError(f"--index {index} is out of range: {where} has {n} images (0..{n - 1})")
        return int(index)
    try:
        return image_ids.index(int(image))
    except ValueError:
        first = ", ".join(str(i) for i in image_ids[:5])
        raise UserError(
            f"image id {image} is not in {where} ({n} images, e.g. {first}): pass one of its "
            "ids or --index I"
        ) from None


def image_hwc(raw: Any) -> np.ndarray:
    """A (3, h, w) float [0, 255] tensor/array as an (h, w, 3) uint8 array for imshow."""
    a = raw.detach().cpu().numpy() if hasattr(raw, "detach") else np.asarray(raw)
    return np.clip(a, 0, 255).astype(np.uint8).transpose(1, 2, 0)


def draw_boxes(
    ax: Any,
    boxes: Any,
    labels: list[str] | None = None,
    color: str | tuple = "lime",
    linestyle: str = "-",
    scores: Any = None,
) -> None:
    """xyxy ``boxes`` as rectangles, with ``label score`` text when given."""
    from matplotlib.patches import Rectangle

    b = np.asarray(boxes.cpu() if hasattr(boxes, "cpu") else boxes, dtype=float).reshape(-1, 4)
    for i, (x1, y1, x2, y2) in enumerate(b):
        ax.add_patch(
            Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=1.2, ec=color, ls=linestyle)
        )
        text = labels[i] if labels else ""
        if scores is not None:
            text = f"{text} {float(scores[i]):.2f}".strip()
        if text:
            ax.text(x1, y1, text, fontsize=6, color="black", va="bottom",
                    bbox={"fc": color, "alpha": 0.7, "pad": 0.5, "lw": 0})  # fmt: skip


def clean(ax: Any) -> None:
    """No ticks on an image panel."""
    ax.set_xticks([])
    ax.set_yticks([])


def category_names(categories: list[dict] | None, labels: Any) -> list[str]:
    """Names of labels 1..K (``categories[L-1]``), or ``#L`` when unknown."""
    out = []
    for lab in np.asarray(labels).reshape(-1):
        k = int(lab) - 1
        out.append(
            categories[k]["name"] if categories and 0 <= k < len(categories) else f"#{k + 1}"
        )
    return out

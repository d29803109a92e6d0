"""Small PNG charts drawn with PIL only (no matplotlib): loss curves and grouped metric bars.

``line_chart`` draws several named series on shared axes with "nice" ticks and a legend;
``bar_chart`` draws one group of bars per label (e.g. one group per metric, one bar per
model). Non-finite values are skipped (a line breaks there), so a diverged loss still plots.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

# Tableau-10, readable on white and distinct for up to ten series.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)
_AXIS = (40, 40, 40)
_GRID = (225, 225, 225)
_WHITE = (255, 255, 255)
_LEGEND_TOP = 30  # below the title
_LEGEND_ROW = 16

Series = Sequence[float] | Sequence[tuple[float, float]]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed bitmap font only
        return ImageFont.load_default()


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] with a step of 1, 2 or 5 x 10^k (Heckbert 1990)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"non-finite axis range [{lo}, {hi}]")
    if hi <= lo:
        pad = abs(lo) * 0.5 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(1, target)
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    k = 0
    while True:
        t = start + k * step
        ticks.append(round(t, 12))
        if t >= hi - 1e-12 * abs(step):
            break
        k += 1
    return ticks


def _fmt_tick(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e5 or abs(v) < 1e-3:
        return f"{v:.1e}"
    return f"{v:.6g}"


def _points(values: Series) -> list[tuple[float, float]]:
    vals = list(values)
    if vals and isinstance(vals[0], (tuple, list)):
        return [(float(x), float(y)) for x, y in vals]
    return [(float(i), float(y)) for i, y in enumerate(vals)]


class _Frame:
    """Plot area inside margins, mapping data coordinates to pixels."""

    def __init__(self, size, xlim, ylim, top: int, margins=(70, 25, 55)) -> None:
        left, right, bottom = margins
        self.x0, self.y0 = left, top
        self.x1, self.y1 = size[0] - right, size[1] - bottom
        self.xlim, self.ylim = xlim, ylim

    def px(self, x: float, y: float) -> tuple[float, float]:
        (xa, xb), (ya, yb) = self.xlim, self.ylim
        u = (x - xa) / (xb - xa) if xb != xa else 0.5
        v = (y - ya) / (yb - ya) if yb != ya else 0.5
        return self.x0 + u * (self.x1 - self.x0), self.y1 - v * (self.y1 - self.y0)


def _axes(draw, frame: _Frame, xticks, yticks, font, xlabels=None) -> None:
    for t in yticks:
        _, y = frame.px(frame.xlim[0], t)
        draw.line([(frame.x0, y), (frame.x1, y)], fill=_GRID)
        draw.text((frame.x0 - 6, y), _fmt_tick(t), fill=_AXIS, font=font, anchor="rm")
    for t in xticks or []:
        x, _ = frame.px(t, frame.ylim[0])
        draw.line([(x, frame.y1), (x, frame.y1 + 4)], fill=_AXIS)
        draw.text((x, frame.y1 + 6), _fmt_tick(t), fill=_AXIS, font=font, anchor="mt")
    for x, text in xlabels or []:
        draw.text((x, frame.y1 + 6), text, fill=_AXIS, font=font, anchor="mt")
    draw.line([(frame.x0, frame.y0), (frame.x0, frame.y1), (frame.x1, frame.y1)], fill=_AXIS)


def _labels(draw, img, frame, title, xlabel, ylabel, font, small) -> None:
    w, h = img.size
    if title:
        draw.text((w / 2, 8), title, fill=_AXIS, font=font, anchor="mt")
    if xlabel:
        draw.text(((frame.x0 + frame.x1) / 2, h - 6), xlabel, fill=_AXIS, font=small, anchor="mb")
    if ylabel:
        # vertical text: draw on a strip, rotate, paste at the left edge
        box = draw.textbbox((0, 0), ylabel, font=small)
        strip = Image.new("RGB", (box[2] - box[0] + 4, box[3] - box[1] + 4), _WHITE)
        ImageDraw.Draw(strip).text((2 - box[0], 2 - box[1]), ylabel, fill=_AXIS, font=small)
        strip = strip.rotate(90, expand=True)
        img.paste(strip, (4, int((frame.y0 + frame.y1 - strip.size[1]) / 2)))


def _legend_layout(names: Sequence[str], width: int, font) -> list[tuple[float, int, str]]:
    """(x, row, name) of each legend entry: a row of swatches under the title, wrapped."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    out, x, row = [], 70.0, 0
    for name in names:
        w = 24 + draw.textlength(name, font=font) + 16
        if x + w > width - 10 and x > 70:
            x, row = 70.0, row + 1
        out.append((x, row, name))
        x += w
    return out


def _legend(draw, layout, top: int, font) -> None:
    """Legend above the plot area, so it never hides data."""
    for i, (x, row, name) in enumerate(layout):
        color = PALETTE[i % len(PALETTE)]
        y = top + row * _LEGEND_ROW
        draw.rectangle([x, y + 3, x + 18, y + 11], fill=color)
        draw.text((x + 24, y + 7), name, fill=_AXIS, font=font, anchor="lm")


def _top_margin(layout) -> int:
    rows = 1 + max(row for _, row, _ in layout)
    return _LEGEND_TOP + rows * _LEGEND_ROW + 8


def line_chart(
    series: Mapping[str, Series],
    path: str | Path,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    size: tuple[int, int] = (800, 500),
    log_y: bool = False,
) -> Path:
    """Draw named series as lines and save a PNG at ``path``.

    Each series is a sequence of y values (x = 0, 1, ...) or of (x, y) pairs. With ``log_y``
    the y axis is log10 (non-positive values skipped). Returns ``path``.
    """
    pts = {name: _points(v) for name, v in series.items()}
    if log_y:
        pts = {
            n: [(x, math.log10(y)) if y > 0 else (x, math.nan) for x, y in p]
            for n, p in pts.items()
        }
    finite = [(x, y) for p in pts.values() for x, y in p if math.isfinite(x) and math.isfinite(y)]
    if not finite:
        raise ValueError("line_chart needs at least one finite point")
    xs, ys = [x for x, _ in finite], [y for _, y in finite]
    xticks, yticks = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    img = Image.new("RGB", size, _WHITE)
    draw = ImageDraw.Draw(img)
    font, small = _font(14), _font(12)
    layout = _legend_layout(list(pts), size[0], small)
    frame = _Frame(size, (xticks[0], xticks[-1]), (yticks[0], yticks[-1]), _top_margin(layout))
    _axes(draw, frame, xticks, yticks, small)
    if log_y:  # relabel ticks as 10^t
        for t in yticks:
            _, y = frame.px(frame.xlim[0], t)
            draw.rectangle([2, y - 8, frame.x0 - 2, y + 8], fill=_WHITE)
            draw.text((frame.x0 - 6, y), _fmt_tick(10**t), fill=_AXIS, font=small, anchor="rm")
    for i, p in enumerate(pts.values()):
        color = PALETTE[i % len(PALETTE)]
        run: list[tuple[float, float]] = []
        for x, y in [*p, (math.nan, math.nan)]:
            if math.isfinite(x) and math.isfinite(y):
                run.append(frame.px(x, y))
                continue
            if len(run) == 1:
                draw.ellipse(
                    [run[0][0] - 2, run[0][1] - 2, run[0][0] + 2, run[0][1] + 2], fill=color
                )
            elif run:
                draw.line(run, fill=color, width=2)
            run = []
    _labels(draw, img, frame, title, xlabel, ylabel, font, small)
    _legend(draw, layout, _LEGEND_TOP, small)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path


def bar_chart(
    groups: Sequence[str],
    series: Mapping[str, Sequence[float]],
    path: str | Path,
    title: str = "",
    ylabel: str = "",
    size: tuple[int, int] = (800, 500),
    value_labels: bool = True,
) -> Path:
    """Grouped bars: per group label, one bar per named series (``len(values) == len(groups)``).

    The y axis starts at 0 (or below, for negative values). Non-finite values leave a gap.
    """
    if not groups or not series:
        raise ValueError("bar_chart needs at least one group and one series")
    for name, vals in series.items():
        if len(vals) != len(groups):
            raise ValueError(f"series {name!r} has {len(vals)} values for {len(groups)} groups")
    vals = [float(v) for s in series.values() for v in s if math.isfinite(float(v))]
    lo, hi = min([0.0, *vals]), max([0.0, *vals])
    yticks = nice_ticks(lo, hi * 1.12 if hi > 0 else hi)  # headroom for the value labels
    img = Image.new("RGB", size, _WHITE)
    draw = ImageDraw.Draw(img)
    font, small = _font(14), _font(12)
    layout = _legend_layout(list(series), size[0], small)
    frame = _Frame(size, (0.0, float(len(groups))), (yticks[0], yticks[-1]), _top_margin(layout))
    centers = [frame.px(g + 0.5, 0)[0] for g in range(len(groups))]
    _axes(draw, frame, None, yticks, small, xlabels=list(zip(centers, groups, strict=True)))
    n = len(series)
    group_w = (frame.x1 - frame.x0) / len(groups)
    bar_w = group_w * 0.8 / n
    _, y_zero = frame.px(0, 0)
    for i, vals_i in enumerate(series.values()):
        color = PALETTE[i % len(PALETTE)]
        for g, v in enumerate(vals_i):
            v = float(v)
            if not math.isfinite(v):
                continue
            x = frame.x0 + g * group_w + group_w * 0.1 + i * bar_w
            _, y = frame.px(0, v)
            draw.rectangle([x + 1, min(y, y_zero), x + bar_w - 1, max(y, y_zero)], fill=color)
            if value_labels:
                anchor = "mb" if v >= 0 else "mt"
                draw.text(
                    (x + bar_w / 2, y - 2 if v >= 0 else y + 2),
                    f"{v:.3g}",
                    fill=_AXIS,
                    font=_font(10),
                    anchor=anchor,
                )
    _labels(draw, img, frame, title, "", ylabel, font, small)
    _legend(draw, layout, _LEGEND_TOP, small)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path

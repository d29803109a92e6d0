"""PIL charts (dfmsd_cli.utils.plot): ticks, series colours, bar heights proportional to values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from dfmsd_cli.utils.plot import PALETTE, bar_chart, line_chart, nice_ticks

SWATCH = 19 * 9  # legend swatch pixels, drawn once per series


def _count(img: Image.Image, color) -> int:
    a = np.asarray(img.convert("RGB"))
    return int((a == np.array(color, np.uint8)).all(-1).sum())


def test_nice_ticks():
    assert nice_ticks(0, 1) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    t = nice_ticks(0.013, 0.087)
    assert t[0] <= 0.013 and t[-1] >= 0.087
    step = t[1] - t[0]
    mant = step / 10 ** math.floor(math.log10(step))
    assert round(mant, 6) in (1, 2, 5)
    assert nice_ticks(3, 3)[0] < 3 < nice_ticks(3, 3)[-1]  # degenerate range widened


def test_line_chart_draws_each_series(tmp_path):
    path = line_chart(
        {"loss": [3.0, 2.0, float("nan"), 1.0, 0.5], "loss_cls": [(0, 1.0), (2, 0.8), (4, 0.3)]},
        tmp_path / "sub" / "loss.png",
        title="loss",
        xlabel="iteration",
        ylabel="value",
        size=(400, 300),
    )
    img = Image.open(path)
    assert img.size == (400, 300) and img.format == "PNG"
    for color in PALETTE[:2]:
        assert _count(img, color) > SWATCH  # swatch plus the line itself
    assert _count(img, PALETTE[2]) == 0  # only two series
    line_chart({"a": [1.0, 10.0, 100.0]}, tmp_path / "log.png", log_y=True)
    with pytest.raises(ValueError):
        line_chart({"a": [float("nan")]}, tmp_path / "bad.png")


def test_bar_heights_proportional(tmp_path):
    path = bar_chart(["mAP"], {"student": [1.0], "teacher": [3.0]}, tmp_path / "bars.png")
    img = Image.open(path)
    a = _count(img, PALETTE[0]) - SWATCH
    b = _count(img, PALETTE[1]) - SWATCH
    assert a > 0 and b / a == pytest.approx(3.0, rel=0.03)
    # grouped: two groups, both series present in both
    path = bar_chart(["AP50", "AP75"], {"x": [0.5, 0.25], "y": [0.6, -0.1]}, tmp_path / "g.png")
    assert _count(Image.open(path), PALETTE[1]) > SWATCH
    with pytest.raises(ValueError):
        bar_chart(["a", "b"], {"x": [1.0]}, tmp_path / "bad.png")

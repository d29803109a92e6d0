"""``dfmsd viz features``: teacher vs student FPN features on one image, per level.

Per level (one row), for the teacher and each student:

* channel-mean map ``mean_c |F|`` (the store's spatial statistic), one colour scale per row;
* PCA RGB: the first three principal components of the *teacher's* channel vectors over the
  image cells; every panel is projected on that basis with the teacher's display limits
  (:func:`dfmsd_cli.viz.overlay.pca_basis`), so equal colours mean equal features;
* for each student the per-cell squared difference ``mean_c (S − T)²`` to the teacher, one
  colour scale per row (the student map is resized to the teacher's as the losses do,
  :func:`dfmsd_cli.distill.losses.common.resize_to`);
* histograms of the raw values and of the values standardised per channel over the image cells
  (:func:`dfmsd_cli.distill.losses.sfa.standardize_valid`, SFA's own standardisation): the
  paper's Fig. 8, feature distributions before/after SFA.

Only cells overlapping the resized image are used (padding excluded everywhere).
"""

from __future__ import annotations

import numpy as np
import torch

from dfmsd_cli.distill.losses.common import resize_to
from dfmsd_cli.distill.losses.sfa import standardize_valid
from dfmsd_cli.errors import UserError
from dfmsd_cli.viz.common import PALETTE, clean, new_figure
from dfmsd_cli.viz.overlay import image_cells, level_vectors, pca_basis, pca_rgb, upsample_to_extent


def align_student(
    student: torch.Tensor, teacher: torch.Tensor, name: str, stride: int
) -> torch.Tensor:
    """The student map at the teacher's size; channels must agree (no align conv outside a run)."""
    if student.shape[0] != teacher.shape[0]:
        raise UserError(
            f"student {name} has {student.shape[0]} channels at stride {stride}, the teacher "
            f"{teacher.shape[0]}: compare students whose FPN width equals the teacher's"
        )
    return resize_to(student[None].float(), teacher.shape[-2:])[0]


def level_panels(
    teacher: torch.Tensor, students: dict[str, torch.Tensor], stride: int, size: tuple[int, int]
) -> dict[str, dict[str, np.ndarray]]:
    """Per panel name (``teacher`` then the students): ``mean``, ``rgb``, ``values``,
    ``standard`` and for students ``sqdiff``, all restricted to the image cells."""
    r, c = image_cells(size, stride)
    t = teacher.float()
    basis = pca_basis(level_vectors(t.numpy(), stride, size))
    valid = torch.zeros(1, *t.shape[-2:], dtype=torch.bool)
    valid[:, :r, :c] = True
    out = {}
    for name, f in {"teacher": t, **students}.items():
        f = t if name == "teacher" else align_student(f, t, name, stride)
        d = {
            "mean": f.abs().mean(0)[:r, :c].numpy(),
            "rgb": pca_rgb(f[:, :r, :c].numpy(), basis),
            "values": f[:, :r, :c].reshape(-1).numpy(),
            "standard": standardize_valid(f[None], valid).reshape(-1).numpy(),
        }
        if name != "teacher":
            d["sqdiff"] = ((f - t) ** 2).mean(0)[:r, :c].numpy()
        out[name] = d
    return out


def features_figure(
    teacher: dict[int, torch.Tensor],
    students: dict[str, dict[int, torch.Tensor]],
    size: tuple[int, int],
    levels=None,
    title: str = "",
):
    """Rows = levels; columns: teacher mean/PCA, per student mean/PCA/diff, two histograms."""
    levels = [int(s) for s in (levels or teacher)]
    missing = {n: [s for s in levels if s not in f] for n, f in students.items()}
    missing = {n: m for n, m in missing.items() if m}
    if missing:
        raise UserError(
            f"levels missing in a student: {missing}: pass --levels with strides both share"
        )
    cols = 2 + 3 * len(students) + 2
    fig, axes = new_figure(cols, len(levels), panel=(2.0, 1.8))
    for r, s in enumerate(levels):
        p = level_panels(teacher[s], {n: f[s] for n, f in students.items()}, s, size)
        lo = min(float(d["mean"].min()) for d in p.values())
        hi = max(float(d["mean"].max()) for d in p.values())
        dmax = max([float(d["sqdiff"].max()) for d in p.values() if "sqdiff" in d] + [1e-12])
        j = 0
        for name, d in p.items():
            ax = axes[r, j]
            ax.imshow(upsample_to_extent(d["mean"], s, size), cmap="magma", vmin=lo, vmax=hi)
            ax.set_title(f"s{s} {name} mean|F|", fontsize=7)
            ax = axes[r, j + 1]
            ax.imshow(upsample_to_extent(d["rgb"], s, size), interpolation="nearest")
            ax.set_title(f"s{s} {name} PCA", fontsize=7)
            j += 2
            if "sqdiff" in d:
                ax = axes[r, j]
                ax.imshow(upsample_to_extent(d["sqdiff"], s, size), cmap="Reds", vmin=0, vmax=dmax)
                ax.set_title(f"s{s} {name} (S−T)² {float(d['sqdiff'].mean()):.3g}", fontsize=7)
                j += 1
        for k in range(j):
            clean(axes[r, k])
        for off, key, label in ((0, "values", "raw"), (1, "standard", "standardised")):
            ax = axes[r, j + off]
            for i, (name, d) in enumerate(p.items()):
                v = d[key]
                lo_, hi_ = np.percentile(v, [0.5, 99.5]) if v.size else (0.0, 1.0)
                ax.hist(v, bins=60, range=(lo_, hi_) if hi_ > lo_ else None, density=True,
                        histtype="step", color=PALETTE[i % len(PALETTE)], label=name)  # fmt: skip
            ax.set_title(f"s{s} {label} values", fontsize=7)
            ax.tick_params(labelsize=6)
            if r == 0 and off == 0:
                ax.legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig

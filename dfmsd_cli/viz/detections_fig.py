"""``dfmsd viz detections``: predictions vs ground truth on one image, one panel per checkpoint.

Each checkpoint runs on the image resized with its own recorded geometry (as ``dfmsd eval``
does); its boxes are mapped back to original pixels (÷ the resize scale) and drawn over the
original image with the class name and score (``--score-thr``), the ground-truth boxes dashed.
"""

from __future__ import annotations

from typing import Any

import torch

from dfmsd_cli.viz.common import category_names, clean, draw_boxes, new_figure

GT_COLOUR = "white"


@torch.no_grad()
def predict_one(model: torch.nn.Module, sample: dict, pad_divisor: int) -> dict[str, torch.Tensor]:
    """Detections of ``model`` on one dataset sample, boxes in original image pixels."""
    from dfmsd_cli.data.geometry import pad_batch

    model.eval()
    x = pad_batch([sample["image"]], pad_divisor)
    det = model(x, [tuple(sample["size"])]).detections[0]
    return {
        "boxes": det["boxes"].float() / float(sample["scale"]),
        "scores": det["scores"].float(),
        "labels": det["labels"],
    }


def detections_figure(
    image: Any,
    gt: dict[str, torch.Tensor],
    predictions: dict[str, dict[str, torch.Tensor]],
    categories: list[dict] | None,
    score_thr: float = 0.3,
    title: str = "",
):
    """``image`` (h, w, 3) uint8 original; ``gt``/``predictions`` boxes in original pixels."""
    fig, axes = new_figure(len(predictions), 1, panel=(4.2, 3.4))
    for j, (name, det) in enumerate(predictions.items()):
        ax = axes[0, j]
        ax.imshow(image)
        draw_boxes(ax, gt["boxes"], category_names(categories, gt["labels"]),
                   color=GT_COLOUR, linestyle="--")  # fmt: skip
        keep = det["scores"] >= score_thr
        draw_boxes(
            ax,
            det["boxes"][keep],
            category_names(categories, det["labels"][keep]),
            color="orange",
            scores=det["scores"][keep],
        )
        clean(ax)
        ax.set_title(
            f"{name}: {int(keep.sum())} boxes ≥ {score_thr:g} (GT dashed: {len(gt['boxes'])})",
            fontsize=8,
        )
    if title:
        fig.suptitle(title, fontsize=9)
    return fig

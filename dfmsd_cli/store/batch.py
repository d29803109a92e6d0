"""The typed teacher batch: what the losses read of the teachers, from the store or online.

:class:`TeacherView` is one view of a batch (the drawn ``orig``/``hflip`` view, or the ``me`` /
``adv`` view): per stride ``s`` the teacher maps zero-padded to the student's batch,
``(B, C, ceil(H/s), ceil(W/s))``, the mask of where they exist, the raw attention statistics,
and per image the stored detections and bookkeeping. :class:`TeacherBatch` holds the views a
step uses and, for each extra view, the student's input (the regenerated enhanced or perturbed
images). ``collate_teacher`` builds a view from :meth:`TeacherStore.get` results; the online
path (``dfmsd_cli.distill.online``) builds the same types from a teacher in the loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

MAIN = "main"  # the view the sample drew (orig or hflip), the student's training input


@dataclass
class TeacherView:
    """One view of a teacher batch. Maps are ``{stride: tensor}``; lists have one entry per
    image (empty when the source has none, e.g. online)."""

    features: dict[int, Tensor]  # (B, C, h_s, w_s), zero outside each image's extent
    valid: dict[int, Tensor]  # (B, h_s, w_s) bool: where the teacher map exists
    att_spatial: dict[int, Tensor]  # (B, h_s, w_s) mean_c |F| (raw: no softmax/temperature)
    att_channel: dict[int, Tensor]  # (B, C) mean_{h,w} |F| over the valid positions
    boxes: list[Tensor] = field(default_factory=list)  # (k, 4) xyxy top-K detections
    scores: list[Tensor] = field(default_factory=list)
    labels: list[Tensor] = field(default_factory=list)  # 1..K
    enhance: list[dict | None] = field(default_factory=list)  # the "me" view's ME choice
    index: list[int] = field(default_factory=list)  # store rows
    image_id: list[int] = field(default_factory=list)
    view: list[str] = field(default_factory=list)  # the stored view of each image
    area_ratio: Tensor | None = None  # (B,) candidate-box area ratios
    # (B, A·K, h_s, w_s) class logits, zero-padded like features; {} if the store has none
    logits: dict[int, Tensor] = field(default_factory=dict)

    @property
    def stats(self) -> dict[str, dict[int, Tensor]]:
        """``{"spatial": att_spatial, "channel": att_channel}`` (the losses' argument)."""
        return {"spatial": self.att_spatial, "channel": self.att_channel}

    @property
    def strides(self) -> list[int]:
        return list(self.features)

    def to(self, device: torch.device | str) -> TeacherView:
        """The maps the losses use (features, valid, attention statistics) on ``device``."""

        def move(maps: dict[int, Tensor]) -> dict[int, Tensor]:
            return {s: v.to(device, non_blocking=True) for s, v in maps.items()}

        return replace(
            self,
            features=move(self.features),
            valid=move(self.valid),
            att_spatial=move(self.att_spatial),
            att_channel=move(self.att_channel),
            logits=move(self.logits),
        )


@dataclass
class TeacherBatch:
    """The teacher side of a step: ``views[MAIN]`` and any extra views (``me``, ``adv``) with
    the student's input for each extra view in ``inputs`` ((B, 3, H, W), same padded size)."""

    views: dict[str, TeacherView]
    inputs: dict[str, Tensor] = field(default_factory=dict)

    @property
    def main(self) -> TeacherView:
        return self.views[MAIN]

    def has(self, view: str) -> bool:
        """Whether the batch holds ``view`` (and its input, for an extra view)."""
        return view in self.views and (view == MAIN or view in self.inputs)

    def to(self, device: torch.device | str) -> TeacherBatch:
        return TeacherBatch(
            {k: v.to(device) for k, v in self.views.items()},
            {k: x.to(device, non_blocking=True) for k, x in self.inputs.items()},
        )


def collate_teacher(samples: list[dict], batch_hw: tuple[int, int]) -> TeacherView:
    """Batch ``TeacherStore.get`` results for a student batch of padded size ``batch_hw``.

    For each stride s the maps are zero-padded to ``(ceil(H/s), ceil(W/s))`` — the size of the
    student's FPN map of that batch — and ``valid[s]`` is True where the teacher map exists.
    """
    H, W = batch_hw
    B = len(samples)
    maps: dict[str, dict[int, Tensor]] = {k: {} for k in ("features", "valid", "att_spatial")}
    att_channel, logits = {}, {}
    for s in samples[0]["features"]:
        hs, ws = math.ceil(H / s), math.ceil(W / s)
        c = samples[0]["features"][s].shape[0]
        feat = torch.zeros(B, c, hs, ws)
        att = torch.zeros(B, hs, ws)
        valid = torch.zeros(B, hs, ws, dtype=torch.bool)
        for b, t in enumerate(samples):
            h, w = t["valid"][s]
            if h > hs or w > ws:
                raise ValueError(
                    f"teacher map {h}x{w} at stride {s} is larger than the batch map {hs}x{ws}: "
                    "batch_hw must be the student's padded batch size"
                )
            feat[b, :, :h, :w] = t["features"][s]
            att[b, :h, :w] = t["att_spatial"][s]
            valid[b, :h, :w] = True
        maps["features"][s], maps["att_spatial"][s], maps["valid"][s] = feat, att, valid
        att_channel[s] = torch.stack([t["att_channel"][s] for t in samples])
        if samples[0].get("logits"):
            ak = samples[0]["logits"][s].shape[0]
            lg = torch.zeros(B, ak, hs, ws)
            for b, t in enumerate(samples):
                h, w = t["valid"][s]
                lg[b, :, :h, :w] = t["logits"][s]
            logits[s] = lg
    per_image: dict[str, Any] = {
        f.name: [t[f.name] for t in samples]
        for f in fields(TeacherView)
        if f.name in ("boxes", "scores", "labels", "enhance", "index", "image_id", "view")
    }
    area = torch.tensor([t["area_ratio"] for t in samples], dtype=torch.float32)
    return TeacherView(**maps, att_channel=att_channel, **per_image, area_ratio=area, logits=logits)

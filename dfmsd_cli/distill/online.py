"""``--online``: the same losses with the teachers in the loop instead of the store.

For users without the disk space for a store, and to measure what the store saves. Each stage
builds its teacher (weights from ``--teacher-weights``, else a seeded random init as
``dfmsd precompute`` does) and, per batch, produces the :class:`~dfmsd_cli.store.batch.TeacherBatch`
the store path collates: ``features``, ``valid`` (each image's own padded size, as the store
records it), and the raw attention statistics (no stored detections).

ME online needs two teacher passes, as the store does at precompute time: the weaker (previous)
teacher's detections on the original image give the candidate-box area ratio, which chooses the
enhancement (:func:`dfmsd_cli.data.enhance.choose`, same seeds), and the stage's teacher then runs
on the enhanced image. Differences from the store: the teacher sees the student's batch padding
(the store runs each image at its own padded size), and features are float32 (no float16/uint8
rounding).

Teacher logits (``logits=True``: a term reads them, samkd's SLD): the main view comes from the
teacher's full forward with ``return_logits=True`` — the same pass and layout precompute's
``--store-logits`` stores, ``{stride: (B, A·K, h_s, w_s)}``, zeroed outside each image's extent
like the features — instead of its backbone+FPN alone.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from dfmsd_cli.data.geometry import Geometry, normalize, pad_batch, pad_to
from dfmsd_cli.distill.losses.common import raw_statistics
from dfmsd_cli.store.batch import MAIN, TeacherBatch, TeacherView


def valid_masks(
    image_sizes: list[tuple[int, int]], batch_hw: tuple[int, int], strides, divisor: int
) -> dict[int, Tensor]:
    """``{s: (B, ceil(H/s), ceil(W/s)) bool}``, True on each image's own padded extent."""
    H, W = batch_hw
    out = {}
    for s in strides:
        v = torch.zeros(len(image_sizes), math.ceil(H / s), math.ceil(W / s), dtype=torch.bool)
        for b, (h, w) in enumerate(image_sizes):
            v[b, : math.ceil(pad_to(h, divisor) / s), : math.ceil(pad_to(w, divisor) / s)] = True
        out[s] = v
    return out


def load_online_teacher(name: str, num_classes: int, weights: str | None, seed: int, device):
    """Build a teacher without touching the training RNG stream (its init is seeded)."""
    from dfmsd_cli.models.checkpoint import load_teacher

    with torch.random.fork_rng(devices=[]):
        model = load_teacher(name, num_classes, weights, seed)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device).eval()


class OnlineTeacher:
    """Per-batch teacher outputs for one stage: a ``TeacherBatch`` (the ``main`` view, and with
    ME the ``me`` view and its input), the types the store's ``collate_teacher`` gives."""

    def __init__(
        self,
        teacher: torch.nn.Module,
        levels: list[int],
        geometry: Geometry,
        weaker: torch.nn.Module | None = None,
        enhance: Any = None,  # EnhanceConfig when ME runs
        score_thr: float = 0.3,
        topk: int = 0,
        logits: bool = False,
    ) -> None:
        self.teacher, self.levels, self.geometry = teacher, list(levels), geometry
        self.weaker, self.enhance, self.score_thr = weaker, enhance, score_thr
        # the main view's detections (top-K; 0: none) and class logits (G-DetKD, online_needs)
        self.topk, self.logits = int(topk), bool(logits)

    @property
    def me(self) -> bool:
        return self.weaker is not None and self.enhance is not None

    def _outputs(self, feats: dict[int, Tensor], valid: dict[int, Tensor]) -> TeacherView:
        out = TeacherView({}, {}, {}, {})
        for s in self.levels:
            f = feats[s].float()
            v = valid[s].to(f.device)
            f = f * v[:, None]  # zero outside each image's extent, like the store's padding
            sp, ch = raw_statistics(f, v)
            out.features[s], out.valid[s] = f, v
            out.att_spatial[s], out.att_channel[s] = sp, ch
        return out

    @torch.no_grad()
    def __call__(self, batch: dict, images: Tensor) -> TeacherBatch:
        sizes = [tuple(hw) for hw in batch["image_sizes"]]
        hw = tuple(images.shape[-2:])
        valid = valid_masks(sizes, hw, self.levels, self.geometry.pad_divisor)
        if self.topk or self.logits:
            main = self._full_pass(images, sizes, valid)
        else:
            main = self._outputs(self.teacher.extract_features(images), valid)
        result = TeacherBatch({MAIN: main})
        if self.me:
            result.views["me"], result.inputs["me"] = self._me(batch, images, sizes, valid)
        return result

    def _full_pass(self, images: Tensor, sizes, valid: dict[int, Tensor]) -> TeacherView:
        """The teacher's inference forward: features, the top-K detections of each image and,
        with ``logits``, its class logits (zero outside each image's extent, as collated)."""
        out = self.teacher(images, sizes, return_logits=self.logits)
        view = self._outputs(out.features, valid)
        for det in out.detections:
            det = top_detections(det, self.topk)
            view.boxes.append(det["boxes"])
            view.scores.append(det["scores"])
            view.labels.append(det["labels"])
        if self.logits:
            view.logits = {s: out.logits[s].float() * valid[s][:, None] for s in self.levels}
        return view

    def _me(self, batch: dict, images: Tensor, sizes, valid) -> tuple[TeacherView, Tensor]:
        from dfmsd_cli.data.enhance import apply_enhance, area_ratio, choose

        views = [m["view"] for m in batch["meta"]]
        raws = [
            (r.flip(-1) if v == "hflip" else r)[:, :h, :w]
            for r, v, (h, w) in zip(_unpad_raw(batch["raw"], sizes), views, sizes, strict=True)
        ]
        orig = pad_batch([normalize(r, self.geometry) for r in raws], self.geometry.pad_divisor)
        dets = self.weaker(orig.to(images.device), sizes).detections
        enhanced = []
        for r, d, (h, w), meta in zip(raws, dets, sizes, batch["meta"], strict=True):
            ratio = area_ratio(d["boxes"].cpu(), d["scores"].cpu(), (h, w), self.score_thr)
            params = choose(ratio, meta["image_id"], (h, w), self.enhance)
            enhanced.append(normalize(apply_enhance(r, params), self.geometry))
        me_images = pad_batch(enhanced, self.geometry.pad_divisor).to(images.device)
        feats = self.teacher.extract_features(me_images)
        return self._outputs(feats, valid), me_images


def top_detections(det: dict[str, Tensor], k: int) -> dict[str, Tensor]:
    """An image's ``k`` highest-scoring detections (boxes, scores, labels), in the order and
    dtypes precompute's writer stores them (stable descending sort by score)."""
    order = torch.argsort(det["scores"].float(), descending=True, stable=True)[:k]
    return {
        "boxes": det["boxes"][order].float(),
        "scores": det["scores"][order].float(),
        "labels": det["labels"][order].long(),
    }


ONLINE_TOPK = 100  # precompute's --topk default: the same regions as a default store


def online_needs(cfg) -> dict[str, Any]:
    """What ``cfg``'s enabled terms read of an online teacher besides features: ``topk``
    detections (the method's store needs boxes) and ``logits`` (a term reads class logits)."""
    from dfmsd_cli.distill.methods import stage_terms

    store = cfg.spec.store
    return {
        "topk": ONLINE_TOPK if store is not None and store.boxes else 0,
        "logits": any(t.logits for t in stage_terms(cfg)),
    }


def _unpad_raw(raw: Tensor, sizes) -> list[Tensor]:
    """The padded raw batch back to per-image maps, undoing the view later if needed."""
    return [raw[b, :, : sizes[b][0], : sizes[b][1]] for b in range(raw.shape[0])]


def teacher_logit_layout(name: str, num_classes: int) -> dict | None:
    """The class-logit layout ``{anchors, classes, kind}`` teacher ``name`` gives online (what
    a store's ``logits`` attribute records), None for a head without per-position logits.
    Builds the architecture (no weights) without touching the training RNG stream."""
    from dfmsd_cli.models import build_model

    with torch.random.fork_rng(devices=[]):
        model = build_model(name, num_classes=num_classes)
    anchors = getattr(model, "logit_anchors", None)
    if anchors is None:
        return None
    return {"anchors": int(anchors), "classes": int(model.num_classes), "kind": model.logit_kind}


def stage_online_teacher(
    opts,
    sal: bool,
    plan,
    student,
    num_classes: int,
    geometry: Geometry,
    device,
    warn=print,
    topk: int = 0,
    logits: bool = False,
) -> OnlineTeacher:
    """``--online``: build stage ``plan``'s teacher (and, for ME, the teacher listed before it).

    ``opts.stages`` / ``opts.teacher_weights`` list the teachers; without SAL the single stage
    uses the last one. Teachers are seeded with ``opts.seed`` like ``dfmsd precompute``.
    ``topk``/``logits``: what the method reads besides features (:func:`online_needs`).
    """
    from dfmsd_cli.data.enhance import EnhanceConfig
    from dfmsd_cli.distill.losses.common import match_levels
    from dfmsd_cli.errors import UserError

    names = list(opts.stages)
    weights = list(opts.teacher_weights) + [None] * (len(names) - len(opts.teacher_weights))
    k = plan.index if sal else len(names) - 1  # position in --stages
    teacher = load_online_teacher(plan.teacher, num_classes, weights[k], opts.seed, device)
    levels = match_levels(student.strides, teacher.strides)
    if not levels:
        raise UserError(
            f"teacher {plan.teacher} has levels {list(teacher.strides)} and the student "
            f"{list(student.strides)}: no shared stride; pick teachers with the student's strides"
        )
    weaker = None
    if plan.me and k > 0:
        weaker = load_online_teacher(names[k - 1], num_classes, weights[k - 1], opts.seed, device)
    elif plan.me:
        warn(f"note: --online ME needs a weaker teacher listed before {plan.teacher}: no L_ME")
    enhance = EnhanceConfig() if weaker is not None else None
    return OnlineTeacher(teacher, levels, geometry, weaker, enhance, topk=topk, logits=logits)

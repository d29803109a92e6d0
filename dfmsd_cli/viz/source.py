"""Where the figures' inputs come from: a store image with its pixels, or a live teacher pass.

A *record* is one image seen by one teacher in one view, in the layout of
:meth:`dfmsd_cli.store.reader.TeacherStore.get` (``features``, ``valid``, ``att_spatial``,
``att_channel``, ``boxes``/``scores``/``labels``, ``size``, ``pad_size``, ``area_ratio``,
``enhance``). ``live_record`` builds the same from a model, so the demo can draw a validation
image that no store holds with the very same figure code.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from dfmsd_cli.errors import UserError


def dataset_for(data: str | Path, split: str, geometry, views=("orig",)):
    """``CocoDetection`` of ``ROOT/annotations/instances_{split}.json`` in eval mode, raw kept."""
    from dfmsd_cli.data.coco import CocoDetection
    from dfmsd_cli.data.loader import resolve_data

    ann, images = resolve_data(data, split)
    ds = CocoDetection(ann, images, geometry=geometry, views=views, train=False, probe=False)
    ds.keep_raw = True
    return ds


def load_sample(ds, image_id: int) -> dict:
    """The ``orig`` sample of ``image_id`` (raw pixels kept); one-line errors."""
    try:
        i = ds.image_ids.index(int(image_id))
    except ValueError:
        raise UserError(
            f"image id {image_id} is not in {ds.ann_file}: pass --data/--split of the same dataset"
        ) from None
    sample = ds.get(i, "orig")
    if sample is None:
        raise UserError(f"image {image_id} ({ds.image_path(i)}) is unreadable: fix the file")
    return sample


def view_input(sample: dict, view: str, record: dict) -> tuple[torch.Tensor, str]:
    """The (3, h, w) [0, 255] input the teacher saw in ``view`` and a note about it.

    ``orig``/``hflip`` are exact; ``me`` is regenerated from the stored parameters (the note
    says whether its checksum matches); any other view is not reproducible here and the
    original image is shown instead (the note says so).
    """
    raw = sample["raw"]
    if view == "orig":
        return raw, ""
    if view == "hflip":
        return raw.flip(-1), ""
    if view == "me" and record.get("enhance"):
        from dfmsd_cli.data.enhance import EnhanceParams, apply_enhance, input_checksum

        p = EnhanceParams.from_dict(record["enhance"])
        x = apply_enhance(raw, p)
        same = p.checksum is None or input_checksum(x) == int(p.checksum)
        return x, "" if same else " (regenerated input differs from precompute's)"
    return raw, f" (view '{view}' input not reproducible here: original image shown)"


def enhance_caption(record: dict) -> str:
    """``noise σ=10`` / ``crop (x1,y1,x2,y2)`` / ``none``, with the weaker teacher's area ratio."""
    e = record.get("enhance") or {}
    kind = e.get("kind", "none")
    if kind == "noise":
        what = f"noise σ={e['sigma']:g}"
    elif kind == "crop":
        what = "crop " + ",".join(str(int(v)) for v in e["crop_box"])
    else:
        what = "no enhancement"
    ratio = record.get("area_ratio")
    if ratio is not None and math.isfinite(float(ratio)):
        what += f"; weaker teacher's area ratio {float(ratio):.3f}"
    return what


@torch.no_grad()
def live_record(model: torch.nn.Module, sample: dict, geometry, topk: int = 20) -> dict[str, Any]:
    """A store-like record of ``model`` on one dataset ``sample`` (its own padded size)."""
    from dfmsd_cli.data.geometry import pad_batch
    from dfmsd_cli.distill.losses.common import raw_statistics

    x = pad_batch([sample["image"]], geometry.pad_divisor)
    was = model.training
    model.eval()
    out = model(x, [tuple(sample["size"])])
    model.train(was)
    H, W = (int(v) for v in x.shape[-2:])
    feats, valid, att_s, att_c = {}, {}, {}, {}
    for s, f in out.features.items():
        f = f.float()
        v = torch.ones(1, *f.shape[-2:], dtype=torch.bool)
        sp, ch = raw_statistics(f, v)
        feats[s], valid[s] = f[0], tuple(f.shape[-2:])
        att_s[s], att_c[s] = sp[0], ch[0]
    det = out.detections[0]
    order = det["scores"].argsort(descending=True)[:topk]
    return {
        "index": int(sample["index"]),
        "image_id": int(sample["image_id"]),
        "view": sample["view"],
        "size": tuple(sample["size"]),
        "pad_size": (H, W),
        "features": feats,
        "valid": valid,
        "att_spatial": att_s,
        "att_channel": att_c,
        "boxes": det["boxes"][order].float(),
        "scores": det["scores"][order].float(),
        "labels": det["labels"][order],
        "area_ratio": float("nan"),
        "enhance": None,
    }


@torch.no_grad()
def student_features(
    model: torch.nn.Module, raw: torch.Tensor, geometry
) -> dict[int, torch.Tensor]:
    """``{stride: (C, rows, cols)}`` FPN features of ``model`` on one (3, h, w) [0, 255] input,
    normalised and padded to its own padded size (the store's input)."""
    from dfmsd_cli.data.geometry import normalize, pad_batch

    x = pad_batch([normalize(raw.float(), geometry)], geometry.pad_divisor)
    model.eval()
    return {s: f[0].float() for s, f in model.extract_features(x).items()}

"""One teacher pass over planned batches of images: the part of ``precompute`` that runs the
teacher (and the part ``bench precompute`` times alone).

``batch_plan`` fixes the batches per block (one padded shape per batch, so every feature map is
exactly the map of the image alone); ``BatchLoad`` decodes a planned batch in a DataLoader
worker; ``run_batch`` runs the teacher once over every (image, view) of a batch and returns one
``ImageResult`` per image for the store writer.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from dfmsd_cli.data.adversarial import AdvConfig
from dfmsd_cli.data.coco import CocoDetection
from dfmsd_cli.data.enhance import EnhanceConfig, apply_enhance, choose, input_checksum
from dfmsd_cli.data.geometry import Geometry, apply_view_image, normalize, pad_batch
from dfmsd_cli.store.quantize import FLOAT16_MAX, check_finite_range
from dfmsd_cli.store.statistics import teacher_statistics
from dfmsd_cli.store.writer import ImageResult, ViewResult


class PassOptions(Protocol):
    """What a teacher pass reads of ``PrecomputeOptions`` (precompute imports this module)."""

    geometry: Geometry
    enhance: EnhanceConfig
    store_logits: bool
    adv: AdvConfig | None
    dtype: str
    pca: int | None


def batch_plan(
    sizes: list[tuple[int, int]], start: int, stop: int, block: int, batch_size: int
) -> list[list[int]]:
    """Batches of indices in [start, stop): per block, grouped by padded (H, W), index order.

    ``sizes[i]`` is image i's padded size; ``start`` must be block-aligned. The plan of a block
    is the same whoever processes it (shard, resume), so results are reproducible.
    """
    plan: list[list[int]] = []
    for b0 in range(start, stop, block):
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i in range(b0, min(b0 + block, stop)):
            groups[sizes[i]].append(i)
        for shape in sorted(groups):
            idx = groups[shape]
            plan += [idx[k : k + batch_size] for k in range(0, len(idx), batch_size)]
    return plan


class BatchLoad(Dataset):
    """Item j = the samples of planned batch j (decoded in DataLoader workers)."""

    def __init__(self, ds: CocoDetection, batches: list[list[int]]):
        self.ds, self.batches = ds, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, j: int) -> list[tuple[int, dict | None]]:
        return [(i, self.ds.get(i, "orig")) for i in self.batches[j]]


def identity_collate(x: Any) -> Any:
    return x


def view_inputs(
    sample: dict, views: list[str], geometry: Geometry, me: dict | None, adv: dict | None = None
) -> list[torch.Tensor]:
    """Normalised (3, h, w) input of each view; ``me`` = {"params": EnhanceParams} and ``adv`` =
    {"delta": int8} get their input checksums filled in."""
    out = []
    for v in views:
        if v == "orig":
            out.append(sample["image"])
        elif v == "hflip":
            out.append(apply_view_image(sample["image"], "hflip"))
        elif v == "adv":
            from dfmsd_cli.data.adversarial import replay

            x = replay(sample["raw"], adv["delta"])
            adv["checksum"] = input_checksum(x)
            out.append(normalize(x, geometry))
        else:
            x = apply_enhance(sample["raw"], me["params"])
            me["checksum"] = input_checksum(x)
            out.append(normalize(x, geometry))
    return out


def logit_attrs(model: torch.nn.Module) -> dict:
    """The store's ``logits`` attribute: encoding and head layout (what SLD matches)."""
    return {
        "dtype": "float16",
        "anchors": int(model.logit_anchors),
        "classes": int(model.num_classes),
        "kind": model.logit_kind,
    }


@torch.inference_mode()
def run_batch(
    model: torch.nn.Module,
    items: list[tuple[int, dict]],
    views: list[str],
    o: PassOptions,
    device: torch.device,
    ratios: np.ndarray | None,
    strides: list[int],
    advs: list[dict] | None = None,
) -> list[ImageResult]:
    """One teacher pass over every (image, view) of a same-padded-shape batch."""
    inputs, sizes, me = [], [], []
    for k, (i, s) in enumerate(items):
        params = None
        if "me" in views:
            params = {"params": choose(float(ratios[i]), s["image_id"], s["size"], o.enhance)}
        me.append(params)
        inputs += view_inputs(s, views, o.geometry, params, advs[k] if advs else None)
        sizes += [tuple(s["size"])] * len(views)
    x = pad_batch(inputs, o.geometry.pad_divisor).to(device)
    out = model(x, sizes, return_logits=o.store_logits)
    H, W = x.shape[-2:]
    feats, stats = _features_and_statistics(out.features, strides, items, views, o)
    results = []
    for k, (i, s) in enumerate(items):
        vr = {}
        for j, v in enumerate(views):
            b = k * len(views) + j
            det = out.detections[b]
            vr[v] = ViewResult(
                features={st: feats[st][b] for st in strides},
                statistics={st: (stats[st][0][b], stats[st][1][b]) for st in strides},
                boxes=det["boxes"].float().cpu(),
                scores=det["scores"].float().cpu(),
                labels=det["labels"].cpu(),
                logits={st: out.logits[st][b].float().cpu() for st in strides}
                if o.store_logits
                else None,
            )
        enh = None
        if me[k] is not None:
            enh = {"params": me[k]["params"].to_array(), "checksum": me[k]["checksum"]}
        own = (
            math.ceil(s["size"][0] / o.geometry.pad_divisor) * o.geometry.pad_divisor,
            math.ceil(s["size"][1] / o.geometry.pad_divisor) * o.geometry.pad_divisor,
        )
        if own != (int(H), int(W)):  # the plan groups by padded shape; never store inexact maps
            raise RuntimeError(f"image {i} padded to {own} ran in a {H}x{W} batch")
        adv = advs[k] if advs else None
        results.append(ImageResult(i, tuple(s["size"]), own, vr, enh, adv))
    return results


def _features_and_statistics(
    features: dict[int, torch.Tensor],
    strides: list[int],
    items: list[tuple[int, dict]],
    views: list[str],
    o: PassOptions,
) -> tuple[dict[int, torch.Tensor], dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """CPU copies of the teacher's maps and their attention statistics, computed on the
    teacher's device for the whole batch (one ``|F|`` pass; on a GPU the writer threads are
    left only compression and files). A float16 store without ``--pca`` gets its maps
    range-checked and cast there too (half the bytes to copy; the rounding of a float32 →
    float16 cast is IEEE round-to-nearest-even on every device); other encodings get float32."""
    half = o.dtype == "float16" and not o.pca
    feats, stats = {}, {}
    for s in strides:
        f = features[s]
        spatial, channel, peak = teacher_statistics(f)
        stats[s] = (spatial.cpu(), channel.cpu())
        if not half:
            feats[s] = f.float().cpu()
            continue
        for b in torch.nonzero(~(peak <= FLOAT16_MAX)).flatten().tolist():  # NaN fails <= too
            i, v = items[b // len(views)][0], views[b % len(views)]  # row b = (image, view)
            check_finite_range(f[b], f"image {i} view {v} stride {s}")  # raises, naming the fix
        feats[s] = f.to(torch.float16).cpu()
    return feats, stats


def adversarial_deltas(
    model: torch.nn.Module, items: list[tuple[int, dict]], o: PassOptions, device
) -> list[dict]:
    """Each image's perturbation δ against the teacher's loss on its ground truth (one image
    at a time, its own size: ``dfmsd_cli.data.adversarial.attack``)."""
    from dfmsd_cli.data.adversarial import attack

    out = []
    for _i, s in items:
        target = {"boxes": s["boxes"].to(device), "labels": s["labels"].to(device)}
        raw = s["raw"].to(device)
        out.append({"delta": attack(model, raw, target, o.geometry, o.adv, s["image_id"])})
    return out

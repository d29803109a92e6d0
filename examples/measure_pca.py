"""Measure ``precompute --pca K``: bytes/image and feature error per K (docs/store.md).

Runs the teacher once per image (batch 1, its own padded size, view orig), fits the per-level
basis on the first FIT images exactly as precompute does (``store/pca.py``), then for each K
encodes the components as the store does (float16, blosc-zstd3 + shuffle + crc32c, one image
per chunk on the landscape canvas, plus the float32 ``att_s`` map) and reports bytes/image,
the energy kept on the fit images and on the held-out ones, and the relative RMSE of the
float32 maps read back (x̂ = μ + Wᵀ float16(z)) against the teacher's float32 features.

Usage: PYTHONPATH=. python examples/measure_pca.py TEACHER WEIGHTS|- ANN IMAGES N FIT W,H K1,K2,..
       [DTYPES, default float16; e.g. float16,bfloat16,uint8]
e.g.   ... retina_r50 - ../shared/data/coco2017-subset/annotations/instances_val2017.json \
           ../shared/data/coco2017-subset/val2017 24 8 640,512 32,64,128
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec
from zarr.storage import MemoryStore

from dfmsd_cli.data.coco import CocoDetection
from dfmsd_cli.data.geometry import Geometry
from dfmsd_cli.models.checkpoint import load_teacher
from dfmsd_cli.store.chunks import RowCodec
from dfmsd_cli.store.create import feature_codec, storage_dtype
from dfmsd_cli.store.pca import PcaAccumulator, project, reconstruct, split_basis
from dfmsd_cli.store.precompute import PrecomputeOptions
from dfmsd_cli.store.quantize import (
    dequantize_uint8,
    from_bfloat16,
    quantize_uint8,
    to_bfloat16,
    to_float16,
)
from dfmsd_cli.store.schema import level_shape, place_on_canvas
from dfmsd_cli.store.statistics import raw_statistics
from dfmsd_cli.store.teacher_pass import run_batch


def stored_bytes(x: np.ndarray, dtype: str) -> int:
    """Bytes of one store chunk holding ``x`` (the store's codecs, crc32c included)."""
    a = zarr.create_array(
        store=MemoryStore(), shape=(1, *x.shape), chunks=(1, *x.shape), dtype=dtype,
        compressors=[feature_codec("blosc", dtype), Crc32cCodec()], fill_value=0,
    )  # fmt: skip
    return len(RowCodec.of(a).encode_chunk(x[None]))


def main() -> None:
    teacher, weights, ann, images, n, fit, scale, ks = sys.argv[1:9]
    dtypes = sys.argv[9].split(",") if len(sys.argv) > 9 else ["float16"]
    n, fit = int(n), int(fit)
    ks = [int(k) for k in ks.split(",")]
    w, h = (int(v) for v in scale.split(","))
    geom = Geometry(img_scale=(w, h))
    ds = CocoDetection(ann, images, geometry=geom, train=False, max_images=n)
    model = load_teacher(teacher, ds.num_classes, None if weights == "-" else weights, 0).eval()
    o = PrecomputeOptions(teacher=teacher, geometry=geom, device="cpu")
    strides = list(model.strides)
    div = geom.pad_divisor  # the store's landscape canvas (store/create.py)
    canvas = tuple(-(-v // div) * div for v in geom.img_scale)
    cached = Path(f"/tmp/measure_pca_{teacher}_{n}_{w}x{h}.pt")  # the teacher runs once
    if cached.is_file():
        feats = torch.load(cached, weights_only=True)
    else:
        feats = []
        for i in range(len(ds.image_ids)):
            (r,) = run_batch(model, [(i, ds.get(i, "orig"))], ["orig"], o, "cpu", None, strides)
            feats.append((r.pad_size, r.views["orig"].features))
            print(f"image {i}", file=sys.stderr, flush=True)
        torch.save(feats, cached)
    acc = PcaAccumulator()
    for _, f in feats[:fit]:
        acc.add(f)
    out = {"teacher": teacher, "images": len(feats), "fit": fit, "scale": [w, h], "K": {}}

    def encode(kind: str, k: int | None, dtype: str = "float16") -> dict:
        bases = acc.fit(k)[0] if k else None
        nbytes, att = [], []
        err, tot = {"fit": 0.0, "held": 0.0}, {"fit": 0.0, "held": 0.0}
        for j, (pad, f) in enumerate(feats):
            b, ab, part = 0, 0, "fit" if j < fit else "held"
            for s in strides:
                hc, wc = level_shape(canvas, s)
                x = f[s]
                mu, wt = split_basis(bases[s]) if k else (None, None)
                z = project(x, mu, wt) if k else x
                if dtype == "float16":
                    q = to_float16(z)
                    back = torch.from_numpy(q.astype(np.float32))
                elif dtype == "bfloat16":
                    q = to_bfloat16(z)
                    back = from_bfloat16(q)
                else:
                    q, params = quantize_uint8(z)
                    back = dequantize_uint8(q, params)
                b += stored_bytes(place_on_canvas(q, hc, wc, pad[0] > pad[1]), storage_dtype(dtype))
                sp = raw_statistics(x[None])[0][0].numpy()
                a_b = stored_bytes(place_on_canvas(sp, hc, wc, pad[0] > pad[1]), "float32")
                b, ab = b + a_b, ab + a_b
                back = reconstruct(back, mu, wt) if k else back
                err[part] += float((back.double() - x.double()).pow(2).sum())
                tot[part] += float(x.double().pow(2).sum())
            nbytes.append(b)
            att.append(ab)
        res = {
            "bytes_per_image": float(np.mean(nbytes)),
            "feature_bytes_per_image": float(np.mean(nbytes)) - float(np.mean(att)),
            "rel_rmse_fit": (err["fit"] / tot["fit"]) ** 0.5,
            "rel_rmse_held_out": (err["held"] / tot["held"]) ** 0.5 if tot["held"] else None,
        }
        if k:
            rep = acc.fit(k)[1]
            res["energy_kept_fit"] = {s: round(v["energy_kept"], 5) for s, v in rep.items()}
            res["variance_kept_fit"] = {s: round(v["variance_kept"], 5) for s, v in rep.items()}
        print(kind, json.dumps(res), file=sys.stderr, flush=True)
        return res

    base = encode("float16", None)
    out["K"]["full"] = base
    for dtype in dtypes:
        full = base if dtype == "float16" else encode(f"{dtype}", None, dtype)
        out["K"][f"full-{dtype}"] = full
        for k in ks:
            r = encode(f"pca{k}-{dtype}", k, dtype)
            r["bytes_vs_float16"] = r["bytes_per_image"] / base["bytes_per_image"]
            # stored/raw of the components alone: what precompute --dry-run projects with
            raw = sum(k * (1 if dtype == "uint8" else 2) * np.prod(f[s].shape[-2:])
                      for _, f in feats for s in strides) / len(feats)  # fmt: skip
            r["component_stored_over_raw"] = r["feature_bytes_per_image"] / float(raw)
            out["K"][f"{k}-{dtype}"] = r
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

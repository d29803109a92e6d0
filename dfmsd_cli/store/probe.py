"""``precompute --dry-run``'s probe: the store's encodings measured on *this* teacher.

The dry run's size projection multiplies the images' raw bytes by a stored/raw ratio, and its
table of smaller encodings lists each one's feature error; both are constants measured on a
random-init retina_r50 (``store.projection.EXPECTED_RATIO``, ``store.space.SMALLER``). A trained
teacher compresses differently and, above all, keeps a different share of its energy in K
principal components — the number that decides whether ``--pca`` is safe (docs/store.md).
:func:`probe_encodings` runs the teacher on a few images of the split (each at its own padded
size, view ``orig``, the stored levels) and, for each candidate encoding, encodes every map as
the store would (the encoding, then the store's compressor on the landscape canvas):

    stored/raw      = Σ compressed chunk bytes / Σ C'·h·w·itemsize   (C' = C, or K with --pca)
    relative RMSE   = sqrt(Σ ‖x̂ − x‖² / Σ ‖x‖²)      over every probed map (x̂ = decoded map)
    energy kept     = 1 − Σ ‖x − x̂_K‖² / Σ ‖x‖²        (--pca K, per level, before rounding)

``--pca`` candidates fit their basis (``store.pca.PcaAccumulator``) on the first half of the
probe images and are measured on the other half, so their error is held out (precompute fits
on ``pca.FIT_IMAGES``; with one probe image, fit and measurement share it). The probe size
(``PROBE_IMAGES``) and the half/half split are our choice (docs/store.md, "Will it fit?").
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import zarr
from zarr.abc.codec import ArrayBytesCodec

from dfmsd_cli.data.geometry import apply_view_image, pad_batch
from dfmsd_cli.errors import UserError
from dfmsd_cli.store import pca as pca_mod
from dfmsd_cli.store.chunks import RowCodec
from dfmsd_cli.store.create import feature_codec, storage_dtype
from dfmsd_cli.store.quantize import (
    FLOAT_ENCODERS,
    dequantize_uint8,
    from_bfloat16,
    quantize_uint8,
)
from dfmsd_cli.store.schema import level_shape, place_on_canvas

if TYPE_CHECKING:
    from dfmsd_cli.data.coco import CocoDetection

PROBE_IMAGES = 8  # our choice: the dry run's default (--probe-images)


def own_input(ds: CocoDetection, i: int, view: str = "orig") -> tuple[torch.Tensor, tuple] | None:
    """Image ``i`` of ``ds`` in ``view``, padded to its own padded size: ((1,3,H,W), (h, w));
    None when the image cannot be read (an evaluation-mode dataset skips it)."""
    s = ds.get(i, "orig")
    if s is None:
        return None
    img = apply_view_image(s["image"], view)
    return pad_batch([img], ds.geometry.pad_divisor), tuple(s["size"])


@dataclass(frozen=True)
class Candidate:
    """One store encoding to measure (the fields of ``precompute``'s options)."""

    flags: str
    dtype: str
    keepbits: int | None = None
    codec: str = "blosc"
    pca: int | None = None


@dataclass
class _Tally:
    stored: float = 0.0
    raw: float = 0.0
    err: float = 0.0
    ref: float = 0.0
    pca_err: dict[int, float] = field(default_factory=dict)
    pca_ref: dict[int, float] = field(default_factory=dict)
    error: str | None = None


def _compressor(codec: str, dtype: str) -> Any:
    """The numcodecs compressor the store's ``feat`` arrays use for (codec, dtype): read off a
    throwaway in-memory array built with the store's own codec (``create.feature_codec``)."""
    comp = feature_codec(codec, dtype)
    chain = (
        {"serializer": comp, "compressors": None}
        if isinstance(comp, ArrayBytesCodec)
        else {"compressors": [comp]}
    )
    a = zarr.create_array(
        zarr.storage.MemoryStore(), shape=(1, 1, 1, 1), chunks=(1, 1, 1, 1),
        dtype=storage_dtype(dtype), fill_value=0, **chain,
    )  # fmt: skip
    return RowCodec.of(a).compressor


def _encode(x: torch.Tensor, c: Candidate) -> tuple[np.ndarray, torch.Tensor, int]:
    """(stored array, its decoded float32 map, side bytes) of a (C, h, w) float32 map."""
    if c.dtype == "uint8":
        q, p = quantize_uint8(x, "a probe image")
        return q, dequantize_uint8(q, p), p.nbytes
    stored = FLOAT_ENCODERS[c.dtype](x, "a probe image", keepbits=c.keepbits)
    back = from_bfloat16(stored) if c.dtype == "bfloat16" else torch.from_numpy(stored).float()
    return stored, back, 0


def _measure(
    t: _Tally, c: Candidate, comp: Any, s: int, x: torch.Tensor, canvas, transposed: bool, basis
) -> None:
    """Add one map ``x`` (C, h, w float32) of level ``s`` encoded as ``c`` to ``t`` (a portrait
    image's maps are stored ``transposed`` on the landscape canvas, as the writer does)."""
    target = x.double()
    energy = float(target.pow(2).sum())
    if c.pca:
        mu, w = basis[s]
        x = pca_mod.project(x, mu, w)
        residual = float((pca_mod.reconstruct(x, mu, w).double() - target).pow(2).sum())
        t.pca_err[s] = t.pca_err.get(s, 0.0) + residual
        t.pca_ref[s] = t.pca_ref.get(s, 0.0) + energy
    stored, back, side = _encode(x, c)
    if c.pca:
        back = pca_mod.reconstruct(back, mu, w)
    hc, wc = level_shape(canvas, s)
    chunk = np.ascontiguousarray(place_on_canvas(stored, hc, wc, transposed))[None]
    t.stored += len(bytes(comp.encode(chunk))) + side
    t.raw += stored.size * stored.itemsize
    t.err += float((back.double() - target).pow(2).sum())
    t.ref += energy


@torch.inference_mode()
def probe_encodings(
    model: torch.nn.Module,
    ds: CocoDetection,
    indices: list[int],
    strides: list[int],
    candidates: list[Candidate],
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Measure ``candidates`` on the teacher's features of images ``indices`` (module
    docstring): ``{images, fit_images, seconds, encodings: [{flags, dtype, keepbits, codec,
    pca, stored_raw, relative_rmse, energy_kept: {stride: e} | None, energy_kept_fit, error}]}``
    (``energy_kept_fit``: in-sample, on the fit images — optimistic where the held-out
    ``energy_kept`` of a basis fitted on few images is pessimistic); figures are
    None when no image could be read. ``held_out_images`` = 0 with ``--pca`` candidates: their
    error was measured on a fit image (in-sample).

    A candidate the teacher's values cannot be stored in (float16 beyond ±65504) gets
    ``error`` (the one-line message) instead of figures."""
    if not indices:
        raise UserError("--probe-images: the range has no image to probe")
    canvas = ds.geometry.canvas()
    ks = sorted({c.pca for c in candidates if c.pca})
    n_fit = max(1, len(indices) // 2) if ks else 0
    tallies = {c: _Tally() for c in candidates}
    comps = {(c.codec, c.dtype): _compressor(c.codec, c.dtype) for c in candidates}
    acc, bases, fit_report = pca_mod.PcaAccumulator(), {}, {}
    probed = fitted = held_out = 0
    last: dict[int, torch.Tensor] = {}

    def measure(maps: dict[int, torch.Tensor], transposed: bool, pca: bool) -> None:
        for c, t in tallies.items():
            if t.error or bool(c.pca) != pca:
                continue
            try:
                for s, f in maps.items():
                    basis = bases[c.pca] if c.pca else None
                    comp = comps[(c.codec, c.dtype)]
                    _measure(t, c, comp, s, f, canvas, transposed, basis)
            except UserError as e:  # e.g. float16's range: said, not raised
                t.error = str(e)

    t0 = time.perf_counter()
    for i in indices:  # the first n_fit readable images fit the --pca bases, the rest test them
        inp = own_input(ds, i)
        if inp is None:  # unreadable (the dataset logged it): the next one
            continue
        feats = model(inp[0].to(device), [inp[1]]).features
        last = {s: feats[s][0].float().cpu() for s in strides}
        tr = inp[0].shape[-2] > inp[0].shape[-1]  # portrait: the writer's transposed flag
        probed += 1
        measure(last, tr, pca=False)
        if fitted < n_fit:
            acc.add(last)
            fitted += 1
            continue
        if ks and not bases:
            bases, fit_report = _fit(acc, ks)
        if ks:
            measure(last, tr, pca=True)
            held_out += 1
    if ks and acc.n and not held_out:  # every probed image fitted: measured in-sample
        bases, fit_report = _fit(acc, ks)
        measure(last, tr, pca=True)
    rows = []
    for c, t in tallies.items():
        row: dict[str, Any] = {
            "flags": c.flags, "dtype": c.dtype, "keepbits": c.keepbits, "codec": c.codec,
            "pca": c.pca, "stored_raw": None, "relative_rmse": None, "energy_kept": None,
            "error": t.error,
        }  # fmt: skip
        if not t.error and t.raw:
            row["stored_raw"] = t.stored / t.raw
            row["relative_rmse"] = math.sqrt(t.err / t.ref) if t.ref > 0 else 0.0
            if c.pca:
                row["energy_kept"] = {
                    str(s): 1 - t.pca_err[s] / t.pca_ref[s] if t.pca_ref[s] > 0 else 1.0
                    for s in sorted(t.pca_err)
                }
                row["energy_kept_fit"] = fit_report[c.pca]  # in-sample, on the fit images
        rows.append(row)
    return {
        "images": probed,
        "fit_images": fitted,
        "held_out_images": held_out,
        "seconds": time.perf_counter() - t0,
        "encodings": rows,
    }


def _fit(acc: pca_mod.PcaAccumulator, ks: list[int]) -> tuple[dict, dict]:
    """Per K: ({stride: (μ, W)}, {stride: energy kept on the fit images})."""
    bases, report = {}, {}
    for k in ks:
        basis, rep = acc.fit(k)
        bases[k] = {s: pca_mod.split_basis(b) for s, b in basis.items()}
        report[k] = {s: e["energy_kept"] for s, e in rep.items()}
    return bases, report

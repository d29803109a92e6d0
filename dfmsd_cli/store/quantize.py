"""Store quantisation: float16 with a range check, bfloat16, uint8 per-image per-channel affine,
and optional mantissa bit rounding (``keepbits``) of the float encodings.

bfloat16: the upper 16 bits of float32 (round to nearest even), stored as uint16 (zarr has no
bfloat16 dtype): float32's range, so a teacher whose features exceed float16's ±65504 needs no
uint8; 8 significant bits (relative error ≤ 2^-9).

keepbits (numcodecs ``BitRound``, Klöwer et al. 2021): keep k mantissa bits (float16 has 10,
bfloat16 7), rounding to nearest; the zeroed low bits compress away under zstd/blosc. The
stored values are plain float16/bfloat16, so a reader needs no codec to decode them.

float16 (default): values are cast; |x| > 65504 (float16 max) or a non-finite value raises
``FeatureRangeError`` instead of silently writing inf (FPN outputs of real detectors stay far
below it, but a diverged teacher does not).

uint8: for one image and channel c, over the valid positions,
``lo_c = min x``, ``scale_c = (max x - lo_c) / 255`` and ``q = round((x - lo_c) / scale_c)``;
decoding is ``x ≈ q * scale_c + lo_c`` with error ≤ scale_c / 2 (RMSE ≈ scale_c / sqrt(12) for a
uniform residual). A per-channel scale avoids the 4 % error of one global scale measured in
``notes/feature-store.md``; a per-image scale follows each image's activation range.
A constant channel gets scale 0 and decodes exactly to lo_c.
"""

from __future__ import annotations

import numpy as np
import torch
from numcodecs import BitRound

from dfmsd_cli.errors import UserError

FLOAT16_MAX = 65504.0


class FeatureRangeError(UserError):
    """Teacher features cannot be stored in the requested dtype (overflow or NaN/inf)."""


def check_finite_range(x: torch.Tensor, what: str, limit: float | None = FLOAT16_MAX) -> None:
    """Raise FeatureRangeError if ``x`` holds NaN/inf or, with ``limit``, values beyond ±limit."""
    if not torch.isfinite(x).all():
        raise FeatureRangeError(
            f"teacher features of {what} contain NaN or inf: check the teacher weights "
            "(dfmsd eval) before precomputing"
        )
    if limit is not None and x.numel():
        peak = float(x.abs().max())
        if peak > limit:
            raise FeatureRangeError(
                f"teacher features of {what} reach |x| = {peak:.4g}, beyond float16's {limit:g}: "
                "use --dtype bfloat16 (float32's range) or --dtype uint8 (per-channel affine "
                "scales) for this teacher"
            )


FLOAT_DTYPES = {"float16": 10, "bfloat16": 7, "float32": 23}  # mantissa bits of each float encoding


def check_keepbits(dtype: str, keepbits: int | None) -> None:
    if keepbits is None:
        return
    if dtype not in FLOAT_DTYPES:
        raise UserError(f"--keepbits applies to float16, bfloat16 or float32, not --dtype {dtype}")
    if not 0 < keepbits <= FLOAT_DTYPES[dtype]:
        raise UserError(
            f"--keepbits {keepbits}: {dtype} has {FLOAT_DTYPES[dtype]} mantissa bits; use "
            f"1..{FLOAT_DTYPES[dtype]}"
        )


def to_float16(x: torch.Tensor, what: str = "an image", keepbits: int | None = None) -> np.ndarray:
    """Cast a float32 map to float16 after the range check (never writes inf); ``keepbits``
    then rounds the mantissa (numcodecs BitRound). A float16 map (cast by the teacher pass
    after its own range check) is only checked for inf/NaN — every exponent bit set — with one
    integer pass (torch's ``isfinite`` on CPU float16 took 15× longer, measured)."""
    if x.dtype == torch.float16:
        out = x.cpu().numpy()
        if ((out.view(np.uint16) & 0x7C00) == 0x7C00).any():
            check_finite_range(x.float(), what)  # raises, naming the fix
    else:
        check_finite_range(x, what)
        out = x.to(torch.float16).cpu().numpy()
    if keepbits is not None and keepbits < FLOAT_DTYPES["float16"]:
        out = np.asarray(BitRound(keepbits).encode(out)).view(np.float16)
    return out


def to_float32(x: torch.Tensor, what: str = "an image", keepbits: int | None = None) -> np.ndarray:
    """The float32 map itself (finiteness checked; lossless); ``keepbits`` rounds the mantissa
    to k of its 23 bits (numcodecs BitRound)."""
    check_finite_range(x, what, limit=None)
    out = np.ascontiguousarray(x.float().cpu().numpy())
    if keepbits is not None and keepbits < FLOAT_DTYPES["float32"]:
        out = np.asarray(BitRound(keepbits).encode(out)).view(np.float32)
    return out


def to_bfloat16(x: torch.Tensor, what: str = "an image", keepbits: int | None = None) -> np.ndarray:
    """bfloat16 bits of a float32 map as uint16 (finiteness checked; no range limit).

    With ``keepbits`` the float32 mantissa is first bit-rounded to k bits (k ≤ 7), so the
    conversion to bfloat16 is then exact.
    """
    check_finite_range(x, what, limit=None)
    x = x.float().cpu()
    if keepbits is not None and keepbits < FLOAT_DTYPES["bfloat16"]:
        x = torch.from_numpy(np.asarray(BitRound(keepbits).encode(x.numpy())).view(np.float32))
    return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def from_bfloat16(u: np.ndarray | torch.Tensor) -> torch.Tensor:
    """float32 values of bfloat16 bits stored as uint16."""
    u = np.ascontiguousarray(u)
    return torch.from_numpy(u.view(np.int16)).view(torch.bfloat16).float()


# The float encodings by --dtype: (map, what, keepbits) -> the stored array (uint8 is affine)
FLOAT_ENCODERS = {"float16": to_float16, "bfloat16": to_bfloat16, "float32": to_float32}


def quantize_uint8(x: torch.Tensor, what: str = "an image") -> tuple[np.ndarray, np.ndarray]:
    """Per-channel affine uint8 of a (C, h, w) map: returns (q uint8 (C,h,w), params (C,2)).

    ``params[:, 0]`` is the scale, ``params[:, 1]`` the offset (channel minimum), float32.
    """
    check_finite_range(x, what, limit=None)
    x = x.float()
    flat = x.reshape(x.shape[0], -1)
    lo = flat.min(dim=1).values
    hi = flat.max(dim=1).values
    scale = (hi - lo) / 255.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((x - lo[:, None, None]) / safe[:, None, None]).clamp_(0, 255)
    q = torch.where(scale[:, None, None] > 0, q, torch.zeros_like(q)).to(torch.uint8)
    params = torch.stack([scale, lo], dim=1).to(torch.float32)
    return q.cpu().numpy(), params.cpu().numpy()


def dequantize_uint8(
    q: np.ndarray | torch.Tensor, params: np.ndarray | torch.Tensor
) -> torch.Tensor:
    """Inverse of ``quantize_uint8``: float32 ``q * scale + offset`` per channel (C first)."""
    q = torch.as_tensor(q)
    p = torch.as_tensor(params, dtype=torch.float32)
    shape = (-1,) + (1,) * (q.ndim - 1)
    return q.to(torch.float32) * p[:, 0].view(shape) + p[:, 1].view(shape)


def relative_rmse(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """RMSE(approx - exact) / RMS(exact), the store's reported quantisation error."""
    exact = exact.double()
    err = (approx.double() - exact).pow(2).mean().sqrt()
    ref = exact.pow(2).mean().sqrt()
    return float(err / ref) if float(ref) > 0 else float(err)

"""DFMSD masking enhancement (ME): the augmented view for the last-stage teacher, replayable.

Paper (Zhang et al., arXiv 2407.13147, Sec. ME): for each image take the weaker teacher's
candidate boxes, sum their areas and divide by the image area. Below θ (best θ = 0.5, Fig. 9)
the image is dominated by small objects: add Gaussian noise N(0, σ²) "with a certain
probability"; otherwise crop the image proportionally at its edges and resize it back
(a low-frequency boost). σ, p and the crop range are not given in the paper; ours are options
(defaults σ = 10 grey levels on [0, 255], p = 0.5, crop 5–20 % of each side length).

Determinism: the choice and its parameters come from a per-image seed
``seed = SHA-256("<base seed>:<image id>")[:6 bytes]`` (numpy PCG64 for the choice, a CPU
``torch.Generator`` for the noise), are stored per image (kind, seed, σ, integer crop box), and
``regenerate`` rebuilds the identical input and checks it against the stored checksum
(SHA-256 of the float32 bytes, first 8 bytes), so a changed decoder/resize is detected.
Enhancement works on the resized, unnormalised RGB image (3, h, w) in [0, 255] (the dataset's
``raw``), keeps its size, and always runs on the CPU in float32 for bit-exact replay.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dfmsd_cli.data.geometry import one_thread
from dfmsd_cli.errors import UserError

KINDS = ("none", "noise", "crop")


@dataclass(frozen=True)
class EnhanceConfig:
    """How ME chooses per image: noise (prob. p) when ratio < theta, else an edge crop."""

    theta: float = 0.5
    p: float = 0.5
    sigma: float = 10.0
    crop_min: float = 0.05
    crop_max: float = 0.2
    seed: int = 0
    source: str | None = None  # the weaker teacher whose area ratios decide

    def __post_init__(self) -> None:
        if not (0 <= self.crop_min <= self.crop_max < 1):
            raise UserError(
                f"enhancement crop range [{self.crop_min}, {self.crop_max}] is invalid: "
                "use 0 <= crop_min <= crop_max < 1"
            )
        if not 0 <= self.p <= 1 or self.sigma < 0:
            raise UserError(f"enhancement p={self.p} sigma={self.sigma}: need 0<=p<=1, sigma>=0")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EnhanceConfig:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass(frozen=True)
class EnhanceParams:
    """One image's stored ME choice. ``crop_box`` = (x1, y1, x2, y2) integer pixels, exclusive."""

    kind: str
    seed: int
    sigma: float = 0.0
    crop_box: tuple[int, int, int, int] = (0, 0, 0, 0)
    checksum: int | None = None

    def to_array(self) -> np.ndarray:
        """float64 (7,): kind code, seed (< 2**53, exact), sigma, x1, y1, x2, y2."""
        return np.array([KINDS.index(self.kind), self.seed, self.sigma, *self.crop_box], np.float64)

    @classmethod
    def from_array(cls, a: np.ndarray, checksum: int | None = None) -> EnhanceParams:
        box = tuple(int(v) for v in a[3:7])
        return cls(KINDS[int(a[0])], int(a[1]), float(a[2]), box, checksum)  # type: ignore[arg-type]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EnhanceParams:
        return cls(
            d["kind"], int(d["seed"]), float(d["sigma"]), tuple(d["crop_box"]), d.get("checksum")
        )


def image_seed(base_seed: int, image_id: int) -> int:
    """48-bit per-image seed from (base seed, COCO image id): stable across runs and shards."""
    digest = hashlib.sha256(f"{int(base_seed)}:{int(image_id)}".encode()).digest()
    return int.from_bytes(digest[:6], "little")


def area_ratio(
    boxes: torch.Tensor, scores: torch.Tensor, size: tuple[int, int], thr: float
) -> float:
    """DFMSD's candidate-box area ratio: sum of areas of boxes with score >= thr (clipped to the
    image) divided by the image area h*w. Overlaps count twice, as a plain sum does."""
    h, w = size
    keep = scores >= thr
    if not bool(keep.any()):
        return 0.0
    b = boxes[keep].float()
    x1, x2 = b[:, 0].clamp(0, w), b[:, 2].clamp(0, w)
    y1, y2 = b[:, 1].clamp(0, h), b[:, 3].clamp(0, h)
    area = ((x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)).sum()
    return float(area / float(h * w))


def choose(
    area_ratio: float, image_id: int, size: tuple[int, int], cfg: EnhanceConfig
) -> EnhanceParams:
    """Decide one image's enhancement from the weaker teacher's area ratio (no checksum yet).

    ratio < θ: noise with probability p (else unchanged); ratio ≥ θ: keep a fraction 1 - f of
    each side, f ~ U(crop_min, crop_max), at a uniform random offset (aspect ratio preserved).
    """
    seed = image_seed(cfg.seed, image_id)
    rng = np.random.Generator(np.random.PCG64(seed))
    h, w = size
    if area_ratio < cfg.theta:
        if rng.random() < cfg.p:
            return EnhanceParams("noise", seed, float(cfg.sigma))
        return EnhanceParams("none", seed)
    f = rng.uniform(cfg.crop_min, cfg.crop_max)
    cw, ch = max(1, math.floor(w * (1 - f))), max(1, math.floor(h * (1 - f)))
    x1 = int(rng.integers(0, w - cw + 1))
    y1 = int(rng.integers(0, h - ch + 1))
    return EnhanceParams("crop", seed, 0.0, (x1, y1, x1 + cw, y1 + ch))


def apply_enhance(raw: torch.Tensor, params: EnhanceParams) -> torch.Tensor:
    """Apply stored params to a (3, h, w) float image in [0, 255]; CPU float32, same size."""
    x = raw.detach().to("cpu", torch.float32)
    if params.kind == "none":
        return x.clone()
    if params.kind == "noise":
        g = torch.Generator().manual_seed(params.seed)
        noise = torch.randn(x.shape, generator=g, dtype=torch.float32)
        return (x + params.sigma * noise).clamp_(0, 255)
    if params.kind == "crop":
        x1, y1, x2, y2 = params.crop_box
        crop = x[:, y1:y2, x1:x2].unsqueeze(0)
        with one_thread():  # thread-count independent, so the checksum matches anywhere
            out = F.interpolate(
                crop, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False
            )
        return out[0].clamp_(0, 255)
    raise ValueError(f"unknown enhancement kind {params.kind!r}")


def input_checksum(x: torch.Tensor) -> int:
    """First 8 bytes (little-endian uint64) of SHA-256 over the float32 bytes of ``x``."""
    data = x.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little")


def regenerate(
    raw: torch.Tensor, params: EnhanceParams | dict, verify: bool = True
) -> torch.Tensor:
    """Rebuild the ME input from stored params; with ``verify`` compare to the stored checksum.

    A mismatch means the image decoding, resize or geometry differ from precompute time.
    """
    p = EnhanceParams.from_dict(params) if isinstance(params, dict) else params
    x = apply_enhance(raw, p)
    if verify and p.checksum is not None and input_checksum(x) != int(p.checksum):
        raise UserError(
            f"the enhanced input (kind {p.kind}, seed {p.seed}) differs from the one the teacher "
            "saw at precompute time: use the same data, geometry and dfmsd/torch versions, or "
            "precompute the enhancement view again"
        )
    return x

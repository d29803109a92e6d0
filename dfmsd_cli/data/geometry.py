"""Input geometry, as MMDetection does it: keep-ratio resize, normalise, pad to a multiple of 32.

The geometry is deterministic and serialisable (``Geometry.to_dict``) so a teacher-feature
store records exactly the input its teacher saw, and ``distill`` can rebuild it.
Views (``orig``, ``hflip``) are explicit and named: the store holds teacher features per view.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from dfmsd_cli.errors import UserError

VIEWS: tuple[str, ...] = ("orig", "hflip")

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class Geometry:
    """Keep-ratio resize to fit ``img_scale`` = (long_max, short_max), then pad to ``pad_divisor``.

    The scale factor is MMDetection's ``rescale_size``:
    ``s = min(long_max / max(w, h), short_max / min(w, h))``, new size ``round(w*s), round(h*s)``
    (``int(x * s + 0.5)``). Normalisation is ``(x - mean) / std`` on RGB values in [0, 255].
    """

    img_scale: tuple[int, int] = (1333, 800)
    pad_divisor: int = 32
    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN)
    std: tuple[float, float, float] = field(default=IMAGENET_STD)

    def __post_init__(self) -> None:
        long_max, short_max = self.img_scale
        if long_max < short_max:
            object.__setattr__(self, "img_scale", (short_max, long_max))
        if min(self.img_scale) <= 0 or self.pad_divisor <= 0:
            raise UserError(
                f"invalid geometry img_scale={self.img_scale} pad_divisor={self.pad_divisor}: "
                "use positive sizes, e.g. --img-scale 1333,800"
            )

    def scale_factor(self, width: int, height: int) -> float:
        long_max, short_max = self.img_scale
        return min(long_max / max(width, height), short_max / min(width, height))

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(new_width, new_height) after the keep-ratio resize."""
        s = self.scale_factor(width, height)
        return max(1, int(width * s + 0.5)), max(1, int(height * s + 0.5))

    def padded_size(self, width: int, height: int) -> tuple[int, int]:
        """(padded_width, padded_height) of one resized image."""
        w, h = self.resized_size(width, height)
        return pad_to(w, self.pad_divisor), pad_to(h, self.pad_divisor)

    def canvas(self) -> tuple[int, int]:
        """(long, short) padded canvas that holds any resized image in landscape orientation."""
        long_max, short_max = self.img_scale
        return pad_to(long_max, self.pad_divisor), pad_to(short_max, self.pad_divisor)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        return cls(
            img_scale=tuple(d["img_scale"]),
            pad_divisor=int(d["pad_divisor"]),
            mean=tuple(d.get("mean", IMAGENET_MEAN)),
            std=tuple(d.get("std", IMAGENET_STD)),
        )


def parse_img_scale(text: str) -> tuple[int, int]:
    """Parse ``'1333,800'`` into ``(1333, 800)``."""
    try:
        a, b = (int(t) for t in str(text).replace("x", ",").split(","))
    except ValueError as exc:
        raise UserError(f"--img-scale must be 'LONG,SHORT' like 1333,800, got '{text}'") from exc
    return (max(a, b), min(a, b))


def pad_to(x: int, divisor: int) -> int:
    return int(math.ceil(x / divisor) * divisor)


def check_view(view: str) -> str:
    if view not in VIEWS:
        raise UserError(f"unknown view '{view}': use one of {', '.join(VIEWS)}")
    return view


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch CPU ops on one thread: bilinear upsampling splits its work by thread count and
    rounds differently per split (1e-5 apart), which would break bit-exact regeneration of
    stored inputs (the ME view's checksum) between processes with other thread settings."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def resize_image(image: np.ndarray | torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """Resize an HxWx3 uint8 RGB image to the geometry size: float32 (3, h, w) in [0, 255].

    Bilinear, ``align_corners=False``, no antialiasing (like cv2.INTER_LINEAR in MMDetection).
    """
    t = torch.as_tensor(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else image
    if t.ndim != 3 or t.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {tuple(t.shape)}")
    h, w = t.shape[:2]
    new_w, new_h = geometry.resized_size(w, h)
    x = t.permute(2, 0, 1).float().unsqueeze(0)
    if (new_h, new_w) != (h, w):
        with one_thread():
            x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)
        x = x.clamp_(0, 255)
    return x[0]


def normalize(image: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """(x - mean) / std per channel on a (3, h, w) float image in [0, 255]."""
    mean = torch.tensor(geometry.mean, dtype=image.dtype, device=image.device).view(3, 1, 1)
    std = torch.tensor(geometry.std, dtype=image.dtype, device=image.device).view(3, 1, 1)
    return (image - mean) / std


def apply_view_image(image: torch.Tensor, view: str) -> torch.Tensor:
    """Apply a named view to a (..., H, W) tensor (image or masks)."""
    check_view(view)
    return image.flip(-1) if view == "hflip" else image


def hflip_boxes(boxes: torch.Tensor, width: float) -> torch.Tensor:
    """Mirror xyxy boxes in an image of the given width: x1' = W - x2, x2' = W - x1."""
    out = boxes.clone()
    out[:, 0] = width - boxes[:, 2]
    out[:, 2] = width - boxes[:, 0]
    return out


def apply_view_boxes(boxes: torch.Tensor, view: str, width: float) -> torch.Tensor:
    check_view(view)
    return hflip_boxes(boxes, width) if view == "hflip" else boxes


def pad_batch(images: list[torch.Tensor], divisor: int) -> torch.Tensor:
    """Stack (3, h_i, w_i) images into (B, 3, H, W), zero-padded bottom/right, H and W
    multiples of ``divisor``. Zero after normalisation is the mean colour, as in MMDetection."""
    max_h = pad_to(max(im.shape[-2] for im in images), divisor)
    max_w = pad_to(max(im.shape[-1] for im in images), divisor)
    out = images[0].new_zeros((len(images), images[0].shape[0], max_h, max_w))
    for i, im in enumerate(images):
        out[i, :, : im.shape[-2], : im.shape[-1]] = im
    return out

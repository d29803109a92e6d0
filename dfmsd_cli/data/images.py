"""Image decoding: any PIL-readable file to an RGB ``uint8`` HxWx3 array, and a cheap probe.

Two levels of checking, so a DataLoader never crashes on a bad file:

* ``probe_image`` (run once per image when a dataset is built) opens only the header (size,
  mode) and checks the file's end marker (JPEG ``FF D9`` EOI, PNG ``IEND`` chunk), which catches
  missing, empty, non-image and truncated files for the cost of two small reads.
* ``load_rgb`` decodes fully; a file that passes the probe but still fails to decode (corrupt
  entropy data) raises ``ImageError``, which the dataset turns into a skipped sample.

Colour conversion follows PIL: grayscale (``L``, ``I;16``, ``1``), palette, CMYK and YCbCr go
through ``Image.convert("RGB")``; the alpha channel of ``RGBA``/``LA``/``PA`` images is dropped
and the stored colours kept, as OpenCV's ``IMREAD_COLOR`` (MMDetection's loader) does.
EXIF orientation is deliberately NOT applied: COCO boxes are given in stored-pixel coordinates.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Never let PIL silently fill a truncated image with grey.
Image.LOAD_TRUNCATED_IMAGES = False

_JPEG_SOI = b"\xff\xd8"
_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_TRAILER_BYTES = 1024  # a JPEG may carry a few padding bytes after EOI


class ImageError(Exception):
    """An image file that cannot be decoded (missing, not an image, truncated, corrupt)."""


@dataclass(frozen=True)
class ImageInfo:
    """Header facts of one image file: stored size and PIL mode."""

    width: int
    height: int
    mode: str
    format: str | None


def _check_trailer(path: Path, head: bytes) -> None:
    """Raise ImageError when a JPEG/PNG file does not end with its end marker (truncation)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(max(0, size - _TRAILER_BYTES))
        tail = f.read()
    if head.startswith(_JPEG_SOI):
        if b"\xff\xd9" not in tail:
            raise ImageError("truncated JPEG (no end-of-image marker)")
    elif head.startswith(_PNG_SIG):
        if b"IEND" not in tail[-16:]:
            raise ImageError("truncated PNG (no IEND chunk)")


def probe_image(path: str | os.PathLike) -> ImageInfo:
    """Read the header and the end marker of an image file; raise ``ImageError`` if bad.

    Cost: one header parse and one small read at the end of the file (no pixel decoding).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(16)
        if not head:
            raise ImageError("empty file")
        _check_trailer(path, head)
        with Image.open(path) as im:
            w, h = im.size
            info = ImageInfo(width=int(w), height=int(h), mode=im.mode, format=im.format)
    except ImageError:
        raise
    except FileNotFoundError as exc:
        raise ImageError("file not found") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"not a readable image ({exc})") from exc
    if info.width <= 0 or info.height <= 0:
        raise ImageError(f"invalid image size {info.width}x{info.height}")
    return info


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB (grayscale, 16-bit, palette, CMYK, alpha)."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale the full range to 8 bits instead of clipping at 255.
        a = np.asarray(im, dtype=np.float64)
        hi = max(float(a.max()), 1.0)
        scale = 255.0 / (65535.0 if hi > 255 else 255.0)
        a8 = np.clip(a * scale + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a8).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # PIL warns when a palette with transparency goes to RGB
    return im.convert("RGB")


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file into a C-contiguous ``uint8`` array of shape (H, W, 3), RGB.

    Raises ``ImageError`` for a missing, non-image, truncated or corrupt file.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.array(to_rgb(im), dtype=np.uint8)  # writable copy for torch
    except FileNotFoundError as exc:
        raise ImageError(f"{path}: file not found") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"{path}: cannot decode ({exc})") from exc
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageError(f"{path}: decoded to unexpected shape {arr.shape}")
    return np.ascontiguousarray(arr)

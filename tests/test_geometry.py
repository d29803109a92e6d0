"""Geometry: MMDetection keep-ratio resize sizes, padding, box scaling and the hflip view."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dfmsd_cli.data.geometry import (
    Geometry,
    apply_view_boxes,
    apply_view_image,
    normalize,
    pad_batch,
    parse_img_scale,
    resize_image,
)
from dfmsd_cli.errors import UserError


def mmdet_rescale_size(w: int, h: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv.rescale_size(keep_ratio=True), written out independently of dfmsd."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(w * float(factor) + 0.5), int(h * float(factor) + 0.5)


@pytest.mark.parametrize(
    ("w", "h", "expected"),
    [
        (640, 480, (1067, 800)),  # short side binds: 800/480
        (480, 640, (800, 1067)),  # portrait
        (640, 427, (1199, 800)),  # typical COCO
        (1000, 200, (1333, 267)),  # long side binds: 1333/1000
        (1333, 800, (1333, 800)),  # identity
    ],
)
def test_resized_size_matches_mmdetection(w, h, expected):
    g = Geometry()
    assert g.resized_size(w, h) == expected == mmdet_rescale_size(w, h, (1333, 800))


def test_resized_size_many_shapes_match_formula():
    rng = np.random.default_rng(0)
    for scale in [(1333, 800), (320, 256), (128, 96)]:
        g = Geometry(img_scale=scale)
        for w, h in rng.integers(16, 2000, size=(200, 2)):
            assert g.resized_size(int(w), int(h)) == mmdet_rescale_size(int(w), int(h), scale)


def test_img_scale_order_and_dict_round_trip():
    g = Geometry(img_scale=(96, 128), pad_divisor=16)
    assert g.img_scale == (128, 96)
    g2 = Geometry.from_dict(g.to_dict())
    assert g2 == g
    assert parse_img_scale("800,1333") == (1333, 800)
    with pytest.raises(UserError, match="--img-scale"):
        parse_img_scale("big")
    with pytest.raises(UserError):
        Geometry(img_scale=(0, 10))


def test_resize_image_shape_range_and_normalise():
    img = np.random.default_rng(1).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    g = Geometry(img_scale=(128, 96))
    out = resize_image(img, g)
    w, h = g.resized_size(90, 60)
    assert out.shape == (3, h, w) and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 255
    n = normalize(out, g)
    mean = torch.tensor(g.mean).view(3, 1, 1)
    std = torch.tensor(g.std).view(3, 1, 1)
    torch.testing.assert_close(n * std + mean, out, rtol=0, atol=1e-3)
    # identity size: pixels pass through unchanged
    same = resize_image(img, Geometry(img_scale=(90, 60)))
    assert torch.equal(same, torch.from_numpy(img).permute(2, 0, 1).float())


def test_pad_batch_sizes_and_zero_fill():
    a, b = torch.ones(3, 50, 70), torch.full((3, 33, 97), 2.0)
    out = pad_batch([a, b], 32)
    assert out.shape == (2, 3, 64, 128)
    assert torch.equal(out[0, :, :50, :70], a) and out[0, :, 50:].abs().sum() == 0
    assert out[0, :, :, 70:].abs().sum() == 0
    assert torch.equal(out[1, :, :33, :97], b) and out[1, :, 33:].abs().sum() == 0
    assert Geometry(img_scale=(128, 96)).padded_size(90, 60) == (128, 96)


def test_boxes_scale_round_trip():
    g = Geometry(img_scale=(1333, 800))
    w0, h0 = 640, 427
    s = g.scale_factor(w0, h0)
    boxes = torch.tensor([[10.0, 20.0, 300.5, 400.25], [0.0, 0.0, 640.0, 427.0]])
    back = (boxes * s) / s
    torch.testing.assert_close(back, boxes)
    w, h = g.resized_size(w0, h0)
    # the single scale factor maps the full image onto the resized one within half a pixel
    assert abs(w0 * s - w) <= 0.5 and abs(h0 * s - h) <= 0.5


def test_hflip_boxes_twice_is_identity():
    boxes = torch.tensor([[1.0, 2.0, 10.0, 20.0], [30.5, 0.0, 64.0, 5.0]])
    once = apply_view_boxes(boxes, "hflip", 64)
    assert torch.equal(once, torch.tensor([[54.0, 2.0, 63.0, 20.0], [0.0, 0.0, 33.5, 5.0]]))
    assert torch.equal(apply_view_boxes(once, "hflip", 64), boxes)
    assert torch.equal(apply_view_boxes(boxes, "orig", 64), boxes)
    with pytest.raises(UserError, match="unknown view"):
        apply_view_boxes(boxes, "vflip", 64)


def test_hflip_boxes_match_flipped_pixels():
    """A box drawn as a filled rectangle stays the tight box of the flipped pixels."""
    img = torch.zeros(1, 40, 64)
    x1, y1, x2, y2 = 5, 7, 21, 30  # pixels [x1, x2) x [y1, y2)
    img[0, y1:y2, x1:x2] = 1
    flipped = apply_view_image(img, "hflip")
    ys, xs = torch.nonzero(flipped[0], as_tuple=True)
    pixel_box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]]).float()
    box = apply_view_boxes(torch.tensor([[x1, y1, x2, y2]]).float(), "hflip", 64)
    assert torch.equal(box, pixel_box)
    assert torch.equal(apply_view_image(flipped, "hflip"), img)


def test_resize_and_me_crop_do_not_depend_on_the_thread_count():
    """Bilinear upsampling rounds differently per thread split; we pin it to one thread so a
    stored ME input's checksum matches in a process with other thread settings."""
    from dfmsd_cli.data.enhance import EnhanceParams, apply_enhance, input_checksum

    gen = torch.Generator().manual_seed(0)
    img = (torch.rand(90, 120, 3, generator=gen) * 255).to(torch.uint8)  # upsampled below
    geom = Geometry(img_scale=(640, 480))
    params = EnhanceParams("crop", 1, 0.0, (7, 5, 101, 77))
    before = torch.get_num_threads()
    sums = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            raw = resize_image(img, geom)
            sums.append((input_checksum(raw), input_checksum(apply_enhance(raw, params))))
    finally:
        torch.set_num_threads(before)
    assert sums[0] == sums[1]
    assert torch.get_num_threads() == before

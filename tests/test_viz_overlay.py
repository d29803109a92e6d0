"""Overlay math on hand-built arrays: level maps onto the resized image, padding excluded,
portrait/transposed maps, and the PCA basis shared across panels."""

from __future__ import annotations

import numpy as np
import pytest

from dfmsd_cli.viz.overlay import (
    display_limits,
    image_cells,
    level_vectors,
    pca_basis,
    pca_rgb,
    upsample_to_extent,
)


def test_cells_cover_the_resized_image():
    assert image_cells((20, 33), 8) == (3, 5)  # ceil(20/8), ceil(33/8)
    assert image_cells((32, 64), 32) == (1, 2)


def test_upsample_repeats_each_cell_and_crops_to_the_resized_extent():
    # image resized to 10x13, padded to 16x16: stride 8 -> 2x2 map, all cells overlap
    m = np.array([[1.0, 2.0], [3.0, 4.0]])
    up = upsample_to_extent(m, 8, (10, 13))
    assert up.shape == (10, 13)  # the padding (rows 10..15, cols 13..15) is never drawn
    assert (up[:8, :8] == 1).all() and (up[:8, 8:] == 2).all()
    assert (up[8:, :8] == 3).all() and (up[8:, 8:] == 4).all()


def test_pure_padding_cells_are_dropped_and_do_not_set_the_colour_scale():
    # resized 8x20 inside a 32x32 pad: stride 8 map 4x4; only rows 0 and cols 0..2 overlap
    m = np.zeros((4, 4))
    m[0, :3] = [1.0, 2.0, 3.0]
    m[1:, :] = 100.0  # padding cells with a large value
    m[:, 3] = -50.0
    up = upsample_to_extent(m, 8, (8, 20))
    assert up.shape == (8, 20) and up.max() == 3.0 and up.min() == 1.0
    assert display_limits(m, 8, (8, 20)) == (1.0, 3.0)


def test_portrait_map_and_transposed_storage():
    # portrait image 24 high, 8 wide at stride 8: a 3x1 map
    portrait = np.array([[1.0], [2.0], [3.0]])
    up = upsample_to_extent(portrait, 8, (24, 8))
    assert up.shape == (24, 8) and up[0, 0] == 1 and up[23, 7] == 3
    # the same map stored landscape (1x3, as the store's canvas holds it) is turned back
    up_t = upsample_to_extent(portrait.T, 8, (24, 8), transposed=True)
    np.testing.assert_array_equal(up, up_t)
    # drawing the landscape-stored map without turning it back cannot cover the image
    with pytest.raises(ValueError, match="transposed"):
        upsample_to_extent(portrait.T, 8, (24, 8))


def test_rgb_maps_upsample_per_channel():
    rgb = np.arange(2 * 2 * 3, dtype=float).reshape(2, 2, 3)
    up = upsample_to_extent(rgb, 4, (7, 5))
    assert up.shape == (7, 5, 3)
    np.testing.assert_array_equal(up[6, 4], rgb[1, 1])


def test_level_vectors_use_image_cells_only():
    f = np.zeros((2, 4, 4))
    f[:, :1, :3] = 1.0
    f[:, 1:, :] = 9.0  # padding
    v = level_vectors(f, 8, (8, 20))
    assert v.shape == (3, 2) and (v == 1.0).all()


def test_pca_basis_is_shared_across_panels():
    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(8, 5, 6))
    basis = pca_basis(level_vectors(teacher, 4, (20, 24)))
    assert basis.components.shape == (3, 8)
    np.testing.assert_allclose(basis.components @ basis.components.T, np.eye(3), atol=1e-9)
    same = pca_rgb(teacher.copy(), basis)
    np.testing.assert_array_equal(same, pca_rgb(teacher, basis))  # identical features, colours
    # a scaled student has the same principal directions: its own basis would paint it like
    # the teacher, the shared one does not
    scaled = 3.0 * teacher
    own = pca_basis(level_vectors(scaled, 4, (20, 24)))
    np.testing.assert_allclose(pca_rgb(scaled, own), pca_rgb(teacher, basis), atol=1e-9)
    assert np.abs(pca_rgb(scaled, basis) - pca_rgb(teacher, basis)).max() > 0.1
    assert same.min() >= 0 and same.max() <= 1


def test_pca_basis_with_fewer_directions_than_components():
    basis = pca_basis(np.array([[1.0, 0.0], [3.0, 0.0]]))  # one direction of variance
    assert basis.components.shape == (3, 2)
    assert np.allclose(basis.components[1:], 0)
    assert abs(basis.components[0, 0]) == pytest.approx(1.0) and basis.components[0, 0] > 0


def test_constant_map_gets_a_readable_range():
    assert display_limits(np.ones((1, 1)), 128, (96, 128)) == (0.5, 1.5)


def test_me_caption_and_view_inputs():
    import torch

    from dfmsd_cli.data.enhance import EnhanceParams, apply_enhance, input_checksum
    from dfmsd_cli.viz.source import enhance_caption, view_input

    crop = EnhanceParams("crop", 7, 0.0, (1, 2, 9, 8))
    rec = {"enhance": crop.to_dict(), "area_ratio": 0.625}
    assert enhance_caption(rec) == "crop 1,2,9,8; weaker teacher's area ratio 0.625"
    noise = {"enhance": EnhanceParams("noise", 3, 10.0).to_dict(), "area_ratio": float("nan")}
    assert enhance_caption(noise) == "noise σ=10"
    raw = torch.arange(3 * 10 * 12, dtype=torch.float32).reshape(3, 10, 12) % 255
    sample = {"raw": raw}
    assert torch.equal(view_input(sample, "hflip", {})[0], raw.flip(-1))
    x = apply_enhance(raw, crop)
    rec["enhance"] = EnhanceParams("crop", 7, 0.0, (1, 2, 9, 8), input_checksum(x)).to_dict()
    got, note = view_input(sample, "me", rec)
    assert torch.equal(got, x) and note == ""
    rec["enhance"]["checksum"] += 1  # another decoder/resize: drawn, and said so
    assert "differs" in view_input(sample, "me", rec)[1]
    got, note = view_input(sample, "adv", {})
    assert torch.equal(got, raw) and "not reproducible" in note

"""Image decoding: every PIL mode becomes RGB; bad files are found, skipped, counted or fatal."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dfmsd_cli.data import CocoDetection, Geometry, ImageError, collate, load_rgb, probe_image
from dfmsd_cli.data.loader import make_loader
from dfmsd_cli.errors import UserError

RNG = np.random.default_rng(0)
PIXELS = RNG.integers(0, 256, (40, 50, 3), dtype=np.uint8)


def test_grayscale_jpeg_to_rgb(tmp_path):
    Image.fromarray(PIXELS[..., 0]).save(tmp_path / "g.jpg")
    out = load_rgb(tmp_path / "g.jpg")
    assert out.shape == (40, 50, 3) and out.dtype == np.uint8
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert probe_image(tmp_path / "g.jpg").mode == "L"


def test_cmyk_jpeg_to_rgb(tmp_path):
    Image.fromarray(PIXELS).convert("CMYK").save(tmp_path / "c.jpg")
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    out = load_rgb(tmp_path / "c.jpg")
    ref = np.asarray(Image.open(tmp_path / "c.jpg").convert("RGB"))
    assert out.shape == (40, 50, 3) and np.array_equal(out, ref)


def test_rgba_png_drops_alpha_like_opencv(tmp_path):
    rgba = np.concatenate([PIXELS, np.zeros((40, 50, 1), np.uint8)], axis=2)
    rgba[:20, :, 3] = 255  # top half opaque, bottom half fully transparent
    Image.fromarray(rgba).save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode == "RGBA"
    assert np.array_equal(load_rgb(tmp_path / "a.png"), PIXELS)  # stored colours, alpha ignored
    la = np.stack([PIXELS[..., 0], np.full((40, 50), 7, np.uint8)], axis=2)
    Image.fromarray(la).save(tmp_path / "la.png")
    assert Image.open(tmp_path / "la.png").mode == "LA"
    out = load_rgb(tmp_path / "la.png")
    assert np.array_equal(out[..., 1], PIXELS[..., 0])


def test_palette_and_16bit_png(tmp_path):
    Image.fromarray(PIXELS).convert("P").save(tmp_path / "p.png")
    assert load_rgb(tmp_path / "p.png").shape == (40, 50, 3)
    ramp = (np.arange(40 * 50).reshape(40, 50) * 30).astype(np.uint16)  # up to 59970
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    out = load_rgb(tmp_path / "g16.png")
    # scaled from the 16-bit range, not clipped at 255
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == round(59970 * 255 / 65535)


def _truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("ext", ["jpg", "png"])
def test_truncated_files_fail_the_probe(tmp_path, ext):
    p = tmp_path / f"t.{ext}"
    Image.fromarray(PIXELS).save(p)
    probe_image(p)  # intact: fine
    _truncate(p)
    with pytest.raises(ImageError, match="truncated"):
        probe_image(p)
    with pytest.raises(ImageError):
        load_rgb(p)


def test_empty_missing_and_non_image_files(tmp_path):
    (tmp_path / "e.jpg").write_bytes(b"")
    (tmp_path / "t.jpg").write_text("not an image at all")
    for name in ("e.jpg", "t.jpg", "missing.jpg"):
        with pytest.raises(ImageError):
            probe_image(tmp_path / name)
        with pytest.raises(ImageError):
            load_rgb(tmp_path / name)


def _corrupt_png(path: Path) -> None:
    """Damage pixel data but keep header and IEND: passes the probe, fails to decode."""
    b = bytearray(path.read_bytes())
    i = b.find(b"IDAT")
    b[i + 40] ^= 0xFF
    path.write_bytes(bytes(b))


def _root(tmp_path: Path, n: int = 4) -> tuple[Path, Path]:
    """n PNG images with one box each."""
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    images, anns = [], []
    for i in range(n):
        Image.fromarray(np.roll(PIXELS, i, axis=1)).save(img_dir / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 50, "height": 40})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [5, 5, 20, 10]})
    ann = tmp_path / "ann.json"
    coco = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}]}
    ann.write_text(json.dumps(coco))
    return ann, img_dir


def test_dataset_skips_truncated_image_with_warning_and_count(tmp_path, caplog):
    ann, img_dir = _root(tmp_path)
    _truncate(img_dir / "1.png")
    with caplog.at_level(logging.WARNING, logger="dfmsd_cli.data"):
        ds = CocoDetection(ann, img_dir, Geometry(img_scale=(64, 48)))
    assert ds.image_ids == [1, 3, 4]
    assert ds.stats["unreadable_images"] == 1 and ds.stats["images"] == 3
    assert "1.png" in caplog.text
    with pytest.raises(UserError, match="unreadable image.*1.png.*--strict"):
        CocoDetection(ann, img_dir, Geometry(img_scale=(64, 48)), strict=True)


def test_load_time_failure_never_crashes_a_loader(tmp_path):
    ann, img_dir = _root(tmp_path)
    _corrupt_png(img_dir / "2.png")  # image id 3, index 2
    g = Geometry(img_scale=(64, 48))
    ev = CocoDetection(ann, img_dir, g, train=False)
    assert ev.image_ids == [1, 2, 3, 4]  # passes the probe
    assert ev[2] is None and ev.stats["load_failures"] == 1
    batch = collate([ev[1], ev[2], ev[3]])
    assert [m["image_id"] for m in batch["meta"]] == [2, 4]
    assert collate([None]) is None
    ids = [m["image_id"] for b in make_loader(ev, batch_size=2) for m in b["meta"]]
    assert ids == [1, 2, 4]

    tr = CocoDetection(ann, img_dir, g, train=True)
    assert tr[2]["image_id"] == 4  # the next readable image stands in

    strict = CocoDetection(ann, img_dir, g, strict=True)
    with pytest.raises(UserError, match="2.png"):
        strict[2]


@pytest.mark.slow  # spawned DataLoader workers
def test_dataset_pickles_and_runs_in_spawned_workers(tmp_path):
    ann, img_dir = _root(tmp_path)
    _corrupt_png(img_dir / "0.png")
    ds = CocoDetection(ann, img_dir, Geometry(img_scale=(64, 48)), views=("orig", "hflip"))
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[3]["image"], ds[3]["image"])
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=3,
        num_workers=1,
        multiprocessing_context="spawn",
        collate_fn=collate,
    )
    batches = list(loader)
    assert sum(len(b["meta"]) for b in batches) == len(ds)  # train=True: stand-ins, no gaps

"""Synthetic dataset: bit-identical for a seed, valid COCO, refuses to clobber, CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from dfmsd_cli.cli import main
from dfmsd_cli.data import make_synthetic
from dfmsd_cli.data.synthetic import CLASSES
from dfmsd_cli.errors import UserError

SMALL = dict(min_size=64, max_size=128)


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_bit_identical_other_seed_differs(tmp_path):
    a = make_synthetic(tmp_path / "a", images=8, seed=3, **SMALL)
    b = make_synthetic(tmp_path / "b", images=8, seed=3, **SMALL)
    c = make_synthetic(tmp_path / "c", images=8, seed=4, **SMALL)
    da, db, dc = _digests(a), _digests(b), _digests(c)
    assert da == db
    assert len(da) == 2 + 8 + 2  # two JSONs, 8 train and 8 // 4 val images
    assert da != dc
    # image i does not depend on how many images were asked for
    d = _digests(make_synthetic(tmp_path / "d", images=4, seed=3, **SMALL))
    name = "train2017/000000000002.jpg"
    assert d[name] == da[name]


def test_valid_coco_with_boxes_masks_and_variety(synthetic_root):
    train = json.loads((synthetic_root / "annotations/instances_train2017.json").read_text())
    val = json.loads((synthetic_root / "annotations/instances_val2017.json").read_text())
    assert len(train["images"]) == 12 and len(val["images"]) == 3
    assert not {i["id"] for i in train["images"]} & {i["id"] for i in val["images"]}
    assert [c["id"] for c in train["categories"]] == [cid for cid, _, _ in CLASSES]
    assert {"info", "licenses"} <= set(train)
    sizes = set()
    for im in train["images"]:
        with Image.open(synthetic_root / "train2017" / im["file_name"]) as f:
            assert f.size == (im["width"], im["height"]) and f.mode == "RGB"
            sizes.add(f.size)
    assert any(w < h for w, h in sizes) and any(w > h for w, h in sizes)  # portrait too
    dims = {im["id"]: (im["width"], im["height"]) for im in train["images"]}
    areas, kinds = [], set()
    for a in train["annotations"]:
        x, y, w, h = a["bbox"]
        iw, ih = dims[a["image_id"]]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= iw + 1e-6 and y + h <= ih + 1e-6
        assert a["iscrowd"] == 0 and 0 < a["area"] <= w * h + 1e-6
        kinds.add(type(a["segmentation"]).__name__)
        areas.append(a["area"])
    assert kinds == {"list", "dict"}  # polygons (whole objects) and RLE (occluded ones)
    assert min(areas) < 32**2 and max(areas) > 40**2  # small and large objects
    assert {a["category_id"] for a in train["annotations"]} >= {1, 3, 5}


def test_refuses_to_overwrite(tmp_path, capsys):
    root = make_synthetic(tmp_path / "s", images=2, seed=0, **SMALL)
    with pytest.raises(UserError, match="--overwrite"):
        make_synthetic(root, images=2, seed=1, **SMALL)
    make_synthetic(root, images=3, seed=1, overwrite=True, **SMALL)
    assert len(list((root / "train2017").iterdir())) == 3  # stale files gone
    other = tmp_path / "coco"
    (other / "annotations").mkdir(parents=True)
    (other / "annotations/instances_train2017.json").write_text('{"info": {}}')
    with pytest.raises(UserError, match="not synthetic"):
        make_synthetic(other, images=2, overwrite=True, **SMALL)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["make-data", "synthetic", "--out", str(root), "--num-images", "2"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0]


def test_cli_writes_coco_root(tmp_path):
    out = tmp_path / "cli"
    argv = ["make-data", "synthetic", "--out", str(out), "--num-images", "4", "--seed", "2"]
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--min-size", "64", "--max-size", "96"])
    assert exc.value.code == 0
    ref = make_synthetic(tmp_path / "lib", images=4, seed=2, min_size=64, max_size=96)
    got = {k: v for k, v in _digests(out).items() if k != "config.json"}
    assert got == _digests(ref)
    assert json.loads((out / "config.json").read_text())["options"]["seed"] == 2

"""CocoDetection contract, views, masks, annotation filtering, data resolution and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dfmsd_cli.cli import main
from dfmsd_cli.data import CocoDetection, Geometry, collate, make_loader, resolve_data
from dfmsd_cli.data.loader import GroupedBatchSampler
from dfmsd_cli.errors import UserError

G = Geometry(img_scale=(128, 96))


def _ds(root: Path, split: str = "train2017", **kw) -> CocoDetection:
    return CocoDetection(*resolve_data(root, split), geometry=G, **kw)


# ----------------------------------------------------------------------------- contract
def test_sample_and_batch_contract(synthetic_root):
    ds = _ds(synthetic_root, views=("orig", "hflip"))
    assert len(ds) == 2 * len(ds.image_ids) and ds.image_ids == sorted(ds.image_ids)
    assert [c["id"] for c in ds.categories] == [1, 3, 5, 7, 9] and ds.num_classes == 5
    s = ds[3]
    assert (s["index"], s["view"], s["image_id"]) == (1, "hflip", ds.image_ids[1])
    h, w = s["size"]
    h0, w0 = s["orig_size"]
    assert s["image"].shape == (3, h, w) and s["image"].dtype == torch.float32
    assert (w, h) == G.resized_size(w0, h0) and s["scale"] == pytest.approx(G.scale_factor(w0, h0))
    assert s["boxes"].dtype == torch.float32 and s["boxes"].shape[1] == 4
    assert s["labels"].dtype == torch.int64 and len(s["labels"]) == len(s["boxes"])
    assert "masks" not in s and "raw" not in s
    b = s["boxes"]
    assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
    assert b.min() >= 0 and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()

    ds.keep_raw = True
    samples = [ds[k] for k in range(4)]
    batch = collate(samples)
    assert batch["images"].shape[0] == 4 and batch["images"].shape[2] % 32 == 0
    assert batch["images"].shape[3] % 32 == 0
    assert batch["image_sizes"] == [smp["size"] for smp in samples]
    assert set(batch["targets"][0]) == {"boxes", "labels"}
    assert set(batch["meta"][0]) == {
        "image_id", "index", "view", "orig_size", "size", "scale", "raw"
    }  # fmt: skip
    assert batch["raw"].shape == batch["images"].shape
    ih, iw = samples[1]["size"]
    torch.testing.assert_close(batch["raw"][1, :, :ih, :iw], samples[1]["raw"])


def test_labels_map_to_category_ids(synthetic_root):
    ds = _ds(synthetic_root)
    data = json.loads((synthetic_root / "annotations/instances_train2017.json").read_text())
    for i, image_id in enumerate(ds.image_ids):
        want = sorted(a["category_id"] for a in data["annotations"] if a["image_id"] == image_id)
        got = sorted(ds.categories[int(lab) - 1]["id"] for lab in ds.get(i, "orig")["labels"])
        assert got == want


def test_hflip_view_flips_image_boxes_and_masks(synthetic_root):
    ds = _ds(synthetic_root, with_masks=True)
    ds.keep_raw = True
    i = next(i for i in range(len(ds.image_ids)) if len(ds.get(i, "orig")["labels"]) >= 2)
    a, b = ds.get(i, "orig"), ds.get(i, "hflip")
    w = a["size"][1]
    assert torch.equal(b["image"], a["image"].flip(-1)) and torch.equal(b["raw"], a["raw"].flip(-1))
    torch.testing.assert_close(b["boxes"][:, [0, 2]], w - a["boxes"][:, [2, 0]])
    torch.testing.assert_close(b["boxes"][:, [1, 3]], a["boxes"][:, [1, 3]])
    assert torch.equal(b["masks"], a["masks"].flip(-1))
    assert a["masks"].dtype == torch.uint8 and a["masks"].shape[1:] == a["image"].shape[1:]
    for view in (a, b):  # every mask lies in (and nearly fills the extent of) its box
        for m, box in zip(view["masks"], view["boxes"], strict=True):
            ys, xs = torch.nonzero(m, as_tuple=True)
            assert len(xs) > 0
            assert xs.min() >= box[0].floor() - 1 and xs.max() + 1 <= box[2].ceil() + 1
            assert ys.min() >= box[1].floor() - 1 and ys.max() + 1 <= box[3].ceil() + 1


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools under NumPy 2
def test_masks_from_polygon_and_rle_agree_with_pycocotools(synthetic_root):
    from pycocotools.coco import COCO

    ann = synthetic_root / "annotations/instances_train2017.json"
    coco = COCO(str(ann))
    kinds = {type(a["segmentation"]).__name__ for a in coco.dataset["annotations"]}
    assert kinds == {"list", "dict"}  # the generator writes both polygons and RLE
    # identity geometry: masks must equal pycocotools' annToMask at the original size
    data = json.loads(ann.read_text())
    big = max(max(im["width"], im["height"]) for im in data["images"])
    ds = CocoDetection(ann, synthetic_root / "train2017", Geometry((big, big)), with_masks=True)
    checked = 0
    for i, image_id in enumerate(ds.image_ids):
        info = ds.image_info(i)
        if max(info["width"], info["height"]) != big:
            continue
        s = ds.get(i, "orig")
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        if anns:  # masks come in annotation order
            ref = np.stack([coco.annToMask(a) for a in anns])
            assert np.array_equal(s["masks"].numpy(), ref)
            checked += 1
    assert checked >= 1


# ----------------------------------------------------------------------------- filtering
def _write(tmp_path: Path, coco: dict, sizes=((60, 40), (50, 50), (40, 30))) -> tuple[Path, Path]:
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (i * 60, 100, 200)).save(img_dir / f"{i + 1}.jpg")
    coco.setdefault(
        "images",
        [
            {"id": i + 1, "file_name": f"{i + 1}.jpg", "width": w, "height": h}
            for i, (w, h) in enumerate(sizes)
        ],
    )
    coco.setdefault("categories", [{"id": 10, "name": "x"}, {"id": 4, "name": "y"}])
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(coco))
    return ann, img_dir


def _a(image_id, bbox, cat=10, **kw):
    return {"image_id": image_id, "category_id": cat, "bbox": bbox, **kw}


def test_crowd_and_degenerate_boxes_are_dropped_and_counted(tmp_path):
    anns = [
        _a(1, [1, 2, 10, 20]),  # kept
        _a(1, [5, 5, 30, 10], cat=4, iscrowd=1),  # crowd
        _a(1, [5, 5, 0, 10]),  # zero width
        _a(1, [5, 5, 10, -3]),  # negative height
        _a(1, [70, 5, 10, 10]),  # entirely right of the 60-px image: empty after clipping
        _a(1, [50, 30, 20, 20], cat=4),  # clipped to [50, 30, 60, 40]
        _a(2, [0, 0, 10, 10], iscrowd=1),  # image 2 has only a crowd box -> empty
    ]
    ann, img_dir = _write(tmp_path, {"annotations": anns})
    g = Geometry(img_scale=(60, 60))  # identity for 60x40
    ds = CocoDetection(ann, img_dir, g)
    assert ds.stats["crowd_boxes"] == 2 and ds.stats["degenerate_boxes"] == 3
    assert ds.stats["empty_images"] == 2 and ds.stats["boxes"] == 2
    s = ds.get(0, "orig")
    torch.testing.assert_close(s["boxes"], torch.tensor([[1.0, 2, 11, 22], [50, 30, 60, 40]]))
    # labels in category-id order: id 4 -> 1, id 10 -> 2
    assert s["labels"].tolist() == [2, 1] and [c["id"] for c in ds.categories] == [4, 10]
    assert ds.image_ids == [1, 2, 3]  # empty images kept by default (evaluation)
    assert ds.get(1, "orig")["boxes"].shape == (0, 4)

    tr = CocoDetection(ann, img_dir, g, skip_empty=True)
    assert tr.image_ids == [1] and tr.stats["skipped_empty"] == 2


def test_orphans_size_mismatch_and_max_images(tmp_path, caplog):
    anns = [_a(1, [1, 1, 5, 5]), _a(99, [1, 1, 5, 5]), _a(3, [1, 1, 5, 5])]
    ann, img_dir = _write(tmp_path, {"annotations": anns})
    data = json.loads(ann.read_text())
    data["images"][1]["width"] = 500  # the file is 50x50
    ann.write_text(json.dumps(data))
    ds = CocoDetection(ann, img_dir, G)
    assert ds.stats["orphan_annotations"] == 1 and ds.stats["size_mismatch"] == 1
    assert ds.image_info(1) == {"id": 2, "file_name": "2.jpg", "width": 50, "height": 50}
    assert "differ in size" in caplog.text
    few = CocoDetection(ann, img_dir, G, skip_empty=True, max_images=1)
    assert few.image_ids == [1] and len(few) == 1


def test_boxes_scale_with_the_image(tmp_path):
    ann, img_dir = _write(tmp_path, {"annotations": [_a(1, [6, 4, 30, 20])]})
    ds = CocoDetection(ann, img_dir, Geometry(img_scale=(120, 80)))  # 60x40 -> 120x80
    s = ds.get(0, "orig")
    assert s["size"] == (80, 120) and s["scale"] == 2.0
    torch.testing.assert_close(s["boxes"], torch.tensor([[12.0, 8, 72, 48]]))
    torch.testing.assert_close(s["boxes"] / s["scale"], torch.tensor([[6.0, 4, 36, 24]]))


# ----------------------------------------------------------------------------- loaders
def test_resolve_data_layout_and_overrides(synthetic_root, tmp_path):
    ann, imgs = resolve_data(synthetic_root, "val2017")
    assert ann == synthetic_root / "annotations/instances_val2017.json"
    assert imgs == synthetic_root / "val2017"
    ann2, imgs2 = resolve_data(synthetic_root, "val2017", images=synthetic_root / "train2017")
    assert (ann2, imgs2) == (ann, synthetic_root / "train2017")
    other = tmp_path / "a.json"
    other.write_text("{}")
    assert resolve_data(None, "x", ann=other, images=imgs) == (other, imgs)


def test_grouped_batch_sampler_partitions_by_aspect_and_rank():
    flags = [0, 1, 1, 0, 1, 0, 1, 1, 1]
    seen = []
    for rank in range(2):
        s = GroupedBatchSampler(flags, 2, shuffle=True, seed=3, rank=rank, world_size=2)
        s.set_epoch(1)
        batches = list(s)
        assert len(batches) == len(s)
        for b in batches:
            assert len({flags[i] for i in b}) == 1
        seen += [i for b in batches for i in b]
    assert set(seen) == set(range(len(flags)))
    a = list(GroupedBatchSampler(flags, 2, seed=3))
    assert a == list(GroupedBatchSampler(flags, 2, seed=3))
    b = GroupedBatchSampler(flags, 2, seed=3)
    b.set_epoch(5)
    assert list(b) != a


def test_make_loader_in_order_for_evaluation(synthetic_root):
    ds = _ds(synthetic_root, "val2017", train=False)
    ids = [m["image_id"] for batch in make_loader(ds, 2) for m in batch["meta"]]
    assert ids == ds.image_ids


# ----------------------------------------------------------------------------- errors
def _cli_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


def test_missing_annotation_file_and_image_folder(synthetic_root, tmp_path, capsys):
    with pytest.raises(UserError, match="did you mean: val2017"):
        resolve_data(synthetic_root, "val2071")
    with pytest.raises(UserError, match="no dataset given"):
        resolve_data(None, "val2017")
    err = _cli_error(capsys, ["check-data", "--data", str(synthetic_root), "--split", "test2017"])
    assert "instances_test2017.json not found" in err and "--split" in err
    ann = synthetic_root / "annotations/instances_val2017.json"
    err = _cli_error(capsys, ["check-data", "--ann", str(ann), "--images", str(tmp_path / "nope")])
    assert "image folder" in err and "--images" in err
    with pytest.raises(UserError, match="image folder"):
        CocoDetection(ann, tmp_path / "nope")
    with pytest.raises(UserError, match="annotation file"):
        CocoDetection(tmp_path / "nope.json", synthetic_root / "val2017")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"images": []}', "lacks the list"),
        ('{"images": [{"id": 1}], "categories": []}', r"images\[0\] lacks"),
        (
            '{"images": [], "categories": [{"id": 1}], "annotations": [{"image_id": 1}]}',
            r"annotations\[0\] lacks",
        ),
    ],
)
def test_malformed_annotation_json(tmp_path, capsys, content, match):
    (tmp_path / "imgs").mkdir()
    ann = tmp_path / "bad.json"
    ann.write_text(content)
    with pytest.raises(UserError, match=match):
        CocoDetection(ann, tmp_path / "imgs")
    err = _cli_error(capsys, ["check-data", "--ann", str(ann), "--images", str(tmp_path / "imgs")])
    assert str(ann) in err


def test_category_missing_from_categories(tmp_path, capsys):
    ann, img_dir = _write(tmp_path, {"annotations": [_a(1, [1, 1, 5, 5], cat=77, id=12)]})
    with pytest.raises(UserError, match="category id 77 .*annotation 12.*missing"):
        CocoDetection(ann, img_dir)
    err = _cli_error(capsys, ["check-data", "--ann", str(ann), "--images", str(img_dir)])
    assert "category id 77" in err and "add it to 'categories'" in err


def test_check_data_cli_counts(tmp_path, capsys):
    anns = [_a(1, [1, 2, 10, 20]), _a(1, [5, 5, 0, 10]), _a(2, [0, 0, 9, 9], iscrowd=1)]
    ann, img_dir = _write(tmp_path, {"annotations": anns})
    out = tmp_path / "counts.json"
    with pytest.raises(SystemExit) as exc:
        main(["check-data", "--ann", str(ann), "--images", str(img_dir), "--json", str(out)])
    assert exc.value.code == 0
    counts = json.loads(out.read_text())["counts"]
    assert counts["images"] == 3 and counts["boxes"] == 1
    assert counts["degenerate_boxes"] == 1 and counts["crowd_boxes"] == 1
    assert counts["empty_images"] == 2

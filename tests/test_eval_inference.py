"""Inference + evaluation: coordinates and categories mapped back exactly, CLI end to end."""

from __future__ import annotations

import json

import pytest
import torch

from dfmsd_cli.cli import main
from dfmsd_cli.data.coco import CocoDetection
from dfmsd_cli.data.geometry import Geometry
from dfmsd_cli.errors import UserError
from dfmsd_cli.eval import evaluate, predict
from dfmsd_cli.eval.inference import _to_coco
from dfmsd_cli.models.detector import DetectorOutput

GEOM = Geometry(img_scale=(128, 96))


def test_to_coco_maps_back_to_original_pixels_and_category_ids():
    det = {
        "boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0]]),
        "scores": torch.tensor([0.9]),
        "labels": torch.tensor([2]),
    }
    meta = {"image_id": 7, "orig_size": (200, 300), "size": (100, 150), "scale": 0.5}
    (rec,) = _to_coco(det, meta, {1: 11, 2: 13})
    assert rec["image_id"] == 7 and rec["category_id"] == 13
    assert rec["bbox"] == [20.0, 40.0, 40.0, 80.0]  # x, y, w, h in original pixels
    assert _to_coco({**det, "labels": torch.tensor([5])}, meta, {1: 11, 2: 13}) == []


def test_to_coco_hflip_view_maps_back():
    # A 150x100 resized image (scale 0.5 of 300x200): the box [10, 20, 30, 60] seen on the
    # hflip view is [120, 20, 140, 60]; both map to the same original box.
    meta = {"image_id": 1, "orig_size": (200, 300), "size": (100, 150), "scale": 0.5}
    det = {
        "boxes": torch.tensor([[120.0, 20.0, 140.0, 60.0]]),
        "scores": torch.tensor([0.5]),
        "labels": torch.tensor([1]),
    }
    (rec,) = _to_coco(det, {**meta, "view": "hflip"}, {1: 3})
    assert rec["bbox"] == [20.0, 40.0, 40.0, 80.0]
    # boxes past the image are clipped to the original image
    (rec,) = _to_coco({**det, "boxes": torch.tensor([[-5.0, 90.0, 160.0, 120.0]])}, meta, {1: 3})
    assert rec["bbox"] == [0.0, 180.0, 300.0, 20.0]


def test_masks_resized_to_original_and_rle_encoded():
    from pycocotools import mask as mask_utils

    # resized 48x64 (h, w) inside a padded 64x64 canvas, original 96x128: a mask covering the
    # left half of the resized image must cover the left half (64 columns) of the original.
    probs = torch.zeros(1, 1, 64, 64)
    probs[0, 0, :48, :32] = 0.9
    probs[0, 0, 48:, :] = 1.0  # padding: must be dropped, not stretched into the image
    det = {
        "boxes": torch.tensor([[0.0, 0.0, 32.0, 48.0]]),
        "scores": torch.tensor([0.8]),
        "labels": torch.tensor([1]),
        "masks": probs,
    }
    meta = {"image_id": 5, "orig_size": (96, 128), "size": (48, 64), "scale": 0.5}
    (rec,) = _to_coco(det, meta, {1: 1})
    m = mask_utils.decode({**rec["segmentation"], "counts": rec["segmentation"]["counts"].encode()})
    assert m.shape == (96, 128)
    assert m[:, :64].all() and not m[:, 64:].any()
    assert rec["bbox"] == [0.0, 0.0, 64.0, 96.0]


class Oracle(torch.nn.Module):
    """Returns each image's ground truth (resized coordinates) as detections, in dataset order."""

    has_masks = False

    def __init__(self, dataset: CocoDetection, drop_every: int = 0) -> None:
        super().__init__()
        self.dataset = dataset
        self.next = 0
        self.drop_every = drop_every

    def forward(self, images, image_sizes, targets=None):
        dets = []
        for _ in image_sizes:
            s = self.dataset.get(self.next, "orig")
            self.next += 1
            boxes, labels = s["boxes"], s["labels"]
            if self.drop_every and self.next % self.drop_every == 0:
                boxes, labels = boxes[:0], labels[:0]
            det = {"boxes": boxes, "scores": torch.ones(len(labels)), "labels": labels}
            if self.has_masks:
                det["masks"] = s["masks"][: len(labels), None].float()
            dets.append(det)
        return DetectorOutput(losses={}, detections=dets, features={})


def _val(root):
    return root / "annotations" / "instances_val2017.json", root / "val2017"


def test_ground_truth_as_detections_scores_ap_one(synthetic_root, tmp_path):
    ann, images = _val(synthetic_root)
    ds = CocoDetection(ann, images, geometry=GEOM, train=False)
    metrics = evaluate(
        Oracle(ds),
        ann,
        images,
        geometry=GEOM,
        batch_size=2,
        out=tmp_path / "r.json",
        progress=False,
    )
    assert metrics["bbox"]["mAP"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["bbox"]["mAR"] == pytest.approx(1.0, abs=1e-6)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["bbox"]["AP50"] == pytest.approx(1.0, abs=1e-6)
    assert len(json.loads((tmp_path / "r.bbox.json").read_text())) == saved["detections"]


def test_ground_truth_masks_score_segm(synthetic_root):
    # Ground-truth masks at the resized size, pasted back to the original size: every object
    # is found at IoU 0.5; the resize round trip blurs edges, so strict IoUs may lose a little.
    ann, images = _val(synthetic_root)
    ds = CocoDetection(ann, images, geometry=GEOM, train=False, with_masks=True)
    oracle = Oracle(ds)
    oracle.has_masks = True
    metrics = evaluate(oracle, ann, images, geometry=GEOM, progress=False)
    assert metrics["bbox"]["mAP"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["segm"]["AP50"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["segm"]["mAP"] > 0.8  # measured 0.905 on this fixture


def test_labels_written_through_given_categories(synthetic_root):
    # predict maps label L to categories[L-1]["id"]: the checkpoint's mapping, not the order of
    # the dataset. Feeding the oracle's labels through a rotated mapping must break every match.
    ann, images = _val(synthetic_root)
    ds = CocoDetection(ann, images, geometry=GEOM, train=False)
    cats = ds.categories
    rotated = cats[1:] + cats[:1]
    results, ids = predict(Oracle(ds), ds, batch_size=2, categories=rotated, progress=False)
    labels = [s["labels"] for s in (ds.get(i, "orig") for i in range(len(ds.image_ids)))]
    expected = [rotated[int(lab) - 1]["id"] for lab_t in labels for lab in lab_t]
    assert [r["category_id"] for r in results] == expected
    assert ids == list(ds.image_ids)
    metrics = evaluate(Oracle(ds), ann, images, geometry=GEOM, categories=rotated, progress=False)
    assert metrics["bbox"]["mAP"] == 0.0


def test_missing_images_lower_recall(synthetic_root):
    ann, images = _val(synthetic_root)
    ds = CocoDetection(ann, images, geometry=GEOM, train=False)
    metrics = evaluate(Oracle(ds, drop_every=2), ann, images, geometry=GEOM, progress=False)
    assert 0.0 < metrics["bbox"]["mAR"] < 1.0


def _ckpt(synthetic_root, tmp_path):
    from dfmsd_cli.engine.train import TrainOptions, train

    out = tmp_path / "run"
    train(
        TrainOptions(
            model="retina_tiny",
            data=synthetic_root,
            out=out,
            epochs=1,
            img_scale=(128, 96),
            num_workers=0,
            evaluate=False,
            max_steps=1,
        )
    )
    return out / "model.pth"


def test_eval_cli_end_to_end(synthetic_root, tmp_path, capsys):
    ckpt = _ckpt(synthetic_root, tmp_path)
    out = tmp_path / "res.json"
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "eval",
                str(ckpt),
                "--data",
                str(synthetic_root),
                "--json",
                str(out),
                "--num-workers",
                "0",
            ]
        )
    assert exc.value.code in (0, None)
    res = json.loads(out.read_text())
    assert set(res["bbox"]) == {
        "mAP",
        "AP50",
        "AP75",
        "APs",
        "APm",
        "APl",
        "mAR",
        "ARs",
        "ARm",
        "ARl",
    }
    assert res["options"]["img_scale"] == [128, 96]  # the checkpoint's geometry
    assert "mAP" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--model", "retina_tiny"], "--random-weights"),
        (["--model", "retina_tinny", "--random-weights"], "retina_tiny"),
        ([], "nothing to evaluate"),
        (["--device", "cuda:7", "--model", "retina_tiny", "--random-weights"], "cuda"),
        (["--split", "val2071", "--model", "retina_tiny", "--random-weights"], "val2017"),
    ],
)
def test_eval_cli_errors(synthetic_root, args, needle, capsys):
    if needle == "cuda" and torch.cuda.device_count() > 7:
        pytest.skip("machine has 8 GPUs")
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--data", str(synthetic_root), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_evaluate_checkpoint_is_the_library_twin_of_eval(synthetic_root, tmp_path):
    from dfmsd_cli.eval.run import evaluate_checkpoint

    warned: list[str] = []
    out = tmp_path / "res.json"
    name, metrics = evaluate_checkpoint(
        data=synthetic_root,
        model="retina_tiny",
        random_weights=True,
        img_scale=(128, 96),
        num_workers=0,
        device="cpu",
        max_images=2,
        out=out,
        warn=warned.append,
    )
    assert name == "retina_tiny" and "mAP" in metrics["bbox"]
    assert json.loads(out.read_text())["options"]["max_images"] == 2
    assert len(warned) == 1 and "random weights" in warned[0]
    with pytest.raises(UserError, match="not both"):
        evaluate_checkpoint(tmp_path / "x.pth", data=synthetic_root, model="retina_tiny")

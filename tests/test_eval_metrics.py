"""COCO metrics against hand-computed cases (pycocotools' 101-point interpolated AP)."""

from __future__ import annotations

import json

import pytest

from dfmsd_cli.eval.metrics import PAPER_COLUMNS, coco_metrics, load_coco, metrics_table, write_json


def _gt(images, anns, cats=((1, "a"), (2, "b"))):
    """A COCO dict: images [(id, w, h)], anns [(image_id, cat, [x, y, w, h])]."""
    return load_coco(
        {
            "images": [
                {"id": i, "width": w, "height": h, "file_name": f"{i}.jpg"} for i, w, h in images
            ],
            "categories": [{"id": c, "name": n} for c, n in cats],
            "annotations": [
                {
                    "id": k + 1,
                    "image_id": img,
                    "category_id": cat,
                    "bbox": list(box),
                    "area": float(box[2] * box[3]),
                    "iscrowd": 0,
                }
                for k, (img, cat, box) in enumerate(anns)
            ],
        }
    )


def _det(img, cat, box, score):
    return {"image_id": img, "category_id": cat, "bbox": list(box), "score": score}


# One small (10x10 = 100 < 32^2), one medium (50x50), one large (200x200) object.
ANNS = [(1, 1, (5, 5, 10, 10)), (1, 2, (100, 100, 50, 50)), (2, 1, (20, 30, 200, 200))]


def test_perfect_detections_give_one():
    gt = _gt([(1, 400, 300), (2, 400, 300)], ANNS)
    dets = [_det(img, cat, box, 0.9) for img, cat, box in ANNS]
    m = coco_metrics(gt, dets)
    assert list(m) == list(PAPER_COLUMNS)
    for col in PAPER_COLUMNS:
        assert m[col] == pytest.approx(1.0), col
    assert dets[0] == _det(1, 1, (5, 5, 10, 10), 0.9)  # input not mutated by loadRes


def test_no_detections_give_zero():
    gt = _gt([(1, 400, 300), (2, 400, 300)], ANNS)
    m = coco_metrics(gt, [])
    for col in PAPER_COLUMNS:
        assert m[col] == 0.0, col


def test_partial_case_hand_computed():
    # Two large GT of class 1; detections: one exact match (score .9), one false positive (.8).
    # Ranked: TP -> (P=1, R=1/2), FP -> (P=1/2, R=1/2). Interpolated precision (running max
    # from the right) is 1 up to recall 1/2 and 0 beyond (recall never exceeds 1/2).
    # The 101 recall points 0, .01, ..., .50 (51 of them) get precision 1, the 50 others 0:
    # AP = 51/101 at every IoU threshold (the match is exact), AR = 1/2.
    gt = _gt([(1, 640, 480)], [(1, 1, (0, 0, 200, 200)), (1, 1, (300, 200, 200, 200))])
    dets = [_det(1, 1, (0, 0, 200, 200), 0.9), _det(1, 1, (420, 0, 200, 150), 0.8)]
    m = coco_metrics(gt, dets)
    for col in ("mAP", "AP50", "AP75", "APl"):
        assert m[col] == pytest.approx(51 / 101), col
    assert m["mAR"] == pytest.approx(0.5)
    assert m["ARl"] == pytest.approx(0.5)
    # no small/medium ground truth: COCOeval's -1 ("undefined"), kept as is
    assert m["APs"] == -1.0 and m["ARm"] == -1.0


def test_iou_thresholds_hand_computed():
    # Det [0,0,62,100] vs GT [0,0,100,100]: IoU = 6200/10000 = 0.62 -> a true positive at
    # IoU thresholds .50, .55, .60 and a miss at .65 ... .95: mAP = 3/10, AP50 = 1, AP75 = 0.
    gt = _gt([(1, 300, 300)], [(1, 1, (0, 0, 100, 100))])
    m = coco_metrics(gt, [_det(1, 1, (0, 0, 62, 100), 0.5)])
    assert m["AP50"] == pytest.approx(1.0)
    assert m["AP75"] == pytest.approx(0.0)
    assert m["mAP"] == pytest.approx(0.3)
    assert m["mAR"] == pytest.approx(0.3)


def test_wrong_category_is_a_miss():
    gt = _gt([(1, 300, 300)], [(1, 1, (0, 0, 100, 100))])
    m = coco_metrics(gt, [_det(1, 2, (0, 0, 100, 100), 0.9)])
    assert m["mAP"] == 0.0


def test_restricted_to_evaluated_images():
    # Image 2's object is not detected; evaluating image 1 alone must not count it as a miss.
    gt = _gt([(1, 400, 300), (2, 400, 300)], [(1, 1, (0, 0, 100, 100)), (2, 1, (0, 0, 100, 100))])
    dets = [_det(1, 1, (0, 0, 100, 100), 0.9)]
    assert coco_metrics(gt, dets)["mAR"] == pytest.approx(0.5)
    assert coco_metrics(gt, dets, image_ids=[1])["mAR"] == pytest.approx(1.0)


def test_segm_with_rle():
    import numpy as np
    from pycocotools import mask as mask_utils

    gt_dict = {
        "images": [{"id": 1, "width": 64, "height": 48}],
        "categories": [{"id": 1, "name": "a"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [10, 10, 20, 20],
                "area": 400.0,
                "iscrowd": 0,
                "segmentation": [[10, 10, 30, 10, 30, 30, 10, 30]],
            }
        ],
    }
    gt = load_coco(gt_dict)
    m = np.zeros((48, 64), np.uint8)
    m[10:30, 10:30] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode()
    det = {
        "image_id": 1,
        "category_id": 1,
        "score": 0.9,
        "segmentation": rle,
        "bbox": [10, 10, 20, 20],
    }
    assert coco_metrics(gt, [det], iou_type="segm")["AP50"] == pytest.approx(1.0)
    assert coco_metrics(gt, [], iou_type="segm")["AP50"] == 0.0


def test_table_and_json(tmp_path):
    metrics = {"bbox": dict.fromkeys(PAPER_COLUMNS, 0.5) | {"APs": -1.0}}
    table = metrics_table(metrics)
    assert [c.header for c in table.columns] == ["type", *PAPER_COLUMNS]
    cells = [list(c.cells) for c in table.columns]
    assert cells[1] == ["50.0"] and cells[4] == ["-"]
    path = write_json(tmp_path / "m.json", metrics)
    assert json.loads(path.read_text()) == metrics

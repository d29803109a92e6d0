"""Cascade Mask R-CNN (cmr_*): MMDetection structure, one-pass contract, tiny train/infer."""

from __future__ import annotations

import pytest
import torch

from dfmsd_cli.models import build_model, get_spec
from dfmsd_cli.models.cascade import ExactAnchorGenerator
from dfmsd_cli.models.cascade_heads import PyramidRoIAlign

SIZES = [(96, 128), (80, 112)]


def _targets():
    masks = torch.zeros(2, 96, 128, dtype=torch.uint8)
    masks[0, 12:58, 12:48] = 1
    masks[1, 20:90, 50:120] = 1
    return [
        {
            "boxes": torch.tensor([[12.0, 12, 48, 58]]),
            "labels": torch.tensor([2]),
            "masks": masks[:1],
        },
        {
            "boxes": torch.tensor([[50.0, 20, 110, 78]]),
            "labels": torch.tensor([1]),
            "masks": masks[1:, :80, :112],
        },
    ]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("cmr_tiny", num_classes=3)


def test_structure_matches_mmdetection():
    with torch.device("meta"):
        m = build_model("cmr_r101", num_classes=80)
    h = m.roi_heads
    assert h.iou_thresholds == (0.5, 0.6, 0.7)
    assert h.stage_loss_weights == (1.0, 0.5, 0.25)
    weights = [c.weights for c in h.box_coders]
    assert weights[0] == (10.0, 10.0, 5.0, 5.0)
    assert weights[1] == (20.0, 20.0, 10.0, 10.0)
    assert weights[2] == pytest.approx((1 / 0.033, 1 / 0.033, 1 / 0.067, 1 / 0.067))
    for s in range(3):
        bh = h.box_heads[s]
        assert bh.fc6.weight.shape == (1024, 256 * 7 * 7) and bh.fc7.weight.shape == (1024, 1024)
        assert bh.cls_score.out_features == 81 and bh.bbox_pred.out_features == 4
        assert h.mask_heads[s].conv_logits.out_channels == 80
    assert h.box_roi_pool.aligned and h.box_roi_pool.sampling_ratio == 0
    assert m.strides == (4, 8, 16, 32, 64) and m.has_masks
    spec = get_spec("cmr_r101")
    assert spec.published_ap == 42.9 and spec.checkpoint.endswith("befdf6ee.pth")


def test_exact_anchors_are_not_rounded():
    gen = ExactAnchorGenerator(((32,),), ((0.5, 1.0, 2.0),), (4,))
    base = gen.generate_anchors([32], [0.5, 1.0, 2.0])
    w = base[:, 2] - base[:, 0]
    assert w.tolist() == pytest.approx([32 * 2**0.5, 32.0, 32 / 2**0.5])


def test_roi_level_mapping_is_mmdetection_finest_scale_56():
    pool = PyramidRoIAlign((4, 8, 16, 32))
    sizes = torch.tensor([10.0, 111.0, 112.0, 224.0, 448.0, 2000.0])
    rois = torch.zeros(len(sizes), 5)
    rois[:, 3] = sizes
    rois[:, 4] = sizes
    assert pool.map_levels(rois).tolist() == [0, 0, 1, 2, 3, 3]


def test_train_step_losses_and_features(model):
    model.train()
    calls = []
    handle = model.backbone.register_forward_hook(lambda *a: calls.append(1))
    images = torch.randn(2, 3, 96, 128)
    out = model(images, SIZES, _targets())
    handle.remove()
    assert len(calls) == 1
    assert {f"s{s}.loss_{n}" for s in range(3) for n in ("cls", "bbox", "mask")} <= set(out.losses)
    assert {"loss_objectness", "loss_rpn_box_reg"} <= set(out.losses)
    assert {s: tuple(f.shape[-2:]) for s, f in out.features.items()} == {
        4: (24, 32),
        8: (12, 16),
        16: (6, 8),
        32: (3, 4),
        64: (2, 2),
    }
    loss = sum(out.losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    for s in range(3):
        assert model.roi_heads.box_heads[s].fc6.weight.grad is not None
        assert model.roi_heads.mask_heads[s].conv_logits.weight.grad is not None


def test_inference_detections_and_masks(model):
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 96, 128), SIZES)
    assert out.losses == {}
    for det, (h, w) in zip(out.detections, SIZES, strict=True):
        n = len(det["boxes"])
        assert 0 < n <= 100
        assert det["labels"].min() >= 1 and det["labels"].max() <= 3
        assert det["masks"].shape == (n, 1, h, w)
        assert det["boxes"][:, 2].max() <= w and det["boxes"][:, 3].max() <= h
        assert torch.all(det["scores"] > 0.05)


def test_scores_average_stage_logits_before_softmax(model):
    """MMDetection averages the stages' raw cls scores, then applies one softmax."""
    model.eval()
    heads = model.roi_heads
    feats = [torch.randn(1, 64, 96 // s, 128 // s) for s in (4, 8, 16, 32)]
    props = [torch.tensor([[10.0, 10, 60, 50], [30, 20, 90, 80]])]
    # the last stage's deltas are zero, so the final boxes are stage 2's refined rois
    with torch.no_grad():
        for s in range(3):
            heads.box_heads[s].bbox_pred.weight.zero_()
            heads.box_heads[s].bbox_pred.bias.zero_()
        heads.score_thresh = 0.0
        dets, _ = heads(feats, props, [(96, 128)])
        pooled = heads.box_roi_pool(feats, torch.cat([torch.zeros(2, 1), props[0]], 1))
        logits = sum(heads.box_heads[s](pooled)[0] for s in range(3)) / 3
    heads.score_thresh = 0.05
    expected = torch.softmax(logits, -1)[:, 1:]
    top = dets[0]["scores"].max()
    assert top == pytest.approx(expected.max().item(), rel=1e-5)


@pytest.mark.parametrize("name", ["cmr_tiny", "gfl_tiny", "mmfcos_tiny", "mmretina_tiny"])
def test_images_without_objects_train_and_empty_predictions(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=3).train()
    images = torch.randn(2, 3, 64, 64)
    empty = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.long),
        "masks": torch.zeros(0, 64, 64, dtype=torch.uint8),
    }
    out = model(images, [(64, 64), (64, 64)], [empty, dict(empty)])
    loss = sum(out.losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    model.eval()
    # nothing passes the score threshold: empty detections (with empty masks for cmr)
    (model.roi_heads if hasattr(model, "roi_heads") else model).score_thresh = 1.0
    with torch.no_grad():
        dets = model(images, [(64, 64), (64, 64)]).detections
    assert len(dets) == 2 and all(len(d["boxes"]) == 0 for d in dets)
    if name == "cmr_tiny":
        assert dets[0]["masks"].shape == (0, 1, 64, 64)


def test_targets_without_masks_train_boxes_only(model):
    model.train()
    targets = [{k: v for k, v in t.items() if k != "masks"} for t in _targets()]
    out = model(torch.randn(2, 3, 96, 128), SIZES, targets)
    assert "s0.loss_cls" in out.losses and not any("mask" in k for k in out.losses)


def test_predict_masks_off_gives_boxes_only(model):
    model.eval()
    model.predict_masks = False
    try:
        with torch.no_grad():
            det = model(torch.randn(1, 3, 96, 128), [(96, 128)]).detections[0]
    finally:
        model.predict_masks = True
    assert len(det["boxes"]) > 0 and "masks" not in det

"""The Detector contract: every head with the tiny backbone trains a step and predicts, and one
forward pass gives losses/detections plus the FPN features from exactly one backbone call."""

from __future__ import annotations

import math

import pytest
import torch

from dfmsd_cli.models import DetectorOutput, build_model

H, W = 80, 112  # not multiples of 32: map sizes must still be ceil(H / s)
SIZES = [(80, 112), (64, 90)]


def _targets(with_masks: bool = False) -> list[dict]:
    t0 = {"boxes": torch.tensor([[8.0, 10.0, 60.0, 70.0], [70.0, 5.0, 100.0, 30.0]]),
          "labels": torch.tensor([1, 3])}  # fmt: skip
    t1 = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    if with_masks:
        m = torch.zeros(2, *SIZES[0], dtype=torch.uint8)
        m[0, 10:70, 8:60] = 1
        m[1, 5:30, 70:100] = 1
        t0["masks"] = m
        t1["masks"] = torch.zeros(0, *SIZES[1], dtype=torch.uint8)
    return [t0, t1]


def _count_backbone_calls(model) -> list[int]:
    calls = [0]
    inner = model.backbone.forward

    def counting(x):
        calls[0] += 1
        return inner(x)

    model.backbone.forward = counting  # instance attribute: this model only, no global hook
    return calls


# fewer proposals/detections keep the R-CNN tests fast (and exercise option routing)
RCNN_SMALL = {
    "rpn_pre_nms_top_n_train": 200,
    "rpn_post_nms_top_n_train": 100,
    "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 50,
    "box_batch_size_per_image": 64,
    "box_detections_per_img": 20,
}


@pytest.fixture(scope="module", params=["retina", "fcos", "frcnn", "mrcnn"])
def model(request):
    torch.manual_seed(0)
    opts = RCNN_SMALL if request.param in ("frcnn", "mrcnn") else {"detections_per_img": 20}
    return build_model(f"{request.param}_tiny", num_classes=3, **opts)


def test_train_step_features_and_one_backbone_pass(model):
    model.train()
    calls = _count_backbone_calls(model)
    images = torch.randn(2, 3, H, W)
    out = model(images, SIZES, _targets(with_masks=model.has_masks))
    assert isinstance(out, DetectorOutput)
    assert calls[0] == 1
    assert out.detections == []
    assert out.losses and all(torch.isfinite(v) for v in out.losses.values())
    if model.has_masks:
        assert "loss_mask" in out.losses
    assert tuple(out.features) == model.strides
    for s, f in out.features.items():
        assert f.shape == (2, model.out_channels, math.ceil(H / s), math.ceil(W / s))
    loss = sum(out.losses.values())
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads[:3]) and any(
        g.abs().sum() > 0 for g in grads if g is not None
    )
    # the features are the ones the losses were computed from (same graph)
    assert out.features[model.strides[0]].requires_grad


def test_eval_detections_and_features_one_pass(model):
    model.eval()
    calls = _count_backbone_calls(model)
    images = torch.randn(2, 3, H, W)
    with torch.no_grad():
        out = model(images, SIZES)
    assert calls[0] == 1
    assert out.losses == {}
    assert len(out.detections) == 2
    for det, (h, w) in zip(out.detections, SIZES, strict=True):
        n = det["boxes"].shape[0]
        assert det["scores"].shape == (n,) and det["labels"].shape == (n,)
        if n:
            assert det["labels"].min() >= 1 and det["labels"].max() <= 3
            assert det["boxes"][:, 2].max() <= w and det["boxes"][:, 3].max() <= h
        if model.has_masks:
            assert det["masks"].shape == (n, 1, h, w)
            assert n == 0 or (0 <= det["masks"].min() and det["masks"].max() <= 1)
    assert {s: tuple(f.shape[-2:]) for s, f in out.features.items()} == {
        s: (math.ceil(H / s), math.ceil(W / s)) for s in model.strides
    }
    # extract_features == the features of the full pass
    with torch.no_grad():
        feats = model.extract_features(images)
    for s in model.strides:
        torch.testing.assert_close(feats[s], out.features[s])


def test_contract_attributes(model):
    assert model.num_classes == 3
    assert model.name.endswith("_tiny")
    assert model.out_channels == 64
    assert model.strides in ((8, 16, 32, 64, 128), (4, 8, 16, 32, 64))


def test_mrcnn_trains_boxes_only_without_mask_annotations():
    model = build_model("mrcnn_tiny", num_classes=3, **RCNN_SMALL).train()
    out = model(torch.randn(2, 3, H, W), SIZES, _targets(with_masks=False))
    assert "loss_mask" not in out.losses and "loss_classifier" in out.losses
    model.eval()
    with torch.no_grad():
        det = model(torch.randn(1, 3, H, W), SIZES[:1]).detections[0]
    assert "masks" in det  # the mask branch is back on


def test_targets_required_in_train_mode():
    model = build_model("retina_tiny", num_classes=2).train()
    with pytest.raises(ValueError, match="targets"):
        model(torch.randn(1, 3, 64, 64), [(64, 64)])


def test_autocast_losses_and_boxes_are_float32(model):
    """AMP-safe: losses and detection boxes stay float32 under autocast (bf16 on CPU here)."""
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, H, W), SIZES, _targets(with_masks=model.has_masks))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.losses.values())
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        det = model(torch.randn(1, 3, H, W), SIZES[:1]).detections[0]
    assert det["boxes"].dtype == torch.float32 and det["scores"].dtype == torch.float32

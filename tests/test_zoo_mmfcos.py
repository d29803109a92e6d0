"""MMDetection-faithful FCOS (mmfcos_*), caffe-style ResNet, and FCOS R101-caffe import."""

from __future__ import annotations

import pytest
import torch
from test_zoo_convert import _conv, _t, mmdet_fpn, mmdet_resnet

from dfmsd_cli.data.geometry import IMAGENET_MEAN, IMAGENET_STD
from dfmsd_cli.models import build_model
from dfmsd_cli.models.convert import convert_state_dict
from dfmsd_cli.models.mmdet_heads import MMDetExtraConvs
from dfmsd_cli.models.mmfcos import CAFFE_MEAN_BGR, CaffeStemConv


def test_caffe_stem_sees_bgr_minus_caffe_mean():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 7, 2, 3, bias=False)
    stem = CaffeStemConv(conv)
    stem.weight.data.copy_(conv.weight.data)
    raw = torch.rand(1, 3, 16, 16) * 255
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    caffe = raw.flip(1) - torch.tensor(CAFFE_MEAN_BGR).view(1, 3, 1, 1)
    assert torch.allclose(stem((raw - mean) / std), conv(caffe), atol=1e-3)
    assert "in_mean" not in stem.state_dict()


def test_caffe_resnet_strides_on_conv1():
    with torch.device("meta"):
        m = build_model("mmfcos_r101_caffe", num_classes=80)
    body = m.backbone.body
    for name in ("layer2", "layer3", "layer4"):
        block = getattr(body, name)[0]
        assert block.conv1.stride == (2, 2) and block.conv2.stride == (1, 1)
    extra = m.backbone.fpn.extra_blocks
    assert isinstance(extra, MMDetExtraConvs) and extra.source == "output" and extra.relu_before


def test_fcos_targets_regress_ranges_and_smallest_box():
    model = build_model("mmfcos_tiny", num_classes=3)
    feats = [torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 4, 4)]
    model.strides = (8, 16)
    points = model.points(feats)
    assert points[0][0].tolist() == [4.0, 4.0] and points[1][0].tolist() == [8.0, 8.0]
    boxes = torch.tensor([[0.0, 0, 40, 40], [0, 0, 20, 20]])
    labels, dist = model.targets_for(points, boxes, torch.tensor([0, 2]))
    # level 0 point (4, 4): inside both, max distance 36 / 16 <= 64 -> the smaller box (label 2)
    assert labels[0].item() == 2 and dist[0].tolist() == [4.0, 4.0, 16.0, 16.0]
    # level 1 point (8, 8): max distances 32 and 12 are below its range (64, 128] -> background
    assert labels[64].item() == 3


def test_mmfcos_tiny_trains_and_predicts():
    torch.manual_seed(0)
    model = build_model("mmfcos_tiny", num_classes=3)
    images = torch.randn(2, 3, 96, 128)
    targets = [
        {"boxes": torch.tensor([[12.0, 12, 48, 58]]), "labels": torch.tensor([2])},
        {"boxes": torch.tensor([[50.0, 20, 120, 90]]), "labels": torch.tensor([1])},
    ]
    out = model.train()(images, [(96, 128), (90, 120)], targets)
    assert set(out.losses) == {"loss_cls", "loss_bbox", "loss_centerness"}
    assert all(torch.isfinite(v) for v in out.losses.values())
    sum(out.losses.values()).backward()
    assert model.head.conv_centerness.weight.grad is not None
    model.eval()
    with torch.no_grad():
        model.head.conv_cls.bias.fill_(2.0)
        out = model(images, [(96, 128), (90, 120)])
    det = out.detections[0]
    assert 0 < len(det["boxes"]) <= 100 and det["labels"].min() >= 1
    assert torch.all(det["scores"] <= torch.sigmoid(torch.tensor(2.0)) + 1e-3)  # x centerness


def mmdet_fcos_head(num_classes=80, device="meta"):
    sd = {}
    for branch in ("cls_convs", "reg_convs"):
        for i in range(4):
            _conv(sd, f"bbox_head.{branch}.{i}.conv", 256, 256, 3, device, bias=False)
            sd[f"bbox_head.{branch}.{i}.gn.weight"] = _t((256,), device)
            sd[f"bbox_head.{branch}.{i}.gn.bias"] = _t((256,), device)
    _conv(sd, "bbox_head.conv_cls", num_classes, 256, 3, device)
    _conv(sd, "bbox_head.conv_reg", 4, 256, 3, device)
    _conv(sd, "bbox_head.conv_centerness", 1, 256, 3, device)
    for i in range(5):
        sd[f"bbox_head.scales.{i}.scale"] = _t((), device)
    return sd


def test_mmdet_fcos_r101_caffe_converts_strictly():
    src = {
        **mmdet_resnet(101),
        **mmdet_fpn([512, 1024, 2048], num_extra_convs=2, extra_in=256),
        **mmdet_fcos_head(),
    }
    with torch.device("meta"):
        target = build_model("mmfcos_r101_caffe", num_classes=80).state_dict()
    out, report = convert_state_dict(src, target, "mmfcos_r101_caffe")
    assert report.ok, report.summary()
    assert out["head.conv_centerness.weight"].shape == (1, 256, 3, 3)


def test_extra_convs_relu_only_before_p7():
    """MMDetection ``FPN`` (``relu_before_extra_convs=True``): P6 = conv(P5), P7 = conv(relu(P6)).

    Hand-built 1-channel convs: P6's conv sums its 3x3 window (weights 1, bias 0) and P7's conv
    copies its centre tap. With P5 = -1 everywhere, a ReLU before P6 would give P6 = 0.
    """
    extra = MMDetExtraConvs(1, 1, source="output", relu_before=True)
    with torch.no_grad():
        extra.p6.weight.fill_(1.0)
        extra.p6.bias.zero_()
        extra.p7.weight.zero_()
        extra.p7.weight[0, 0, 1, 1] = 1.0
        extra.p7.bias.fill_(0.5)
    p5 = -torch.ones(1, 1, 4, 4)
    outs, names = extra([p5], [torch.zeros(1, 1, 4, 4)], ["p5"])
    assert names == ["p5", "p6", "p7"]
    # stride 2, pad 1 on 4x4: output (0,0) sees a 2x2 window, (0,1)/(1,0) 2x3, (1,1) 3x3
    assert outs[1].tolist() == [[[[-4.0, -6.0], [-6.0, -9.0]]]]
    # P7 = relu(P6) centre tap + 0.5; relu(P6) is 0 everywhere
    assert outs[2].tolist() == [[[[0.5]]]]
    # without the flag P7 sees P6 itself: centre tap of the 2x2 map at stride 2 = P6[0,0]
    extra.relu_before = False
    assert extra([p5], [p5], ["p5"])[0][2].tolist() == [[[[-3.5]]]]


@pytest.mark.slow  # builds five full-size R50/R101 detectors
def test_caffe_mean_follows_the_mmdetection_config():
    """MMDetection's caffe configs subtract two different means: FCOS the Detectron one
    [102.9801, 115.9465, 122.7717], RetinaNet / Faster / Cascade R-CNN [103.53, 116.28,
    123.675] (``data_preprocessor.mean``, BGR, std 1)."""
    want = {
        "mmfcos_r50_caffe": [102.9801, 115.9465, 122.7717],
        "cmr_r50_caffe": [103.53, 116.28, 123.675],
        "cmr_r101_caffe": [103.53, 116.28, 123.675],
        "mmretina_r50_caffe": [103.53, 116.28, 123.675],
        "mmfrcnn_r101_caffe": [103.53, 116.28, 123.675],
    }
    for name, mean in want.items():
        stem = build_model(name, num_classes=2).backbone.body.conv1
        assert isinstance(stem, CaffeStemConv)
        assert stem.caffe_mean.flatten().tolist() == pytest.approx(mean), name

"""GFL: QFL / DFL / GIoU / ATSS on toy inputs with hand-computed values, model and import."""

from __future__ import annotations

import math

import pytest
import torch
from test_zoo_convert import _conv, _t, mmdet_fpn, mmdet_resnet

from dfmsd_cli.models import build_model
from dfmsd_cli.models.convert import convert_state_dict
from dfmsd_cli.models.gfl_losses import (
    atss_assign,
    distribution_focal_loss,
    giou_loss,
    integral,
    quality_focal_loss,
)

LOG2 = math.log(2.0)


def test_quality_focal_loss_hand_values():
    pred = torch.tensor([[0.0, 0.0], [2.0, -1.0]])
    labels = torch.tensor([0, 2])  # second sample: background (label == K)
    scores = torch.tensor([0.8, 0.0])
    loss = quality_focal_loss(pred, labels, scores)
    # sample 0: class 1 negative: BCE(0, 0) * 0.5^2; class 0 positive: BCE(0, 0.8) * |0.8-0.5|^2
    expected0 = LOG2 * 0.25 + LOG2 * 0.09
    # sample 1: both negative: softplus(x) * sigmoid(x)^2
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731
    expected1 = softplus(2.0) * sig(2.0) ** 2 + softplus(-1.0) * sig(-1.0) ** 2
    assert loss.tolist() == pytest.approx([expected0, expected1], rel=1e-6)


def test_distribution_focal_loss_hand_values():
    uniform = torch.zeros(1, 17)
    assert distribution_focal_loss(uniform, torch.tensor([2.5])).item() == pytest.approx(
        math.log(17)
    )
    peaked = torch.zeros(1, 17)
    peaked[0, 2] = 10.0
    z = math.exp(10) + 16
    left, right = -math.log(math.exp(10) / z), -math.log(1 / z)
    got = distribution_focal_loss(peaked, torch.tensor([2.25])).item()
    assert got == pytest.approx(0.75 * left + 0.25 * right, rel=1e-6)
    exact = distribution_focal_loss(peaked, torch.tensor([2.0])).item()
    assert exact == pytest.approx(left, abs=1e-6)


def test_giou_loss_hand_values():
    a = torch.tensor([[0.0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 2, 2]])
    b = torch.tensor([[0.0, 0, 1, 1], [2, 0, 3, 1], [1, 1, 3, 3]])
    expected = [0.0, 1 + 1 / 3, 1 - 1 / 7 + 2 / 9]
    assert giou_loss(a, b).tolist() == pytest.approx(expected, abs=1e-6)


def test_integral_is_expected_bin():
    project = torch.linspace(0, 16, 17)
    reg = torch.zeros(1, 68)
    reg[0, 17 + 5] = 50.0  # second side: all mass on bin 5
    assert integral(reg, project)[0].tolist() == pytest.approx([8.0, 5.0, 8.0, 8.0], abs=1e-4)


def test_atss_assigns_only_above_mean_plus_std_and_inside():
    centres = torch.tensor([[0.0, 0], [8, 0], [0, 8], [8, 8]])
    anchors = torch.cat([centres - 4, centres + 4], dim=1)
    gt = torch.tensor([[2.0, 2, 10, 10]])
    labels, targets = atss_assign(anchors, [4], gt, torch.tensor([1]), num_classes=3, topk=9)
    # IoUs 4/124, 12/116, 12/116, 36/92: mean + std = 0.31, only the last passes
    assert labels.tolist() == [3, 3, 3, 1]
    assert torch.equal(targets[3], gt[0]) and not targets[:3].any()
    empty, _ = atss_assign(anchors, [4], torch.zeros(0, 4), torch.zeros(0), num_classes=3)
    assert empty.tolist() == [3, 3, 3, 3]


def test_atss_picks_highest_iou_box_for_shared_anchor():
    centres = torch.tensor([[0.0, 0], [8, 0], [0, 8], [8, 8]])
    anchors = torch.cat([centres - 4, centres + 4], dim=1)
    gts = torch.tensor([[2.0, 2, 10, 10], [4.0, 4, 12, 12]])  # the 2nd equals anchor 3
    labels, targets = atss_assign(anchors, [4], gts, torch.tensor([0, 2]), num_classes=3)
    assert labels[3].item() == 2 and torch.equal(targets[3], gts[1])


def test_gfl_tiny_trains_and_predicts():
    torch.manual_seed(0)
    model = build_model("gfl_tiny", num_classes=3)
    assert model.head.gfl_reg.out_channels == 68
    assert model.head.integral.project.tolist() == list(range(17))
    images = torch.randn(2, 3, 96, 128)
    targets = [
        {"boxes": torch.tensor([[12.0, 12, 48, 58]]), "labels": torch.tensor([2])},
        {"boxes": torch.tensor([[50.0, 20, 120, 90]]), "labels": torch.tensor([1])},
    ]
    model.train()
    out = model(images, [(96, 128), (90, 120)], targets)
    assert set(out.losses) == {"loss_cls", "loss_bbox", "loss_dfl"}
    assert all(torch.isfinite(v) and v > 0 for v in out.losses.values())
    sum(out.losses.values()).backward()
    assert model.head.scales[0].scale.grad is not None
    model.eval()
    with torch.no_grad():
        model.head.gfl_cls.bias.fill_(2.0)  # make scores pass the threshold
        out = model(images, [(96, 128), (90, 120)])
    det = out.detections[1]
    assert 0 < len(det["boxes"]) <= 100
    assert det["labels"].min() >= 1 and det["labels"].max() <= 3
    assert det["boxes"][:, 2].max() <= 120 and det["boxes"][:, 3].max() <= 90
    assert tuple(out.features) == (8, 16, 32, 64, 128)


def mmdet_gfl_head(num_classes=80, device="meta"):
    sd = {}
    for branch in ("cls_convs", "reg_convs"):
        for i in range(4):
            _conv(sd, f"bbox_head.{branch}.{i}.conv", 256, 256, 3, device, bias=False)
            sd[f"bbox_head.{branch}.{i}.gn.weight"] = _t((256,), device)
            sd[f"bbox_head.{branch}.{i}.gn.bias"] = _t((256,), device)
    _conv(sd, "bbox_head.gfl_cls", num_classes, 256, 3, device)
    _conv(sd, "bbox_head.gfl_reg", 68, 256, 3, device)
    for i in range(5):
        sd[f"bbox_head.scales.{i}.scale"] = _t((), device)
    sd["bbox_head.integral.project"] = _t((17,), device)
    return sd


@pytest.mark.parametrize(("name", "groups"), [("gfl_r101", 1), ("gfl_x101_32x4d", 32)])
def test_mmdet_gfl_converts_strictly(name, groups):
    src = {
        **mmdet_resnet(101, groups),
        **mmdet_fpn([512, 1024, 2048], num_extra_convs=2, extra_in=256),
        **mmdet_gfl_head(),
    }
    with torch.device("meta"):
        target = build_model(name, num_classes=80).state_dict()
    out, report = convert_state_dict(src, target, name)
    assert report.ok, report.summary()
    assert out["head.cls_convs.3.norm.weight"].shape == (256,)
    assert out["head.integral.project"].shape == (17,)

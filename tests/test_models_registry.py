"""Registry: names, errors with suggestions, option routing, big backbones on the meta device."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torchvision.models import detection as tv_det

from dfmsd_cli.errors import UserError
from dfmsd_cli.models import (
    build_model,
    get_spec,
    list_models,
    parse_options,
    register_backbone,
    register_head,
)
from dfmsd_cli.models import registry as reg
from dfmsd_cli.models.backbones import build_resnet_fpn, build_tiny_fpn
from dfmsd_cli.models.dense import RetinaDetector
from dfmsd_cli.models.registry import _SkipMetaInit  # fast meta builds (no weight init)

HEADS = ("retina", "fcos", "frcnn", "mrcnn")
BACKBONES = ("r18", "r34", "r50", "r101", "x101", "x101_32x4d", "tiny")


def test_all_names_registered():
    names = set(list_models())
    assert {f"{h}_{b}" for h in HEADS for b in BACKBONES} <= names
    spec = get_spec("frcnn_x101_32x4d")
    assert (spec.head, spec.backbone, spec.strides, spec.channels) == (
        "frcnn", "x101_32x4d", (4, 8, 16, 32, 64), 256,
    )  # fmt: skip
    assert get_spec("retina_tiny").strides == (8, 16, 32, 64, 128)
    assert get_spec("mrcnn_r50").has_masks and not get_spec("frcnn_r50").has_masks
    assert list_models("fcos_*") == sorted(n for n in names if n.startswith("fcos_"))


def test_unknown_name_suggests_close_matches():
    with pytest.raises(UserError, match=r"unknown model 'retina_r5'.*did you mean: .*retina_r50"):
        get_spec("retina_r5")
    with pytest.raises(UserError, match="dfmsd models"):
        build_model("nonsense", 3)


def test_bad_num_classes_and_unknown_option():
    with pytest.raises(UserError, match="num_classes"):
        build_model("retina_tiny", 0)
    with pytest.raises(UserError, match="unknown option.*colour.*valid options"):
        build_model("retina_tiny", 2, colour="red")
    with pytest.raises(UserError, match="unknown norm"):
        build_model("retina_r18", 2, norm="layer")
    with pytest.raises(UserError, match="frozen_stages"):
        build_model("retina_r18", 2, frozen_stages=7)


def test_options_are_routed_and_recorded():
    model = build_model("retina_tiny", 2, score_thresh=0.3, fpn_channels=32)
    assert model.score_thresh == 0.3 and model.out_channels == 32
    assert model.options == {"score_thresh": 0.3, "fpn_channels": 32}
    assert model.head.classification_head.conv[0][1].__class__.__name__ == "GroupNorm"
    assert parse_options(["norm=gn", "frozen_stages=-1", "score_thresh=0.5", "x=true"]) == {
        "norm": "gn", "frozen_stages": -1, "score_thresh": 0.5, "x": True,
    }  # fmt: skip
    with pytest.raises(UserError, match="KEY=VALUE"):
        parse_options(["norm"])


def test_frozen_stages_and_norms():
    with torch.device("meta"), _SkipMetaInit():
        bb = build_resnet_fpn("r18", (8, 16, 32, 64, 128), "p6p7")  # MMDetection defaults
        scratch = build_resnet_fpn(
            "r18", (4, 8, 16, 32, 64), "maxpool", norm="gn", frozen_stages=-1
        )
    body = bb.body
    assert not any(p.requires_grad for p in body.conv1.parameters())
    assert not any(p.requires_grad for p in body.layer1.parameters())
    assert all(p.requires_grad for p in body.layer2.parameters())
    assert type(body.bn1).__name__ == "FrozenBatchNorm2d"
    assert all(p.requires_grad for p in scratch.parameters())
    assert isinstance(scratch.body.bn1, torch.nn.GroupNorm)


def test_tiny_backbone_is_small():
    bb = build_tiny_fpn((8, 16, 32, 64, 128), "p6p7")
    n_body = sum(p.numel() for p in bb.body.parameters())
    assert 100_000 < n_body < 500_000
    assert all(isinstance(m, torch.nn.GroupNorm) for n, m in bb.body.named_modules() if "gn" in n)


@pytest.mark.parametrize(
    ("arch", "tv_builder"),
    [
        ("r18", torchvision.models.resnet18),
        ("r34", torchvision.models.resnet34),
        ("r50", torchvision.models.resnet50),
        ("r101", torchvision.models.resnet101),
        ("x101", torchvision.models.resnext101_64x4d),
        ("x101_32x4d", None),
    ],
)
def test_big_trunks_match_torchvision_layout_on_meta(arch, tv_builder):
    """Our trunks (built on the meta device, never run) have torchvision's keys and shapes."""
    with torch.device("meta"), _SkipMetaInit():
        ours = build_resnet_fpn(arch, (8, 16, 32, 64, 128), "p6p7", norm="bn").body
        if tv_builder is None:
            block = torchvision.models.resnet.Bottleneck
            ref = torchvision.models.ResNet(block, [3, 4, 23, 3], groups=32, width_per_group=4)
        else:
            ref = tv_builder()
    ref_shapes = {k: v.shape for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in ours.state_dict().items()} == ref_shapes


@pytest.mark.parametrize(
    ("name", "tv_builder"),
    [
        ("retina_r50", tv_det.retinanet_resnet50_fpn),
        ("fcos_r50", tv_det.fcos_resnet50_fpn),
        ("frcnn_r50", tv_det.fasterrcnn_resnet50_fpn),
        ("mrcnn_r50", tv_det.maskrcnn_resnet50_fpn),
    ],
)
def test_r50_detectors_match_torchvision_state_dict(name, tv_builder):
    """Same keys/shapes as torchvision's COCO models, so --weights torchvision loads."""
    with torch.device("meta"), _SkipMetaInit():
        ours = build_model(name, 90)  # 90 + background = torchvision's 91 outputs
        ref = tv_builder(weights=None, weights_backbone=None, num_classes=91)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items() if "num_batches_tracked" not in k
    }
    assert get_spec(name).num_parameters(90) == sum(p.numel() for p in ours.parameters())


def test_parameter_counts_are_cheap_and_consistent():
    spec = get_spec("retina_tiny")
    model = build_model("retina_tiny", 80)
    assert spec.num_parameters() == sum(p.numel() for p in model.parameters())
    assert get_spec("retina_r101").num_parameters() > get_spec("retina_r50").num_parameters()


def test_register_new_backbone_and_head(monkeypatch):
    monkeypatch.setattr(reg, "_BACKBONES", dict(reg._BACKBONES))
    monkeypatch.setattr(reg, "_HEADS", dict(reg._HEADS))
    monkeypatch.setattr(reg, "_SPEC_CACHE", {})

    def mini(strides, extra, width: int = 32):
        return build_tiny_fpn(strides, extra, fpn_channels=width)

    register_backbone("mini", mini, channels=32, description="test")
    register_head("toy", RetinaDetector, strides=(8, 16, 32, 64, 128), description="toy")
    assert {"retina_mini", "toy_mini", "toy_tiny"} <= set(list_models())
    model = build_model("toy_mini", 2, width=16, head_norm="gn")
    assert model.out_channels == 16 and model.name == "toy_mini"
    with pytest.raises(ValueError, match="must not contain"):
        register_head("a_b", RetinaDetector, strides=(8,))


def test_register_one_off_model(monkeypatch):
    monkeypatch.setattr(reg, "_MODELS", dict(reg._MODELS))
    monkeypatch.setattr(reg, "_SPEC_CACHE", {})

    def builder(num_classes: int, fpn_channels: int = 32):
        backbone = build_tiny_fpn((8, 16, 32, 64, 128), "p6p7", fpn_channels=fpn_channels)
        return RetinaDetector(backbone, num_classes)

    reg.register_model(
        "special_net", builder, head="retina", backbone="tiny",
        strides=(8, 16, 32, 64, 128), channels=32, published_ap=12.5, checkpoint="s.pth",
    )  # fmt: skip
    spec = get_spec("special_net")
    assert (spec.published_ap, spec.checkpoint) == (12.5, "s.pth")
    model = build_model("special_net", 4, fpn_channels=16)
    assert model.name == "special_net" and model.options == {"fpn_channels": 16}
    assert model.out_channels == 16 and spec.num_parameters(4) > 0

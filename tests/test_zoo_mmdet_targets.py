"""``dfmsd convert mmdet`` converts only into models that reproduce MMDetection's forward.

Key names cannot tell torchvision's Faster R-CNN from MMDetection's, nor a caffe-style ResNet
from a pytorch-style one: these checks refuse such targets by model name and by the config
text an MMDetection checkpoint stores in ``meta`` (measured effect: ``tools/mmdet_parity.py``).
"""

from __future__ import annotations

import pytest
import torch

from dfmsd_cli.errors import UserError
from dfmsd_cli.models.convert import convert_mmdet


@pytest.mark.parametrize(
    "model, right",
    [
        ("frcnn_r50", "mmfrcnn_r50"),
        ("mrcnn_swin_t", "mmmrcnn_swin_t"),
        ("mrcnn_swin_s", "mmmrcnn_swin_s"),
        ("retina_r50", "mmretina_r50"),
        ("fcos_r50", "mmfcos_r50_caffe"),  # MMDetection's GN-head FCOS configs are caffe-style
        ("fcos_r101", "mmfcos_r101_caffe"),
        ("fcos_x101", "mmfcos_x101"),  # fcos_x101-64x4d_fpn_gn-head: pytorch style
    ],
)
def test_convert_refuses_torchvision_layouts_naming_the_right_model(tmp_path, model, right):
    from typer.testing import CliRunner

    from dfmsd_cli.cli import app

    src = tmp_path / "any.pth"
    torch.save({"state_dict": {"backbone.conv1.weight": torch.zeros(1)}}, src)
    with pytest.raises(UserError, match=rf"use --model {right}\b"):
        convert_mmdet(src, model)
    out = tmp_path / "w"
    res = CliRunner().invoke(app, ["convert", "mmdet", str(src), "-m", model, "-o", str(out)])
    assert isinstance(res.exception, UserError) and right in str(res.exception)
    assert not (out / f"{model}.pth").exists()


def test_published_ap_only_on_models_that_reproduce_it():
    from dfmsd_cli.models.catalog import describe_models
    from dfmsd_cli.models.convert.mmdet import MMDET_HEADS

    rows = {r["name"]: r for r in describe_models(num_classes=None)}
    for name in ("mrcnn_swin_t", "mrcnn_swin_s"):
        assert rows[name]["published_ap"] is None and rows[name]["checkpoint"] is None
    assert rows["mmmrcnn_swin_t"]["published_ap"] == 42.7
    assert rows["mmfcos_r101_caffe"]["published_ap"] == 40.8
    for name, row in rows.items():
        ckpt = row["checkpoint"]
        if ckpt and not ckpt.startswith("torchvision:"):  # an MMDetection model-zoo file
            assert row["head"] in MMDET_HEADS, name


@pytest.mark.parametrize(
    "cfg, model, needle",
    [
        (
            "backbone=dict(type='ResNet', depth=50, style='caffe')",
            "mmfcos_r50",
            "use --model mmfcos_r50_caffe$",
        ),
        (
            "backbone=dict(type='ResNet', depth=101, style='pytorch')",
            "cmr_r101_caffe",
            "use --model cmr_r101$",
        ),
        (
            "bbox_head=dict(type='FCOSHead', norm_on_bbox=True)",
            "mmfcos_r50_caffe",
            "sets norm_on_bbox=True",
        ),
        (
            "bbox_head=dict(centerness_on_reg=True)",
            "mmfcos_r101_caffe",
            "sets centerness_on_reg=True",
        ),
    ],
)
def test_stored_config_catches_what_keys_cannot(tmp_path, cfg, model, needle):
    """Caffe vs pytorch ResNets and FCOS's norm_on_bbox have identical keys: the config that
    MMDetection stores in ``meta`` (3.x ``cfg``, 2.x ``config``) tells them apart."""
    src = tmp_path / "m.pth"
    for key in ("cfg", "config"):
        torch.save(
            {"state_dict": {"x": torch.zeros(1)}, "meta": {key: f"model = dict({cfg})"}}, src
        )
        with pytest.raises(UserError, match=needle):
            convert_mmdet(src, model)

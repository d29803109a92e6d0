"""Checkpoints: round trip, strict loading errors, rebuild without --model, torchvision weights
(offline error, COCO class remapping) -- all with tiny models and no network."""

from __future__ import annotations

import urllib.error

import pytest
import torch

from dfmsd_cli.data.geometry import Geometry
from dfmsd_cli.errors import UserError
from dfmsd_cli.models import build_model
from dfmsd_cli.models import pretrained as tvw
from dfmsd_cli.models.checkpoint import (
    build_from_checkpoint,
    load_weights,
    make_checkpoint,
    save_checkpoint,
)

CATS = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}]


def _same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_round_trip_rebuilds_without_model_name(tmp_path):
    torch.manual_seed(0)
    model = build_model("fcos_tiny", 2, score_thresh=0.1)
    geo = Geometry(img_scale=(128, 96))
    path = save_checkpoint(tmp_path / "m.pth", model, categories=CATS, geometry=geo, epoch=3)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["format"] == "dfmsd" and ckpt["model"] == "fcos_tiny" and ckpt["num_classes"] == 2
    rebuilt, meta = build_from_checkpoint(path)
    assert _same(model, rebuilt) and not rebuilt.training
    assert rebuilt.score_thresh == 0.1
    assert meta["categories"] == CATS and meta["epoch"] == 3
    assert Geometry.from_dict(meta["geometry"]) == geo
    assert "state_dict" not in meta
    x = torch.randn(1, 3, 64, 96)
    model.eval()
    with torch.no_grad():
        a, b = model(x, [(64, 96)]), rebuilt(x, [(64, 96)])
    torch.testing.assert_close(a.features[8], b.features[8])


def test_load_weights_dfmsd_and_plain_state_dict(tmp_path):
    src = build_model("retina_tiny", 2)
    dst = build_model("retina_tiny", 2)
    save_checkpoint(tmp_path / "c.pth", src, categories=CATS)
    meta = load_weights(dst, tmp_path / "c.pth")
    assert _same(src, dst) and meta["model"] == "retina_tiny"
    torch.save({"module." + k: v for k, v in src.state_dict().items()}, tmp_path / "ddp.pth")
    load_weights(build_model("retina_tiny", 2), tmp_path / "ddp.pth")  # DDP prefix stripped


def test_checkpoint_of_other_architecture_or_class_count(tmp_path):
    save_checkpoint(tmp_path / "f.pth", build_model("fcos_tiny", 2))
    with pytest.raises(UserError, match=r"checkpoint of fcos_tiny with 2 classes.*retina_tiny"):
        load_weights(build_model("retina_tiny", 2), tmp_path / "f.pth")
    with pytest.raises(UserError, match=r"fcos_tiny with 2 classes.*fcos_tiny with 5 classes"):
        load_weights(build_model("fcos_tiny", 5), tmp_path / "f.pth")


def test_checkpoint_with_other_options_names_them(tmp_path):
    save_checkpoint(tmp_path / "c32.pth", build_model("retina_tiny", 2, fpn_channels=32))
    with pytest.raises(UserError, match=r"shape mismatches .*options \{'fpn_channels': 32\}"):
        load_weights(build_model("retina_tiny", 2), tmp_path / "c32.pth")
    model, _ = build_from_checkpoint(tmp_path / "c32.pth")
    assert model.options == {"fpn_channels": 32} and model.out_channels == 32


def test_plain_state_dict_mismatch_lists_keys(tmp_path):
    sd = build_model("retina_tiny", 2).state_dict()
    sd.pop("head.regression_head.bbox_reg.weight")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "sd.pth")
    with pytest.raises(UserError) as err:
        load_weights(build_model("retina_tiny", 2), tmp_path / "sd.pth")
    msg = str(err.value)
    assert "1 missing keys (head.regression_head.bbox_reg.weight)" in msg
    assert "1 unexpected keys (extra.weight)" in msg and "\n" not in msg
    torch.save(build_model("retina_tiny", 4).state_dict(), tmp_path / "k4.pth")
    with pytest.raises(UserError, match=r"2 shape mismatches .*cls_logits.weight \(45, 64"):
        load_weights(build_model("retina_tiny", 2), tmp_path / "k4.pth")
    torch.save(build_model("frcnn_tiny", 2).state_dict(), tmp_path / "fr.pth")
    with pytest.raises(UserError, match=r"missing keys .*\+\d+\).*unexpected keys"):
        load_weights(build_model("retina_tiny", 2), tmp_path / "fr.pth")


def test_unreadable_missing_and_plain_file_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_weights(build_model("retina_tiny", 2), tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        load_weights(build_model("retina_tiny", 2), tmp_path / "junk.pth")
    torch.save(build_model("retina_tiny", 2).state_dict(), tmp_path / "plain.pth")
    with pytest.raises(UserError, match="--model NAME --weights"):
        build_from_checkpoint(tmp_path / "plain.pth")
    torch.save(
        {"state_dict": {"neck.lateral_convs.0.conv.weight": torch.zeros(1)}}, tmp_path / "mm"
    )
    with pytest.raises(UserError, match="dfmsd convert mmdet"):
        load_weights(build_model("retina_tiny", 2), tmp_path / "mm")


def test_torchvision_weights_offline_is_a_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    model = build_model("retina_r18", 2)
    with pytest.raises(
        UserError, match=r"cannot download torchvision weights .*resnet18.*--weights"
    ):
        load_weights(model, "torchvision")
    with pytest.raises(UserError, match="no pretrained weights for retina_tiny"):
        load_weights(build_model("retina_tiny", 2), "torchvision")


def test_torchvision_coco_weights_remap_classes(monkeypatch):
    """A fake 91-class file in torchvision's layout (retina_tiny stands in for retina_r50)."""
    torch.manual_seed(0)
    coco = build_model("retina_tiny", 90)  # 91 outputs per anchor, like torchvision
    sd = coco.state_dict()
    w = sd["head.classification_head.cls_logits.weight"]
    for a in range(9):
        for c in range(91):
            w[a * 91 + c] = c  # row value = COCO class index
    monkeypatch.setitem(tvw.TORCHVISION_DETECTION, "retina_tiny", tvw.TORCHVISION_BACKBONE["r18"])
    monkeypatch.setattr(tvw, "download_state_dict", lambda weights: dict(sd))

    model = build_model("retina_tiny", 2)
    cats = [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}]
    meta = load_weights(model, "torchvision", categories=cats)
    assert meta["classes"] == "coco"
    got = model.head.classification_head.cls_logits.weight.view(9, 3, -1)[:, :, 0]
    assert torch.equal(got, torch.tensor([[0.0, 18.0, 1.0]] * 9))
    torch.testing.assert_close(model.backbone.body.conv1.weight, coco.backbone.body.conv1.weight)

    other = build_model("retina_tiny", 2)
    before = other.head.classification_head.cls_logits.weight.clone()
    meta = load_weights(other, "torchvision", categories=CATS)  # not COCO classes
    assert meta["classes"] == "random"
    assert torch.equal(other.head.classification_head.cls_logits.weight, before)
    torch.testing.assert_close(
        other.head.regression_head.bbox_reg.weight, coco.head.regression_head.bbox_reg.weight
    )


def test_remap_rcnn_box_predictor_rows():
    t = torch.arange(91 * 4, dtype=torch.float32).view(91 * 4, 1)
    out = tvw.remap_classes(t, [0, 5], groups=1, per_class=4)
    assert out.view(-1).tolist() == [0.0, 1.0, 2.0, 3.0, 20.0, 21.0, 22.0, 23.0]
    assert tvw.coco_label_index([{"id": 3, "name": "car"}]) == [0, 3]
    assert tvw.coco_label_index([{"id": 3, "name": "truck"}]) is None


def test_make_checkpoint_on_wrapped_model():
    model = build_model("retina_tiny", 2)
    wrapper = torch.nn.Module()
    wrapper.module = model
    ckpt = make_checkpoint(wrapper, categories=CATS)
    assert ckpt["model"] == "retina_tiny" and not any(
        k.startswith("module.") for k in ckpt["state_dict"]
    )

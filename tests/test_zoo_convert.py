"""MMDetection -> dfmsd checkpoint conversion.

The MMDetection-format state dicts are generated here from MMDetection 3.3's module structure
(``ResNet``/``ResNeXt``, ``FPN``, ``RPNHead``, ``CascadeRoIHead`` with ``Shared2FCBBoxHead`` and
``FCNMaskHead``, ``RetinaHead``): exact key names and shapes, values random (or on the ``meta``
device for the R101/X101 teachers, where only keys and shapes are compared).
"""

from __future__ import annotations

import re

import pytest
import torch

from dfmsd_cli.errors import UserError
from dfmsd_cli.models import build_model
from dfmsd_cli.models.convert import convert_mmdet, convert_state_dict
from dfmsd_cli.models.convert.mmdet_keys import (
    background_first,
    background_per_anchor,
    prepend_background,
    unfold_to_original_norm,
    unfold_to_original_reduction,
)

K = 80
DEPTHS = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}


def _t(shape, device):
    return (
        torch.randn(shape, device=device) if device != "meta" else torch.empty(shape, device="meta")
    )


def _bn(sd, prefix, c, device):
    for leaf in ("weight", "bias", "running_mean", "running_var"):
        sd[f"{prefix}.{leaf}"] = _t((c,), device)
    sd[f"{prefix}.num_batches_tracked"] = torch.zeros((), dtype=torch.long, device=device)


def _conv(sd, prefix, cout, cin, k, device, bias=True):
    sd[f"{prefix}.weight"] = _t((cout, cin, k, k), device)
    if bias:
        sd[f"{prefix}.bias"] = _t((cout,), device)


def mmdet_resnet(depth=50, groups=1, base_width=4, device="meta"):
    """``mmdet.models.backbones.ResNet/ResNeXt`` (pytorch style) keys under ``backbone.``."""
    sd: dict[str, torch.Tensor] = {}
    _conv(sd, "backbone.conv1", 64, 3, 7, device, bias=False)
    _bn(sd, "backbone.bn1", 64, device)
    inplanes = 64
    for i, n in enumerate(DEPTHS[depth]):
        planes = 64 * 2**i
        width = planes if groups == 1 else (planes * base_width // 64) * groups
        out = planes * 4
        for j in range(n):
            p = f"backbone.layer{i + 1}.{j}"
            _conv(sd, f"{p}.conv1", width, inplanes, 1, device, bias=False)
            _bn(sd, f"{p}.bn1", width, device)
            _conv(sd, f"{p}.conv2", width, width // groups, 3, device, bias=False)
            _bn(sd, f"{p}.bn2", width, device)
            _conv(sd, f"{p}.conv3", out, width, 1, device, bias=False)
            _bn(sd, f"{p}.bn3", out, device)
            if j == 0:
                _conv(sd, f"{p}.downsample.0", out, inplanes, 1, device, bias=False)
                _bn(sd, f"{p}.downsample.1", out, device)
            inplanes = out
    return sd


def mmdet_fpn(in_channels, num_extra_convs=0, extra_in=256, device="meta"):
    sd: dict[str, torch.Tensor] = {}
    for i, c in enumerate(in_channels):
        _conv(sd, f"neck.lateral_convs.{i}.conv", 256, c, 1, device)
        _conv(sd, f"neck.fpn_convs.{i}.conv", 256, 256, 3, device)
    for e in range(num_extra_convs):
        _conv(
            sd,
            f"neck.fpn_convs.{len(in_channels) + e}.conv",
            256,
            extra_in if e == 0 else 256,
            3,
            device,
        )
    return sd


def mmdet_rpn(device="meta"):
    sd: dict[str, torch.Tensor] = {}
    _conv(sd, "rpn_head.rpn_conv", 256, 256, 3, device)
    _conv(sd, "rpn_head.rpn_cls", 3, 256, 1, device)
    _conv(sd, "rpn_head.rpn_reg", 12, 256, 1, device)
    return sd


def mmdet_cascade(num_classes=K, fc=1024, c=256, device="meta"):
    sd: dict[str, torch.Tensor] = {}
    for s in range(3):
        b = f"roi_head.bbox_head.{s}"
        sd[f"{b}.shared_fcs.0.weight"] = _t((fc, c * 49), device)
        sd[f"{b}.shared_fcs.0.bias"] = _t((fc,), device)
        sd[f"{b}.shared_fcs.1.weight"] = _t((fc, fc), device)
        sd[f"{b}.shared_fcs.1.bias"] = _t((fc,), device)
        sd[f"{b}.fc_cls.weight"] = _t((num_classes + 1, fc), device)
        sd[f"{b}.fc_cls.bias"] = _t((num_classes + 1,), device)
        sd[f"{b}.fc_reg.weight"] = _t((4, fc), device)
        sd[f"{b}.fc_reg.bias"] = _t((4,), device)
        m = f"roi_head.mask_head.{s}"
        for k in range(4):
            _conv(sd, f"{m}.convs.{k}.conv", c, c, 3, device)
        sd[f"{m}.upsample.weight"] = _t((c, c, 2, 2), device)  # ConvTranspose2d: (in, out, k, k)
        sd[f"{m}.upsample.bias"] = _t((c,), device)
        _conv(sd, f"{m}.conv_logits", num_classes, c, 1, device)
    return sd


def mmdet_frcnn_head(num_classes=K, device="meta"):
    sd: dict[str, torch.Tensor] = {}
    b = "roi_head.bbox_head"
    sd[f"{b}.shared_fcs.0.weight"] = _t((1024, 256 * 49), device)
    sd[f"{b}.shared_fcs.0.bias"] = _t((1024,), device)
    sd[f"{b}.shared_fcs.1.weight"] = _t((1024, 1024), device)
    sd[f"{b}.shared_fcs.1.bias"] = _t((1024,), device)
    sd[f"{b}.fc_cls.weight"] = _t((num_classes + 1, 1024), device)
    sd[f"{b}.fc_cls.bias"] = _t((num_classes + 1,), device)
    sd[f"{b}.fc_reg.weight"] = _t((num_classes * 4, 1024), device)
    sd[f"{b}.fc_reg.bias"] = _t((num_classes * 4,), device)
    return sd


def mmdet_retina_head(num_classes=K, device="meta"):
    sd: dict[str, torch.Tensor] = {}
    for i in range(4):
        _conv(sd, f"bbox_head.cls_convs.{i}.conv", 256, 256, 3, device)
        _conv(sd, f"bbox_head.reg_convs.{i}.conv", 256, 256, 3, device)
    _conv(sd, "bbox_head.retina_cls", 9 * num_classes, 256, 3, device)
    _conv(sd, "bbox_head.retina_reg", 9 * 4, 256, 3, device)
    return sd


def mmdet_cmr(depth=101, groups=1, base_width=4, device="meta"):
    return {
        **mmdet_resnet(depth, groups, base_width, device),
        **mmdet_fpn([256, 512, 1024, 2048], device=device),
        **mmdet_rpn(device),
        **mmdet_cascade(device=device),
    }


def _target(name, **options):
    with torch.device("meta"):
        return build_model(name, num_classes=K, **options).state_dict()


# ------------------------------------------------------------------------- full teachers
@pytest.mark.parametrize(
    ("name", "depth", "groups"), [("cmr_r101", 101, 1), ("cmr_x101", 101, 64), ("cmr_r50", 50, 1)]
)
def test_cascade_teachers_convert_strictly(name, depth, groups):
    src = mmdet_cmr(depth, groups)
    target = _target(name)
    out, report = convert_state_dict(src, target, name)
    assert report.ok, report.summary()
    assert set(out) == {k for k in target if not k.endswith("num_batches_tracked")}
    assert all(out[k].shape == target[k].shape for k in out)
    assert len(report.ignored) == sum(k.endswith("num_batches_tracked") for k in src)


def test_x101_32x4d_differs_from_64x4d():
    src = mmdet_cmr(101, 32)
    assert convert_state_dict(src, _target("cmr_x101_32x4d"))[1].ok
    _, report = convert_state_dict(src, _target("cmr_x101"))
    assert report.mismatched and not report.ok


def test_faster_rcnn_student_fc_reg_gets_background_rows():
    src = {
        **mmdet_resnet(50),
        **mmdet_fpn([256, 512, 1024, 2048]),
        **mmdet_rpn(),
        **mmdet_frcnn_head(),
    }
    out, report = convert_state_dict(src, _target("frcnn_r50"))
    assert report.ok, report.summary()
    assert out["roi_heads.box_predictor.bbox_pred.weight"].shape == (324, 1024)


def test_retina_head_keys_map_with_background_column():
    src = mmdet_retina_head(device="cpu")
    target = _target("retina_r50")
    out, report = convert_state_dict(src, target)
    assert not report.unmapped and not report.mismatched, report.summary()
    w_src, w = src["bbox_head.retina_cls.weight"], out["head.classification_head.cls_logits.weight"]
    assert w.shape[0] == 9 * (K + 1)
    per = w.view(9, K + 1, 256, 3, 3)
    assert torch.equal(per[:, 1:], w_src.view(9, K, 256, 3, 3)) and not per[:, 0].any()
    b = out["head.classification_head.cls_logits.bias"].view(9, K + 1)
    assert torch.all(b[:, 0] == -20.0)


def test_missing_keys_are_refused_unless_allowed(tmp_path):
    torch.manual_seed(0)
    sd = to_mmdet_layout(build_model("cmr_tiny", num_classes=3).state_dict())
    del sd["roi_head.bbox_head.2.fc_cls.weight"]
    sd["some.extra.weight"] = torch.zeros(3)
    path = tmp_path / "m.pth"
    torch.save({"state_dict": sd, "meta": {}}, path)
    with pytest.raises(UserError, match=r"roi_heads.box_heads.2.cls_score.weight.*--allow-partial"):
        convert_mmdet(path, "cmr_tiny")
    ckpt, report = convert_mmdet(path, "cmr_tiny", allow_partial=True)
    assert report.unmapped == ["some.extra.weight"]
    assert report.missing == ["roi_heads.box_heads.2.cls_score.weight"]
    assert ckpt["converted_from"]["partial"] is True
    assert ckpt["state_dict"]["roi_heads.box_heads.2.cls_score.weight"].shape == (4, 256)
    model = build_model("cmr_tiny", num_classes=3)
    model.load_state_dict(ckpt["state_dict"], strict=True)  # still a complete checkpoint


# ------------------------------------------------------------------ value-level transforms
def test_background_row_moves_first():
    w = torch.arange(4.0)[:, None].expand(4, 2)  # rows fg0 fg1 fg2 bg
    assert background_first(w, (4, 2))[:, 0].tolist() == [3.0, 0.0, 1.0, 2.0]
    assert prepend_background(4)(torch.ones(8, 3), (12, 3))[:4].abs().sum() == 0
    assert prepend_background(4)(torch.ones(8, 3), (8, 3)).shape == (8, 3)
    assert background_per_anchor(torch.ones(6), (9,)).tolist() == [-20, 1, 1, -20, 1, 1, -20, 1, 1]


def test_patch_merging_reorder_inverts_mmdet_unfold():
    """MMDetection's swin converter: ``correct_unfold_reduction_order`` (original -> unfold)."""
    out_c, c = 5, 3
    orig_w = torch.randn(out_c, 4 * c)
    orig_n = torch.randn(4 * c)

    def correct_unfold_reduction_order(x):
        o, i = x.shape
        x = x.reshape(o, 4, i // 4)
        return x[:, [0, 2, 1, 3], :].transpose(1, 2).reshape(o, i)

    def correct_unfold_norm_order(x):
        i = x.shape[0]
        x = x.reshape(4, i // 4)
        return x[[0, 2, 1, 3], :].transpose(0, 1).reshape(i)

    mm_w, mm_n = correct_unfold_reduction_order(orig_w), correct_unfold_norm_order(orig_n)
    assert torch.equal(unfold_to_original_reduction(mm_w, ()), orig_w)
    assert torch.equal(unfold_to_original_norm(mm_n, ()), orig_n)


# ------------------------------------------------------- converted == directly built (tiny)
def to_mmdet_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Write a dfmsd cmr state dict in MMDetection's key layout (the inverse mapping)."""
    out = {}
    for k, v in state.items():
        nk = k
        rules = [
            (r"^backbone\.body\.", "backbone."),
            (r"^backbone\.fpn\.inner_blocks\.(\d)\.0\.", r"neck.lateral_convs.\1.conv."),
            (r"^backbone\.fpn\.layer_blocks\.(\d)\.0\.", r"neck.fpn_convs.\1.conv."),
            (r"^rpn\.head\.conv\.0\.0\.", "rpn_head.rpn_conv."),
            (r"^rpn\.head\.cls_logits\.", "rpn_head.rpn_cls."),
            (r"^rpn\.head\.bbox_pred\.", "rpn_head.rpn_reg."),
            (r"^roi_heads\.box_heads\.(\d)\.fc6\.", r"roi_head.bbox_head.\1.shared_fcs.0."),
            (r"^roi_heads\.box_heads\.(\d)\.fc7\.", r"roi_head.bbox_head.\1.shared_fcs.1."),
            (r"^roi_heads\.box_heads\.(\d)\.cls_score\.", r"roi_head.bbox_head.\1.fc_cls."),
            (r"^roi_heads\.box_heads\.(\d)\.bbox_pred\.", r"roi_head.bbox_head.\1.fc_reg."),
            (
                r"^roi_heads\.mask_heads\.(\d)\.convs\.(\d)\.",
                r"roi_head.mask_head.\1.convs.\2.conv.",
            ),
            (r"^roi_heads\.mask_heads\.(\d)\.", r"roi_head.mask_head.\1."),
        ]
        for pat, rep in rules:
            nk, n = re.subn(pat, rep, nk)
            if n:
                break
        if ".fc_cls." in nk:
            v = v.roll(-1, dims=0)  # background last
        out[nk] = v.clone()
    return out


def test_converted_tiny_cascade_matches_direct(tmp_path):
    torch.manual_seed(0)
    direct = build_model("cmr_tiny", num_classes=3).eval()
    path = tmp_path / "mm.pth"
    torch.save({"state_dict": to_mmdet_layout(direct.state_dict()), "meta": {}}, path)
    ckpt, report = convert_mmdet(path, "cmr_tiny")
    assert report.ok, report.summary()
    assert ckpt["num_classes"] == 3 and ckpt["format"] == "dfmsd"
    loaded = build_model("cmr_tiny", num_classes=3).eval()
    loaded.load_state_dict(ckpt["state_dict"], strict=True)
    images = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        a, b = direct(images, [(96, 128)]), loaded(images, [(96, 128)])
    for s in a.features:
        assert torch.equal(a.features[s], b.features[s])
    da, db = a.detections[0], b.detections[0]
    assert len(da["boxes"]) > 0
    for key in ("boxes", "scores", "labels", "masks"):
        assert torch.equal(da[key], db[key]), key


def test_cli_convert_writes_loadable_checkpoint(tmp_path):
    from typer.testing import CliRunner

    from dfmsd_cli.cli import app

    torch.manual_seed(1)
    direct = build_model("cmr_tiny", num_classes=2)
    src = tmp_path / "mm.pth"
    torch.save({"state_dict": to_mmdet_layout(direct.state_dict())}, src)
    args = ["convert", "mmdet", str(src), "--model", "cmr_tiny", "--out", str(tmp_path / "w")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    out = tmp_path / "w" / "cmr_tiny.pth"  # --out is a folder: OUT/MODEL.pth
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["model"] == "cmr_tiny" and ckpt["converted_from"]["report"]["ok"]
    assert (tmp_path / "w" / "cmr_tiny.pth.report.json").is_file()
    res = CliRunner().invoke(app, args[:-1] + [str(tmp_path / "x.pth")])
    assert isinstance(res.exception, UserError) and "--out is a folder" in str(res.exception)
    from dfmsd_cli.models.checkpoint import build_from_checkpoint, load_weights

    meta = load_weights(build_model("cmr_tiny", num_classes=2), out)  # what --weights does
    assert len(meta["categories"]) == 2
    rebuilt, _ = build_from_checkpoint(out)
    assert torch.equal(
        rebuilt.roi_heads.box_heads[2].cls_score.weight,
        direct.roi_heads.box_heads[2].cls_score.weight,
    )
    res = CliRunner().invoke(app, args)  # refuses to overwrite
    assert res.exit_code != 0 and isinstance(res.exception, UserError)


def test_mmdet_retinanet_converts_strictly_to_mmretina_only():
    src = {
        **mmdet_resnet(101),
        **mmdet_fpn([512, 1024, 2048], num_extra_convs=2, extra_in=2048),
        **mmdet_retina_head(),
    }
    out, report = convert_state_dict(src, _target("mmretina_r101"))
    assert report.ok, report.summary()
    assert out["backbone.fpn.extra_blocks.p6.weight"].shape == (256, 2048, 3, 3)
    _, report = convert_state_dict(src, _target("retina_r101"))  # torchvision: P6 from P5
    assert [m.split(" ")[0] for m in report.mismatched] == ["neck.fpn_convs.3.conv.weight"]


def test_mmretina_levels_and_anchors():
    from dfmsd_cli.models.mmdet_heads import MMDetExtraConvs

    torch.manual_seed(0)
    model = build_model("mmretina_tiny", num_classes=2).eval()
    assert isinstance(model.backbone.fpn.extra_blocks, MMDetExtraConvs)
    x = torch.randn(1, 3, 128, 96)
    with torch.no_grad():
        feats = model.extract_features(x)
        c5 = model.backbone.body(x)["2"]
        p6 = model.backbone.fpn.extra_blocks.p6(c5)
        p7 = model.backbone.fpn.extra_blocks.p7(p6)  # no ReLU in between
    assert torch.allclose(feats[64], p6) and torch.allclose(feats[128], p7)
    sizes = model.anchor_generator.sizes[0]
    assert sizes[1] == pytest.approx(32 * 2 ** (1 / 3))  # not int()-truncated to 40
    with torch.no_grad():
        out = model(x, [(128, 96)])
    assert all(d["labels"].min() >= 1 for d in out.detections if len(d["labels"]))


def test_retina_checkpoint_into_torchvision_retina_suggests_mmretina(tmp_path):
    sd = {
        **mmdet_resnet(50, device="cpu"),
        **mmdet_fpn([512, 1024, 2048], num_extra_convs=2, extra_in=2048, device="cpu"),
        **mmdet_retina_head(device="cpu"),
    }
    path = tmp_path / "retina.pth"
    torch.save({"state_dict": sd, "meta": {}}, path)
    with pytest.raises(UserError, match="use --model mmretina_r50"):
        convert_mmdet(path, "retina_r50")
    ckpt, report = convert_mmdet(path, "mmretina_r50")
    assert report.ok and ckpt["num_classes"] == 80 and ckpt["categories"][0]["name"] == "person"


def retina_to_mmdet_layout(state: dict[str, torch.Tensor], anchors: int = 9) -> dict:
    """A dfmsd (mm)retina state dict in MMDetection's RetinaNet layout (background dropped)."""
    out = {}
    rules = [
        (r"^backbone\.body\.", "backbone."),
        (r"^backbone\.fpn\.inner_blocks\.(\d)\.0\.", r"neck.lateral_convs.\1.conv."),
        (r"^backbone\.fpn\.layer_blocks\.(\d)\.0\.", r"neck.fpn_convs.\1.conv."),
        (r"^backbone\.fpn\.extra_blocks\.p6\.", "neck.fpn_convs.3.conv."),
        (r"^backbone\.fpn\.extra_blocks\.p7\.", "neck.fpn_convs.4.conv."),
        (r"^head\.classification_head\.conv\.(\d)\.0\.", r"bbox_head.cls_convs.\1.conv."),
        (r"^head\.regression_head\.conv\.(\d)\.0\.", r"bbox_head.reg_convs.\1.conv."),
        (r"^head\.classification_head\.cls_logits\.", "bbox_head.retina_cls."),
        (r"^head\.regression_head\.bbox_reg\.", "bbox_head.retina_reg."),
    ]
    for k, v in state.items():
        nk = k
        for pat, rep in rules:
            nk, n = re.subn(pat, rep, nk)
            if n:
                break
        if nk.startswith("bbox_head.retina_cls."):
            per = v.reshape(anchors, -1, *v.shape[1:])[:, 1:]
            v = per.reshape(-1, *v.shape[1:])
        out[nk] = v.clone()
    return out


def test_converted_tiny_mmretina_matches_direct(tmp_path):
    torch.manual_seed(0)
    direct = build_model("mmretina_tiny", num_classes=3).eval()
    with torch.no_grad():
        bias = direct.head.classification_head.cls_logits.bias.view(9, 4)
        bias[:, 1:] = 0.0  # foreground scores ~0.5: detections to compare
        bias[:, 0] = -20.0
    path = tmp_path / "retina.pth"
    torch.save({"state_dict": retina_to_mmdet_layout(direct.state_dict())}, path)
    ckpt, report = convert_mmdet(path, "mmretina_tiny")
    assert report.ok, report.summary()
    loaded = build_model("mmretina_tiny", num_classes=3).eval()
    loaded.load_state_dict(ckpt["state_dict"], strict=True)
    images = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        da, db = (
            direct(images, [(96, 128)]).detections[0],
            loaded(images, [(96, 128)]).detections[0],
        )
    assert len(da["boxes"]) == 100
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(da[key], db[key]), key


class MessageHub:  # stands in for mmengine's objects pickled into MMDetection 3.x checkpoints
    def __init__(self):
        self.log = {"loss": [1.0]}


def test_checkpoint_with_foreign_objects_in_meta_loads_without_running_them(tmp_path):
    from dfmsd_cli.models.convert import load_mmdet_checkpoint

    torch.manual_seed(0)
    sd = to_mmdet_layout(build_model("cmr_tiny", num_classes=2).state_dict())
    path = tmp_path / "mm3.pth"
    meta = {"dataset_meta": {"classes": ("cat", "dog")}, "message_hub": MessageHub()}
    torch.save({"meta": meta, "state_dict": sd}, path)
    state, meta_out = load_mmdet_checkpoint(path)
    assert set(state) == set(sd)
    assert type(meta_out["message_hub"]).__name__ == "_Opaque"
    ckpt, _ = convert_mmdet(path, "cmr_tiny")
    assert [c["name"] for c in ckpt["categories"]] == ["cat", "dog"]

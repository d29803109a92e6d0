"""Swin-T/S + FPN backbones: shapes for both FPN layouts, MMDetection Swin Mask R-CNN import."""

from __future__ import annotations

import torch
from test_zoo_convert import _t, mmdet_fpn, mmdet_frcnn_head, mmdet_rpn

from dfmsd_cli.models import build_model
from dfmsd_cli.models.convert import convert_state_dict


def mmdet_swin(depths=(2, 2, 6, 2), heads=(3, 6, 12, 24), dim=96, device="meta"):
    """``mmdet.models.backbones.SwinTransformer`` keys (window 7, out_indices 0..3)."""
    sd = {
        "backbone.patch_embed.projection.weight": _t((dim, 3, 4, 4), device),
        "backbone.patch_embed.projection.bias": _t((dim,), device),
        "backbone.patch_embed.norm.weight": _t((dim,), device),
        "backbone.patch_embed.norm.bias": _t((dim,), device),
    }
    for i, (n, h) in enumerate(zip(depths, heads, strict=True)):
        d = dim * 2**i
        for j in range(n):
            b = f"backbone.stages.{i}.blocks.{j}"
            for norm in ("norm1", "norm2"):
                sd[f"{b}.{norm}.weight"] = _t((d,), device)
                sd[f"{b}.{norm}.bias"] = _t((d,), device)
            sd[f"{b}.attn.w_msa.relative_position_bias_table"] = _t((169, h), device)
            sd[f"{b}.attn.w_msa.relative_position_index"] = torch.zeros(
                (49, 49), dtype=torch.long, device=device
            )
            sd[f"{b}.attn.w_msa.qkv.weight"] = _t((3 * d, d), device)
            sd[f"{b}.attn.w_msa.qkv.bias"] = _t((3 * d,), device)
            sd[f"{b}.attn.w_msa.proj.weight"] = _t((d, d), device)
            sd[f"{b}.attn.w_msa.proj.bias"] = _t((d,), device)
            sd[f"{b}.ffn.layers.0.0.weight"] = _t((4 * d, d), device)
            sd[f"{b}.ffn.layers.0.0.bias"] = _t((4 * d,), device)
            sd[f"{b}.ffn.layers.1.weight"] = _t((d, 4 * d), device)
            sd[f"{b}.ffn.layers.1.bias"] = _t((d,), device)
        if i < 3:
            sd[f"backbone.stages.{i}.downsample.norm.weight"] = _t((4 * d,), device)
            sd[f"backbone.stages.{i}.downsample.norm.bias"] = _t((4 * d,), device)
            sd[f"backbone.stages.{i}.downsample.reduction.weight"] = _t((2 * d, 4 * d), device)
        sd[f"backbone.norm{i}.weight"] = _t((d,), device)
        sd[f"backbone.norm{i}.bias"] = _t((d,), device)
    return sd


def mmdet_mask_head(num_classes=80, device="meta"):
    sd = {}
    for k in range(4):
        sd[f"roi_head.mask_head.convs.{k}.conv.weight"] = _t((256, 256, 3, 3), device)
        sd[f"roi_head.mask_head.convs.{k}.conv.bias"] = _t((256,), device)
    sd["roi_head.mask_head.upsample.weight"] = _t((256, 256, 2, 2), device)
    sd["roi_head.mask_head.upsample.bias"] = _t((256,), device)
    sd["roi_head.mask_head.conv_logits.weight"] = _t((num_classes, 256, 1, 1), device)
    sd["roi_head.mask_head.conv_logits.bias"] = _t((num_classes,), device)
    return sd


def test_swin_fpn_shapes_both_layouts():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 128, 96)
    for name, strides in (
        ("mrcnn_swin_t", (4, 8, 16, 32, 64)),
        ("retina_swin_t", (8, 16, 32, 64, 128)),
    ):
        model = build_model(name, num_classes=3).eval()
        with torch.no_grad():
            feats = model.extract_features(x)
        assert tuple(feats) == strides
        for s, f in feats.items():
            assert f.shape == (1, 256, -(-128 // s), -(-96 // s))
    body = model.backbone.body
    assert [n.normalized_shape[0] for n in body.norms] == [96, 192, 384, 768]


def test_mmdet_swin_mask_rcnn_converts_strictly():
    for name, depths in (("mrcnn_swin_t", (2, 2, 6, 2)), ("mrcnn_swin_s", (2, 2, 18, 2))):
        src = {
            **mmdet_swin(depths),
            **mmdet_fpn([96, 192, 384, 768]),
            **mmdet_rpn(),
            **mmdet_frcnn_head(),
            **mmdet_mask_head(),
        }
        with torch.device("meta"):
            target = build_model(name, num_classes=80).state_dict()
        out, report = convert_state_dict(src, target, name)
        assert report.ok, report.summary()
        assert out["roi_heads.mask_predictor.mask_fcn_logits.weight"].shape[0] == 81
        assert sum("relative_position_index" in k for k in report.ignored) == sum(depths)


def test_mmdet_faithful_mask_rcnn_pools_aligned_and_shares_keys():
    from torchvision.ops import roi_align

    from dfmsd_cli.models.cascade import ExactAnchorGenerator
    from dfmsd_cli.models.mmrcnn import AlignedMultiScaleRoIAlign

    with torch.device("meta"):
        mm = build_model("mmmrcnn_swin_t", num_classes=80)
        tv = build_model("mrcnn_swin_t", num_classes=80)
    assert set(mm.state_dict()) == set(tv.state_dict())
    assert isinstance(mm.roi_heads.box_roi_pool, AlignedMultiScaleRoIAlign)
    assert isinstance(mm.roi_heads.mask_roi_pool, AlignedMultiScaleRoIAlign)
    assert isinstance(mm.rpn.anchor_generator, ExactAnchorGenerator)
    pool = AlignedMultiScaleRoIAlign(["4", "8", "16", "32"], 7, (4, 8, 16, 32))
    feats = {str(s): torch.randn(1, 2, 64 // s, 64 // s) for s in (4, 8, 16, 32)}
    box = torch.tensor([[3.0, 5.0, 40.0, 30.0]])  # sqrt(wh) = 30 -> level 0 (stride 4)
    ref = roi_align(feats["4"], [box], 7, 1 / 4, 0, aligned=True)
    assert torch.allclose(pool(feats, [box], [(64, 64)]), ref)

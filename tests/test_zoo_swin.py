"""Swin-T/S + FPN backbones: shapes for both FPN layouts, MMDetection Swin Mask R-CNN import."""

from __future__ import annotations

import copy
import re

import pytest
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
    # P3-P7 (retina): stage 1 feeds no level and has no norm (MMDetection out_indices 1..3)
    assert [getattr(n, "normalized_shape", [None])[0] for n in body.norms] == [None, 192, 384, 768]


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


def _unfold_order(t: torch.Tensor) -> torch.Tensor:
    """MMDetection ``swin_converter.correct_unfold_*`` (original Swin -> MMDetection order)."""
    if t.dim() == 2:
        o, i = t.shape
        return t.reshape(o, 4, i // 4)[:, [0, 2, 1, 3], :].transpose(1, 2).reshape(o, i)
    (i,) = t.shape
    return t.reshape(4, i // 4)[[0, 2, 1, 3], :].transpose(0, 1).reshape(i)


def swin_rcnn_to_mmdet_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A dfmsd ``(mm)mrcnn_swin_*`` state dict in MMDetection's Swin Mask R-CNN layout."""
    out = {}
    rules = [
        (r"^backbone\.body\.features\.0\.0\.", "backbone.patch_embed.projection."),
        (r"^backbone\.body\.features\.0\.2\.", "backbone.patch_embed.norm."),
        (r"^backbone\.body\.norms\.(\d)\.", r"backbone.norm\1."),
        (r"^backbone\.fpn\.inner_blocks\.(\d)\.0\.", r"neck.lateral_convs.\1.conv."),
        (r"^backbone\.fpn\.layer_blocks\.(\d)\.0\.", r"neck.fpn_convs.\1.conv."),
        (r"^rpn\.head\.conv\.0\.0\.", "rpn_head.rpn_conv."),
        (r"^rpn\.head\.cls_logits\.", "rpn_head.rpn_cls."),
        (r"^rpn\.head\.bbox_pred\.", "rpn_head.rpn_reg."),
        (r"^roi_heads\.box_head\.fc6\.", "roi_head.bbox_head.shared_fcs.0."),
        (r"^roi_heads\.box_head\.fc7\.", "roi_head.bbox_head.shared_fcs.1."),
        (r"^roi_heads\.box_predictor\.cls_score\.", "roi_head.bbox_head.fc_cls."),
        (r"^roi_heads\.box_predictor\.bbox_pred\.", "roi_head.bbox_head.fc_reg."),
        (r"^roi_heads\.mask_head\.(\d)\.0\.", r"roi_head.mask_head.convs.\1.conv."),
        (r"^roi_heads\.mask_predictor\.conv5_mask\.", "roi_head.mask_head.upsample."),
        (r"^roi_heads\.mask_predictor\.mask_fcn_logits\.", "roi_head.mask_head.conv_logits."),
    ]
    for k, v in state.items():
        m = re.match(r"^backbone\.body\.features\.(\d)\.(.+)$", k)
        if m and int(m.group(1)) > 0:
            f, rest = int(m.group(1)), m.group(2)
            if f % 2 == 0:  # patch merging after stage f/2 - 1
                out[f"backbone.stages.{f // 2 - 1}.downsample.{rest}"] = _unfold_order(v)
                continue
            j, rest = rest.split(".", 1)
            rest = (
                rest.replace("attn.", "attn.w_msa.")
                .replace("mlp.0.", "ffn.layers.0.0.")
                .replace("mlp.3.", "ffn.layers.1.")
            )
            out[f"backbone.stages.{(f - 1) // 2}.blocks.{j}.{rest}"] = v.clone()
            continue
        nk = k
        for pat, rep in rules:
            nk, n = re.subn(pat, rep, nk)
            if n:
                break
        if nk.endswith(("fc_cls.weight", "fc_cls.bias")):
            v = v.roll(-1, dims=0)  # background last
        elif ".fc_reg." in nk:
            v = v[4:]  # class-specific regression without the background rows
        elif ".conv_logits." in nk:
            v = v[1:]
        out[nk] = v.clone()
    return out


def _mmdet_swin_checkpoint(path, num_classes, names=None):
    """An MMDetection Swin-T Mask R-CNN checkpoint file made from a random dfmsd model."""
    torch.manual_seed(0)
    direct = build_model("mmmrcnn_swin_t", num_classes=num_classes).eval()
    with torch.no_grad():  # background rows are dropped by the MMDetection layout
        direct.roi_heads.box_predictor.bbox_pred.weight[:4] = 0.0
        direct.roi_heads.box_predictor.bbox_pred.bias[:4] = 0.0
        direct.roi_heads.mask_predictor.mask_fcn_logits.weight[:1] = 0.0
        direct.roi_heads.mask_predictor.mask_fcn_logits.bias[:1] = 0.0
    mm = swin_rcnn_to_mmdet_layout(direct.state_dict())
    assert "backbone.stages.0.blocks.0.attn.w_msa.relative_position_index" in mm
    meta = {"dataset_meta": {"classes": tuple(names)}} if names else {}
    torch.save({"state_dict": mm, "meta": meta}, path)
    return direct


def _convert_cli(src, out, model="mmmrcnn_swin_t"):
    """``convert mmdet SRC --model M -o DIR`` writes DIR/M.pth; moved to ``out``."""
    from typer.testing import CliRunner

    from dfmsd_cli.cli import app

    folder = out.parent / "converted"
    res = CliRunner().invoke(
        app, ["convert", "mmdet", str(src), "--model", model, "-o", str(folder)]
    )
    assert res.exit_code == 0, res.output
    (folder / f"{model}.pth").replace(out)


@pytest.mark.slow  # full-size Swin-T through the CLI: 370 MB written and read
def test_converted_swin_mask_rcnn_loads_and_matches(tmp_path):
    """convert mmdet -> --weights for Swin: derived buffers (relative_position_index) are
    written from the built model, so the strict load succeeds and the forward is unchanged."""
    from dfmsd_cli.models.checkpoint import load_weights

    direct = _mmdet_swin_checkpoint(tmp_path / "mm.pth", 2, ("a", "b"))
    _convert_cli(tmp_path / "mm.pth", tmp_path / "w.pth")
    loaded = build_model("mmmrcnn_swin_t", num_classes=2).eval()
    load_weights(loaded, tmp_path / "w.pth")  # what --weights does: strict
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():  # the backbone + FPN only: the RoI head costs seconds on a CPU
        a, b = direct.extract_features(images), loaded.extract_features(images)
    for s in a:
        assert torch.equal(a[s], b[s]), s


@pytest.mark.slow
def test_converted_swin_evaluates_with_weights(synthetic_root, tmp_path):
    """The user's round trip: ``convert mmdet`` then ``eval --model M --weights W.pth``; the
    loaded model detects exactly what the source model does."""
    import json

    from dfmsd_cli.cli import main
    from dfmsd_cli.models.checkpoint import load_weights

    ann = json.loads((synthetic_root / "annotations" / "instances_val2017.json").read_text())
    names = [c["name"] for c in ann["categories"]]
    direct = _mmdet_swin_checkpoint(tmp_path / "mm.pth", len(names), names)
    _convert_cli(tmp_path / "mm.pth", tmp_path / "w.pth")
    out = tmp_path / "res.json"
    args = ["eval", "--data", str(synthetic_root), "--model", "mmmrcnn_swin_t"]
    args += ["--weights", str(tmp_path / "w.pth"), "--img-scale", "128,96", "--max-images", "1"]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--num-workers", "0", "--json", str(out)])
    assert exc.value.code in (0, None)
    assert "mAP" in json.loads(out.read_text())["bbox"]
    loaded = build_model("mmmrcnn_swin_t", num_classes=len(names)).eval()
    load_weights(loaded, tmp_path / "w.pth")
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        a, b = direct(images, [(64, 96)]), loaded(images, [(64, 96)])
    assert len(a.detections[0]["boxes"]) > 0
    for key in ("boxes", "scores", "labels", "masks"):
        assert torch.equal(a.detections[0][key], b.detections[0][key]), key


# ------------------------------------------- shifted windows as MMDetection, at every size
def _mmdet_window_msa(x, attn, shift):
    """Reference: MMDetection 3.3 ``ShiftWindowMSA`` + ``WindowMSA`` (mmdet/models/backbones/
    swin.py) written out with their own index and mask code, on ``attn``'s weights."""
    ws, heads = attn.window_size[0], attn.num_heads
    b, h, w, c = x.shape
    seq1 = torch.arange(0, (2 * ws - 1) * ws, 2 * ws - 1)  # WindowMSA.double_step_seq
    seq2 = torch.arange(0, ws, 1)
    coords = (seq1[:, None] + seq2[None, :]).reshape(1, -1)
    index = (coords + coords.T).flip(1)
    table = attn.relative_position_bias_table
    bias = table[index.view(-1)].view(ws * ws, ws * ws, -1).permute(2, 0, 1)
    q = torch.nn.functional.pad(x, (0, 0, 0, (ws - w % ws) % ws, 0, (ws - h % ws) % ws))
    hp, wp = q.shape[1:3]

    def partition(t):
        return t.view(t.shape[0], hp // ws, ws, wp // ws, ws, -1).permute(0, 1, 3, 2, 4, 5)

    mask = None
    if shift:
        q = torch.roll(q, (-shift, -shift), (1, 2))
        img = torch.zeros(1, hp, wp, 1)
        cnt = 0
        for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
                img[:, hs, wsl, :] = cnt
                cnt += 1
        mw = partition(img).reshape(-1, ws * ws)
        mask = mw.unsqueeze(1) - mw.unsqueeze(2)
        mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
    win = partition(q).reshape(-1, ws * ws, c)
    qkv = attn.qkv(win).reshape(win.shape[0], ws * ws, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    a = (qkv[0] * (c // heads) ** -0.5) @ qkv[1].transpose(-2, -1) + bias.unsqueeze(0)
    if mask is not None:
        nw = mask.shape[0]
        a = a.view(-1, nw, heads, ws * ws, ws * ws) + mask.unsqueeze(1).unsqueeze(0)
        a = a.view(-1, heads, ws * ws, ws * ws)
    out = attn.proj((a.softmax(-1) @ qkv[2]).transpose(1, 2).reshape(-1, ws * ws, c))
    out = out.view(b, hp // ws, wp // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
    if shift:
        out = torch.roll(out, (shift, shift), (1, 2))
    return out[:, :h, :w, :]


def test_swin_attention_shifts_as_mmdetection_at_every_size():
    from torchvision.models.swin_transformer import ShiftedWindowAttention

    from dfmsd_cli.models.swin import MMDetShiftedWindowAttention

    torch.manual_seed(0)
    tv = ShiftedWindowAttention(32, [7, 7], [3, 3], num_heads=4).eval()
    with torch.no_grad():
        tv.relative_position_bias_table.normal_(std=1.0)
    mm = MMDetShiftedWindowAttention.adopt(copy.deepcopy(tv))
    assert set(mm.state_dict()) == set(tv.state_dict())
    with torch.no_grad():
        # a late-stage map (5x6 pads to one 7x7 window): torchvision drops the shift
        x = torch.randn(2, 5, 6, 32)
        ref = _mmdet_window_msa(x, tv, shift=3)
        assert torch.allclose(mm(x), ref, atol=1e-5)
        assert not torch.allclose(tv(x), ref, atol=1e-2)
        # a map larger than the window: all three agree
        x = torch.randn(1, 11, 16, 32)
        ref = _mmdet_window_msa(x, tv, shift=3)
        assert torch.allclose(mm(x), ref, atol=1e-5) and torch.allclose(tv(x), ref, atol=1e-5)
        mm.shift_size = [0, 0]  # the even blocks: plain W-MSA
        assert torch.allclose(mm(x), _mmdet_window_msa(x, tv, shift=0), atol=1e-5)


def test_swin_body_uses_mmdet_attention_in_every_block():
    from dfmsd_cli.models.swin import MMDetShiftedWindowAttention, SwinBody

    with torch.device("meta"):
        body = SwinBody("swin_t")
    blocks = [blk for stage in body.features[1::2] for blk in stage]
    assert len(blocks) == 12
    assert all(type(b.attn) is MMDetShiftedWindowAttention for b in blocks)
    assert [b.attn.shift_size for b in blocks[:2]] == [[0, 0], [3, 3]]


def test_mmdet_retinanet_swin_converts_strictly():
    """``retinanet_swin-t-p4-w7_fpn_1x_coco``: Swin ``out_indices=(1, 2, 3)`` (no ``norm0``),
    FPN on 192/384/768 channels, P6 from C5 (``on_input``)."""
    from test_zoo_convert import mmdet_retina_head

    src = {
        **mmdet_swin(),
        **mmdet_fpn([192, 384, 768], num_extra_convs=2, extra_in=768),
        **mmdet_retina_head(),
    }
    del src["backbone.norm0.weight"], src["backbone.norm0.bias"]
    with torch.device("meta"):
        target = build_model("mmretina_swin_t", num_classes=80).state_dict()
    out, report = convert_state_dict(src, target, "mmretina_swin_t")
    assert report.ok, report.summary()
    assert set(out) | {k for k in target if "relative_position_index" in k} == set(target)


def test_swin_p6p7_loads_older_checkpoints_with_unused_norm0():
    torch.manual_seed(0)
    model = build_model("retina_swin_t", num_classes=2)
    state = model.state_dict()
    assert "backbone.body.norms.0.weight" not in state  # stage 1 feeds no FPN level
    state["backbone.body.norms.0.weight"] = torch.ones(96)  # what earlier versions wrote
    state["backbone.body.norms.0.bias"] = torch.zeros(96)
    model.load_state_dict(state, strict=True)

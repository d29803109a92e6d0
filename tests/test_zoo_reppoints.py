"""RepPoints: deformable-conv offset layout, moment transform, assigners and losses on hand-built
tensors, the model contract (logits, train/predict), DCN backbone, MMDetection conversion."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_zoo_convert import _conv, _t, mmdet_resnet

from dfmsd_cli.models import build_model
from dfmsd_cli.models.convert import convert_mmdet, convert_state_dict
from dfmsd_cli.models.reppoints import DeformConv, DeformConvPack, RepPointsHead
from dfmsd_cli.models.reppoints_losses import (
    max_iou_assign,
    moment_box,
    point_assign,
    reppoints_loss,
    split_yx,
)

# the 3x3 kernel grid as MMDetection's dcn_base_offset: (y, x) pairs, row-major
GRID_YX = [(y, x) for y in (-1.0, 0.0, 1.0) for x in (-1.0, 0.0, 1.0)]


def _offsets(dy: float, dx: float, h: int, w: int) -> torch.Tensor:
    """(1, 18, h, w) with (dy, dx) for every kernel position, mmcv's [y0, x0, y1, x1, ...]."""
    per = torch.tensor([float(dy), float(dx)] * 9).view(1, 18, 1, 1)
    return per.expand(1, 18, h, w).contiguous()


# --------------------------------------------------------------------- offsets layout
def test_deform_conv_offset_channels_are_dy_then_dx():
    torch.manual_seed(0)
    conv = DeformConv(2, 3)
    x = torch.randn(1, 2, 5, 6)
    plain = F.conv2d(x, conv.weight, padding=1)
    assert torch.allclose(conv(x, _offsets(0, 0, 5, 6)), plain, atol=1e-6)
    # dy = +1 samples one row lower: the plain conv of the map shifted up by one row (away
    # from the top border, where the plain conv's padding row would be x's first row)
    out = conv(x, _offsets(1, 0, 5, 6))
    ref = F.conv2d(F.pad(x[:, :, 1:], (0, 0, 0, 1)), conv.weight, padding=1)
    assert torch.allclose(out[:, :, 1:], ref[:, :, 1:], atol=1e-5)
    assert not torch.allclose(out, plain, atol=1e-3)
    out = conv(x, _offsets(0, 1, 5, 6))  # dx = +1: one column to the right
    ref = F.conv2d(F.pad(x[..., 1:], (0, 1)), conv.weight, padding=1)
    assert torch.allclose(out[..., 1:], ref[..., 1:], atol=1e-5)


def test_head_base_offset_is_mmdets_grid():
    head = RepPointsHead(32, num_classes=2)
    assert head.dcn_base_offset.view(9, 2).tolist() == [list(p) for p in GRID_YX]


def test_points_on_the_grid_make_the_deformable_convs_plain_convs():
    torch.manual_seed(0)
    head = RepPointsHead(32, num_classes=2).eval()
    # init points exactly on the kernel grid -> offset 0 -> reppoints_cls_conv is a 3x3 conv
    with torch.no_grad():
        head.reppoints_pts_init_out.weight.zero_()
        head.reppoints_pts_init_out.bias.copy_(head.dcn_base_offset.view(-1))
    x = torch.randn(1, 32, 6, 7)
    cls, init, _ = head.forward_level(x)
    feat = x
    for conv in head.cls_convs:
        feat = conv(feat)
    plain = F.conv2d(feat, head.reppoints_cls_conv.weight, padding=1)
    ref = head.reppoints_cls_out(torch.relu(plain))
    assert torch.allclose(cls, ref, atol=1e-5)
    assert torch.equal(init[0, :, 2, 3], head.dcn_base_offset.view(-1))


def test_split_yx_reads_y_first_pairs():
    pts = torch.arange(18.0).view(1, 18, 1, 1)  # y_k = 2k, x_k = 2k + 1
    xs, ys = split_yx(pts)
    assert ys[0, 0].tolist() == [2.0 * k for k in range(9)]
    assert xs[0, 0].tolist() == [2.0 * k + 1 for k in range(9)]


# --------------------------------------------------------------------- moment transform
def test_moment_box_of_a_known_point_set():
    xs = torch.tensor([0.0, 0.0, 2.0, 2.0])
    ys = torch.tensor([1.0, 3.0, 1.0, 3.0])
    half = math.sqrt(4.0 / 3.0)  # unbiased std of (-1, -1, 1, 1)
    box = moment_box(xs, ys, torch.zeros(2))
    assert torch.allclose(box, torch.tensor([1 - half, 2 - half, 1 + half, 2 + half]))
    box = moment_box(xs, ys, torch.tensor([math.log(2.0), 0.0]))  # exp(t_w) = 2 doubles w
    assert torch.allclose(box, torch.tensor([1 - 2 * half, 2 - half, 1 + 2 * half, 2 + half]))


def test_moment_transfer_gradient_is_scaled_by_moment_mul():
    head = RepPointsHead(32, num_classes=2)
    xs, ys = torch.tensor([0.0, 1.0, 3.0]), torch.tensor([0.0, 2.0, 2.0])
    moment_box(xs, ys, head.transfer())[2].backward()  # d(c_x + half_w)/d t_w = std(x)
    std_x = torch.tensor([0.0, 1.0, 3.0]).std().item()
    assert head.moment_transfer.grad[0].item() == pytest.approx(0.01 * std_x, rel=1e-5)


# --------------------------------------------------------------------- assigners
def test_point_assign_levels_and_nearest_point():
    # two levels: stride 8 (log2 3) at x = 0, 8, 16; stride 16 (log2 4) at x = 0, 16
    points = torch.tensor([[0.0, 0], [8, 0], [16, 0], [0, 0], [16, 0]])
    levels = torch.tensor([3, 3, 3, 4, 4])
    gts = torch.tensor(
        [
            [0.0, -16, 32, 16],  # 32x32: log2(8) = 3 -> stride 8, centre (16, 0) -> point 2
            [-30.0, -30, 30, 30],  # 60x60: log2(15) = 3.9 truncates to 3 -> nearest: point 0
            [-40.0, -40, 88, 88],  # 128x128: log2(32) = 5 -> clamped to 4, centre (24, 24)
        ]
    )
    assigned = point_assign(points, levels, gts, scale=4.0, pos_num=1)
    assert assigned.tolist() == [2, 0, 1, 0, 3]


def test_point_assign_keeps_the_closer_gt():
    points = torch.tensor([[0.0, 0], [8, 0]])
    levels = torch.tensor([3, 3])
    gts = torch.tensor([[-14.0, -16, 18, 16], [-16.0, -16, 16, 16]])  # both nearest to point 0
    assert point_assign(points, levels, gts).tolist() == [2, 0]  # the 2nd is centred on it
    assert point_assign(points, levels, gts.flip(0)).tolist() == [1, 0]  # earlier & closer stays


def test_max_iou_assign_thresholds_and_low_quality_matches():
    gts = torch.tensor([[0.0, 0, 10, 10], [100.0, 100, 110, 110]])
    boxes = torch.tensor(
        [
            [0.0, 0, 10, 6],  # IoU 0.6 with gt 0 -> positive
            [0.0, 0, 10, 4.5],  # IoU 0.45 -> ignored
            [0.0, 0, 10, 1],  # IoU 0.1 -> negative
            [100.0, 100, 103, 110],  # IoU 0.3 with gt 1: its best -> low-quality positive
        ]
    )
    assert max_iou_assign(boxes, gts).tolist() == [1, -1, 0, 2]
    assert max_iou_assign(boxes, gts[:0]).tolist() == [0, 0, 0, 0]


# --------------------------------------------------------------------- losses
def test_reppoints_loss_on_hand_built_inputs():
    grid = torch.tensor(GRID_YX).view(18)
    # one level, stride 8, a 1x2 map: locations (0, 0) and (8, 0); 2 classes, logits 0
    cls = torch.zeros(1, 2, 1, 2, requires_grad=True)
    init = grid.view(1, 18, 1, 1).repeat(1, 1, 1, 2)  # the kernel grid: x, y in {-1, 0, 1}
    refine = 2 * init
    targets = [{"boxes": torch.tensor([[-8.0, -8, 8, 8]]), "labels": torch.tensor([1])}]
    out = reppoints_loss([cls], [init], [refine], (8,), targets, torch.zeros(2))
    std = math.sqrt(6.0 / 8.0)  # unbiased std of (-1, 0, 1, -1, 0, 1, -1, 0, 1)
    beta, norm = 0.11, 32.0  # point_base_scale 4 x stride 8

    def sl1(d):
        return 0.5 * d * d / beta if d < beta else d - 0.5 * beta

    # init: the gt (16x16 -> level 3) goes to location 0; its box is +-8 std vs +-8
    d_init = (8 - 8 * std) / norm
    assert out["loss_pts_init"].item() == pytest.approx(0.5 * 4 * sl1(d_init), rel=1e-5)
    # refine: location 0's init box has IoU 0.75 (positive), location 1's 0.27 (negative);
    # its refined box is +-16 std
    d_ref = (16 * std - 8) / norm
    assert out["loss_pts_refine"].item() == pytest.approx(4 * sl1(d_ref), rel=1e-5)
    # focal at p = 0.5: positive alpha (1-p)^2 log 2, negatives (1-alpha) p^2 log 2; / 1 pos
    focal = 0.25 * 0.25 * math.log(2) + 3 * 0.75 * 0.25 * math.log(2)
    assert out["loss_cls"].item() == pytest.approx(focal, rel=1e-5)


def test_reppoints_loss_without_objects_is_finite():
    cls = torch.zeros(2, 3, 2, 2)
    pts = torch.randn(2, 18, 2, 2)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    out = reppoints_loss([cls], [pts], [pts], (8,), [empty, empty], torch.zeros(2))
    assert out["loss_pts_init"].item() == 0 and out["loss_pts_refine"].item() == 0
    assert out["loss_cls"].item() == pytest.approx(2 * 4 * 3 * 0.75 * 0.25 * math.log(2), rel=1e-5)


# --------------------------------------------------------------------- model
def test_reppoints_tiny_trains_predicts_and_returns_logits():
    torch.manual_seed(0)
    model = build_model("reppoints_tiny", num_classes=3)
    images = torch.randn(2, 3, 96, 128)
    targets = [
        {"boxes": torch.tensor([[12.0, 12, 48, 58]]), "labels": torch.tensor([2])},
        {"boxes": torch.tensor([[50.0, 20, 120, 90]]), "labels": torch.tensor([1])},
    ]
    model.train()
    out = model(images, [(96, 128), (90, 120)], targets, return_logits=True)
    assert set(out.losses) == {"loss_cls", "loss_pts_init", "loss_pts_refine"}
    assert all(torch.isfinite(v) and v > 0 for v in out.losses.values())
    assert {s: tuple(t.shape) for s, t in out.logits.items()} == {
        8: (2, 3, 12, 16), 16: (2, 3, 6, 8), 32: (2, 3, 3, 4), 64: (2, 3, 2, 2), 128: (2, 3, 1, 1)
    }  # fmt: skip
    sum(out.losses.values()).backward()
    assert model.head.reppoints_pts_init_out.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        model.head.reppoints_cls_out.bias.fill_(2.0)  # make scores pass the threshold
        out = model(images, [(96, 128), (90, 120)])
    det = out.detections[1]
    assert 0 < len(det["boxes"]) <= 100
    assert det["labels"].min() >= 1 and det["labels"].max() <= 3
    assert det["boxes"][:, 2].max() <= 120 and det["boxes"][:, 3].max() <= 90


def test_dcn_pack_starts_as_a_plain_conv():
    torch.manual_seed(0)
    dcn = DeformConvPack(4, 8, stride=2, groups=2)
    x = torch.randn(1, 4, 9, 9)
    assert torch.allclose(dcn(x), F.conv2d(x, dcn.weight, stride=2, padding=1, groups=2), atol=1e-5)


# --------------------------------------------------------------------- conversion
def mmdet_reppoints_neck_head(in_channels, num_classes=80, device="meta", gn=True):
    """MMDetection ``FPN(norm_cfg=GN, add_extra_convs='on_input')`` + ``RepPointsHead`` keys."""
    sd: dict[str, torch.Tensor] = {}

    def conv_module(prefix, cout, cin, k):
        _conv(sd, f"{prefix}.conv", cout, cin, k, device, bias=not gn)
        if gn:
            sd[f"{prefix}.gn.weight"] = _t((cout,), device)
            sd[f"{prefix}.gn.bias"] = _t((cout,), device)

    for i, c in enumerate(in_channels):
        conv_module(f"neck.lateral_convs.{i}", 256, c, 1)
        conv_module(f"neck.fpn_convs.{i}", 256, 256, 3)
    conv_module(f"neck.fpn_convs.{len(in_channels)}", 256, in_channels[-1], 3)  # P6 from C5
    conv_module(f"neck.fpn_convs.{len(in_channels) + 1}", 256, 256, 3)
    for branch in ("cls_convs", "reg_convs"):
        for i in range(3):
            conv_module(f"bbox_head.{branch}.{i}", 256, 256, 3)
    sd["bbox_head.reppoints_cls_conv.weight"] = _t((256, 256, 3, 3), device)
    _conv(sd, "bbox_head.reppoints_cls_out", num_classes, 256, 1, device)
    _conv(sd, "bbox_head.reppoints_pts_init_conv", 256, 256, 3, device)
    _conv(sd, "bbox_head.reppoints_pts_init_out", 18, 256, 1, device)
    sd["bbox_head.reppoints_pts_refine_conv.weight"] = _t((256, 256, 3, 3), device)
    _conv(sd, "bbox_head.reppoints_pts_refine_out", 18, 256, 1, device)
    sd["bbox_head.moment_transfer"] = _t((2,), device)
    return sd


def _target(name, **options):
    with torch.device("meta"):
        return build_model(name, num_classes=80, **options).state_dict()


@pytest.mark.parametrize("gn", [True, False])
def test_mmdet_reppoints_r50_converts_strictly(gn):
    src = {**mmdet_resnet(50), **mmdet_reppoints_neck_head([512, 1024, 2048], gn=gn)}
    name = "reppoints_r50" if gn else "reppoints_r50_nogn"
    out, report = convert_state_dict(src, _target(name), name)
    assert report.ok, report.summary()
    assert out["backbone.fpn.extra_blocks.p6.weight"].shape == (256, 2048, 3, 3)
    if gn:
        assert "backbone.fpn.extra_blocks.p7_norm.bias" in out
        assert "backbone.fpn.inner_blocks.2.1.weight" in out
    assert out["head.moment_transfer"].shape == (2,)


def test_mmdet_reppoints_gn_checkpoint_does_not_fit_the_plain_model():
    src = {**mmdet_resnet(50), **mmdet_reppoints_neck_head([512, 1024, 2048], gn=True)}
    _, report = convert_state_dict(src, _target("reppoints_r50_nogn"), "reppoints_r50_nogn")
    assert not report.ok


def test_mmdet_reppoints_dcn_backbone_converts_strictly():
    src = {**mmdet_resnet(101, groups=32), **mmdet_reppoints_neck_head([512, 1024, 2048])}
    for key in [k for k in src if ".conv2.weight" in k and not k.startswith("backbone.layer1")]:
        stem = key.removesuffix(".weight")
        _conv(src, f"{stem}.conv_offset", 18, src[key].shape[1] * 32, 3, "meta")
    name = "reppoints_x101_32x4d_dcn"
    out, report = convert_state_dict(src, _target(name), name)
    assert report.ok, report.summary()
    assert out["backbone.body.layer3.0.conv2.conv_offset.weight"].shape[0] == 18


def test_convert_mmdet_file_values_land_on_the_model(tmp_path):
    torch.manual_seed(0)
    model = build_model("reppoints_tiny", num_classes=3)
    inverse = {  # dfmsd key -> MMDetection key, written out by hand for the tiny model
        "backbone.fpn.inner_blocks.0.0.weight": "neck.lateral_convs.0.conv.weight",
        "backbone.fpn.inner_blocks.0.1.weight": "neck.lateral_convs.0.gn.weight",
        "backbone.fpn.layer_blocks.2.1.bias": "neck.fpn_convs.2.gn.bias",
        "backbone.fpn.extra_blocks.p6.weight": "neck.fpn_convs.3.conv.weight",
        "backbone.fpn.extra_blocks.p7_norm.weight": "neck.fpn_convs.4.gn.weight",
        "head.cls_convs.2.norm.weight": "bbox_head.cls_convs.2.gn.weight",
        "head.reppoints_pts_refine_conv.weight": "bbox_head.reppoints_pts_refine_conv.weight",
        "head.moment_transfer": "bbox_head.moment_transfer",
    }

    def mm_key(k: str) -> str:
        if k in inverse:
            return inverse[k]
        if k.startswith("backbone.body."):
            return "backbone." + k[len("backbone.body.") :]
        k = k.replace("backbone.fpn.inner_blocks.", "neck.lateral_convs.")
        k = k.replace("backbone.fpn.layer_blocks.", "neck.fpn_convs.")
        k = k.replace("backbone.fpn.extra_blocks.p6_norm.", "neck.fpn_convs.3.gn.")
        k = k.replace("backbone.fpn.extra_blocks.p7.", "neck.fpn_convs.4.conv.")
        k = k.replace("backbone.fpn.extra_blocks.p7_norm.", "neck.fpn_convs.4.gn.")
        k = k.replace(".0.weight", ".conv.weight").replace(".1.weight", ".gn.weight")
        k = k.replace(".1.bias", ".gn.bias").replace(".norm.", ".gn.")
        return "bbox_head." + k[len("head.") :] if k.startswith("head.") else k

    state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    src = {mm_key(k): v for k, v in state.items()}
    path = tmp_path / "mm.pth"
    torch.save({"state_dict": src, "meta": {"dataset_meta": {"classes": ("a", "b", "c")}}}, path)
    ckpt, report = convert_mmdet(path, "reppoints_tiny")
    assert report.ok, report.summary()
    assert ckpt["num_classes"] == 3
    for k, v in state.items():
        assert torch.equal(ckpt["state_dict"][k], v), k


# --------------------------------------------------------------------- end to end
@pytest.mark.slow  # two epochs + evaluation + a store on CPU
def test_train_reppoints_tiny_then_precompute_its_logits(synthetic_root, tmp_path):
    import json

    from conftest import _cli

    from dfmsd_cli.data.geometry import Geometry
    from dfmsd_cli.store.precompute import PrecomputeOptions, precompute
    from dfmsd_cli.store.reader import TeacherStore

    out = tmp_path / "run"
    argv = ["train", "--model", "reppoints_tiny", "--data", str(synthetic_root), "--out",
            str(out), "--epochs", "2", "--img-scale", "128,96", "--batch-size", "2",
            "--num-workers", "0", "--warmup-iters", "2", "--lr", "0.005",
            "--device", "cpu"]  # fmt: skip
    assert _cli(argv) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["phase"] == "train"]
    assert train and all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in train)
    assert {"loss_cls", "loss_pts_init", "loss_pts_refine"} <= set(train[-1])
    assert "mAP" in json.dumps(json.loads((out / "summary.json").read_text())["val"])
    opts = PrecomputeOptions(
        teacher="reppoints_tiny", weights=str(out / "model.pth"), cache=str(tmp_path / "cache"),
        geometry=Geometry(img_scale=(128, 96)), views=["orig"], block=2, batch_size=2,
        num_workers=0, device="cpu", progress=False, store_logits=True, max_images=2,
    )  # fmt: skip
    ann = synthetic_root / "annotations" / "instances_train2017.json"
    path = precompute(ann, synthetic_root / "train2017", opts)["path"]
    k = len(json.loads(ann.read_text())["categories"])
    item = TeacherStore.open(path).get(0, "orig")
    for s, feat in item["features"].items():  # one sigmoid logit map per class and location
        assert item["logits"][s].shape == (k, *feat.shape[-2:])
        assert torch.isfinite(item["logits"][s]).all()

"""CrossKD: its loss formulas on hand-checked tensors, the head split hooks, the cross-head
path equal to the teacher's head when the student is the teacher, the teacher head loaded
alone from the store's weights, incompatible pairs refused, and a CLI run (slow)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import _cli

from dfmsd_cli.distill.losses.crosskd import (
    CrossKDLoss,
    align_scale,
    kd_kl_div,
    kd_quality_focal_loss,
)
from dfmsd_cli.distill.methods import method_config
from dfmsd_cli.distill.methods.crosskd import (
    load_teacher_head,
    stored_logits_gap,
    streamed_sha256,
    with_stores,
)
from dfmsd_cli.distill.methods.registry import build_stage_losses
from dfmsd_cli.distill.model import DistillModel
from dfmsd_cli.errors import UserError
from dfmsd_cli.models import build_model
from dfmsd_cli.models.checkpoint import save_checkpoint
from dfmsd_cli.store.batch import TeacherBatch, TeacherView
from dfmsd_cli.store.reader import TeacherStore
from dfmsd_cli.store.schema import state_dict_sha256


def test_kd_quality_focal_loss_by_hand():
    # pred 0 -> p = 0.5; target logit 0 -> q = 0.5: BCE = ln 2, |p - q| = 0 -> 0
    assert kd_quality_focal_loss(torch.zeros(1), torch.zeros(1)).item() == 0.0
    # pred 0 (p = 0.5), target logit ln 3 (q = 0.75): BCE = -(0.75 ln .5 + .25 ln .5) = ln 2;
    # |p - q|^1 = 0.25 -> 0.25 ln 2; with beta 2: 0.0625 ln 2
    t = torch.tensor([math.log(3.0)])
    assert kd_quality_focal_loss(torch.zeros(1), t).item() == pytest.approx(0.25 * math.log(2))
    assert kd_quality_focal_loss(torch.zeros(1), t, beta=2.0).item() == pytest.approx(
        0.0625 * math.log(2)
    )


def test_kd_kl_div_by_hand():
    # teacher softmax (0.5, 0.5), student softmax (0.75, 0.25) (logits ln 3, 0):
    # KL = 0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25) = 0.5 ln(4/3)
    pred = torch.tensor([[math.log(3.0), 0.0]])
    tgt = torch.zeros(1, 2)
    assert kd_kl_div(pred, tgt).item() == pytest.approx(0.5 * math.log(4 / 3))
    assert kd_kl_div(tgt, tgt).item() == pytest.approx(0.0, abs=1e-7)
    # temperature 2 scales logits by 1/2 and the KL by 4
    p2 = torch.tensor([[2 * math.log(3.0), 0.0]])
    assert kd_kl_div(p2, tgt, 2.0).item() == pytest.approx(4 * 0.5 * math.log(4 / 3))


def test_align_scale_gives_the_student_the_teacher_channel_statistics_on_valid_positions():
    s = torch.tensor([1.0, 2.0, 3.0, 100.0]).reshape(1, 1, 2, 2)
    t = torch.tensor([10.0, 20.0, 30.0, -5.0]).reshape(1, 1, 2, 2)
    valid = torch.tensor([[True, True], [True, False]])[None]
    out = align_scale(s, t, valid)
    # valid S: 1,2,3 (mean 2, std 1); valid T: 10,20,30 (mean 20, std 10) -> 10, 20, 30
    assert out[0, 0][valid[0]].tolist() == pytest.approx([10.0, 20.0, 30.0], rel=1e-5)
    assert out[0, 0, 1, 1].item() == pytest.approx(20 + 98 * 10 / (1 + 1e-6), rel=1e-5)


def _views(feats, valid=None):
    valid = valid or {s: torch.ones(f.shape[0], *f.shape[-2:], dtype=torch.bool)
                      for s, f in feats.items()}  # fmt: skip
    stat = {s: f.abs().mean(1) for s, f in feats.items()}
    chan = {s: f.abs().mean((2, 3)) for s, f in feats.items()}
    return TeacherView(features=feats, valid=valid, att_spatial=stat, att_channel=chan)


def test_cross_head_equals_the_teacher_head_when_the_student_is_the_teacher():
    """Student = teacher (same weights, same FPN maps): align_scale is the identity, the
    cross-head predictions are the teacher's, both KD terms vanish (KD-QFL with β = 1 and the
    KL are 0 at p = q) and the teacher outputs are its plain head forward."""
    torch.manual_seed(0)
    student = build_model("gfl_tiny", num_classes=3).eval()
    teacher_head = build_model("gfl_tiny", num_classes=3).head
    teacher_head.load_state_dict(student.head.state_dict())
    levels = list(student.strides)
    feats = {s: torch.randn(2, 64, max(1, 32 // s), max(1, 40 // s)) for s in levels}
    loss = CrossKDLoss(teacher_head, levels, {s: i for i, s in enumerate(levels)}, index=3)
    ref_cls, ref_reg = teacher_head([feats[s] for s in levels])
    tout = loss.teacher_outputs(feats)
    for i, s in enumerate(levels):
        assert torch.equal(tout[s][2], ref_cls[i]) and torch.equal(tout[s][3], ref_reg[i])
    valid = {s: torch.ones(2, *f.shape[-2:], dtype=torch.bool) for s, f in feats.items()}
    for index in (0, 2, 3, 4):
        loss.index = index
        cls, reg = loss(student.head, feats, feats, valid, norm=5)
        # KD-QFL at p = q is BCE·0 = 0 exactly; the KL is 0 up to rounding
        assert cls.item() == pytest.approx(0.0, abs=1e-6)
        assert reg.item() == pytest.approx(0.0, abs=1e-5)
    # a different student: both terms positive and the gradient reaches its first 3 convs only
    other = build_model("gfl_tiny", num_classes=3).train()
    torch.nn.init.normal_(other.head.cls_convs[0].conv.weight, std=0.1)
    s_feats = {s: f.clone().requires_grad_(True) for s, f in feats.items()}
    loss.index = 3
    cls, reg = loss(other.head, s_feats, feats, valid, norm=5)
    assert cls.item() > 0 and reg.item() > 0
    (cls + reg).backward()
    assert other.head.cls_convs[2].conv.weight.grad.abs().sum() > 0
    assert other.head.cls_convs[3].conv.weight.grad is None  # the teacher's conv 3 runs
    assert other.head.gfl_cls.weight.grad is None
    assert all(p.grad is None for p in teacher_head.parameters())
    assert s_feats[8].grad.abs().sum() > 0


def test_iou_term_by_hand_and_mmfcos_cross_head_equals_its_teacher_head():
    """FCOS regression KD: distances (1,1,1,1) vs (2,2,2,2) are boxes of area 4 and 16 around
    one point, IoU 1/4, loss −log(1/4) = ln 4; and the mmfcos hooks reproduce its head."""
    from dfmsd_cli.distill.losses.crosskd import _ltrb_box
    from dfmsd_cli.models.gfl_losses import aligned_iou

    iou = aligned_iou(_ltrb_box(torch.ones(1, 4)), _ltrb_box(torch.full((1, 4), 2.0)))
    assert (-iou.log()).item() == pytest.approx(math.log(4.0), rel=1e-5)
    torch.manual_seed(4)
    student = build_model("mmfcos_tiny", num_classes=3).eval()
    head = student.head
    levels = list(student.strides)
    feats = {s: torch.randn(2, 64, max(1, 32 // s), max(1, 40 // s)) for s in levels}
    ref = head([feats[s] for s in levels])
    for i in range(5):
        for lv, s in enumerate(levels):
            out = head.forward_from(*head.towers_until(feats[s], i), lv, i)
            assert all(torch.allclose(a, b[lv]) for a, b in zip(out, ref, strict=True))
    teacher_head = build_model("mmfcos_tiny", num_classes=3).head
    teacher_head.load_state_dict(head.state_dict())
    loss = CrossKDLoss(teacher_head, levels, {s: i for i, s in enumerate(levels)}, 2,
                       kind="mmfcos")  # fmt: skip
    valid = {s: torch.ones(2, *f.shape[-2:], dtype=torch.bool) for s, f in feats.items()}
    cls, reg = loss(head, feats, feats, valid, norm=3.0)
    assert cls.item() == pytest.approx(0.0, abs=1e-6) and reg.item() == pytest.approx(0, abs=1e-5)
    other = build_model("mmfcos_tiny", num_classes=3)
    cls, reg = loss(other.head, feats, feats, valid, norm=3.0)
    assert cls.item() > 0 and reg.item() > 0
    # the normaliser: the positives' centerness targets; none without boxes
    maps = [feats[s][:1] for s in levels]
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    assert student.centerness_norm(maps, empty) == 0.0
    one = [{"boxes": torch.tensor([[0.0, 0.0, 24.0, 24.0]]), "labels": torch.tensor([1])}]
    # stride-8 points at 4, 12, 20 inside the box: l/r = 4/20, 12/12, 20/4 per axis
    by_hand = sum(math.sqrt(min(a, 24 - a) / max(a, 24 - a) * min(b, 24 - b) / max(b, 24 - b))
                  for a in (4, 12, 20) for b in (4, 12, 20))  # fmt: skip
    assert student.centerness_norm(maps, one) == pytest.approx(by_hand, rel=1e-5)


def test_retina_split_reproduces_the_torchvision_head_and_vanishes_at_student_equals_teacher():
    from dfmsd_cli.models.dense import RetinaHeadSplit, tv_level_logits

    torch.manual_seed(5)
    student = build_model("retina_tiny", num_classes=3).eval()
    levels = list(student.strides)
    feats = {s: torch.randn(2, 64, max(1, 32 // s), max(1, 40 // s)) for s in levels}
    maps = [feats[s] for s in levels]
    ref = student.head(maps)
    ref_cls = tv_level_logits(ref["cls_logits"], maps, 9)
    split = RetinaHeadSplit(student.head)
    for i in range(5):
        for lv, s in enumerate(levels):
            c, r = split.forward_from(*split.towers_until(feats[s], i), lv, i)
            assert torch.allclose(c, ref_cls[lv], atol=1e-6)
    # deltas: (B, A·4, h, w) anchor-major = torchvision's flattened (B, h·w·A, 4) rows
    b, _, h, w = r.shape
    flat = r.reshape(b, 9, 4, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, 4)
    assert torch.allclose(flat, ref["bbox_regression"][:, -h * w * 9 :], atol=1e-6)
    teacher = build_model("retina_tiny", num_classes=3).head
    teacher.load_state_dict(student.head.state_dict())
    loss = CrossKDLoss(RetinaHeadSplit(teacher), levels, {s: i for i, s in enumerate(levels)},
                       3, kind="retina")  # fmt: skip
    valid = {s: torch.ones(2, *f.shape[-2:], dtype=torch.bool) for s, f in feats.items()}
    anchors = dict(zip(levels, student.level_anchors(maps), strict=True))
    cls, reg = loss(split, feats, feats, valid, 4, anchors)
    assert cls.item() == pytest.approx(0.0, abs=1e-6) and reg.item() == pytest.approx(0, abs=1e-5)
    other = build_model("retina_tiny", num_classes=3)
    cls, reg = loss(RetinaHeadSplit(other.head), feats, feats, valid, 4, anchors)
    assert cls.item() > 0 and reg.item() > 0


def test_teacher_head_is_kept_out_of_the_loss_state_and_parameters():
    head = build_model("gfl_tiny", num_classes=3).head
    loss = CrossKDLoss(head, [8], {8: 0})
    assert list(loss.parameters()) == [] and loss.state_dict() == {}
    loss.to(torch.float64)
    assert head.gfl_cls.weight.dtype == torch.float64  # .to() moves the teacher head
    loss.train()
    assert not head.training


def _store(teacher="gfl_tiny", classes=3, channels=64, path=None, sha=None):
    meta = SimpleNamespace(
        path="cache/t/train2017.zarr", teacher=teacher, num_classes=classes, channels=channels,
        strides=(8, 16, 32, 64, 128), attrs={"weights": {"path": path, "sha256": sha}},
        fingerprints={"weights_sha256": sha},
    )  # fmt: skip
    return [SimpleNamespace(store=SimpleNamespace(path=meta.path, meta=meta))]


def test_teacher_head_alone_is_loaded_from_the_stores_weights_and_checked(tmp_path):
    torch.manual_seed(1)
    teacher = build_model("gfl_tiny", num_classes=3)
    path = save_checkpoint(tmp_path / "t.pth", teacher)
    sha = state_dict_sha256(teacher.state_dict())
    assert streamed_sha256(teacher.state_dict()) == sha
    student = build_model("gfl_tiny", num_classes=3)
    cfg = with_stores(method_config("crosskd", "gfl_tiny"), student,
                      _store(path=str(path), sha=sha), online=False)  # fmt: skip
    kw = cfg.loss_kwargs
    assert kw["index"] == 3 and kw["teacher_weights"] == str(path) and kw["num_classes"] == 3
    mods = build_stage_losses(cfg, list(student.strides), 64, 64)
    assert set(mods) == {"crosskd", "crosskd_reg"}
    head = mods["crosskd"].teacher_head
    for k, v in head.state_dict().items():
        assert torch.equal(v, teacher.head.state_dict()[k])
    assert not any(p.requires_grad for p in head.parameters())
    # a file that is not the store's teacher is refused
    with pytest.raises(UserError, match="fingerprint differs"):
        load_teacher_head(str(path), "gfl_tiny", 64, 3, 5, fingerprint="0" * 64)
    # the recorded file is gone: name the fix
    with pytest.raises(UserError, match="--crosskd-teacher-weights"):
        with_stores(method_config("crosskd", "gfl_tiny"), student,
                    _store(path=str(tmp_path / "gone.pth")), online=False)  # fmt: skip


@pytest.mark.parametrize(
    ("student", "store", "match"),
    [
        ("retina_tiny", {}, "same head family"),
        ("gfl_tiny", {"teacher": "fcos_tiny"}, "same head family"),
        ("gfl_tiny", {"classes": 80}, "80 classes"),
        ("gfl_tiny", {"channels": 256}, "channels wide"),
        ("mmfcos_tiny", {}, "same head family"),
        ("fcos_tiny", {"teacher": "fcos_tiny"}, "same head family"),
    ],
)
def test_incompatible_pairs_are_one_line_errors(student, store, match):
    model = build_model(student, num_classes=3)
    cfg = method_config("crosskd", "gfl_tiny")
    with pytest.raises(UserError, match=match) as err:
        with_stores(cfg, model, _store(path="x.pth", **store), online=False)
    assert "\n" not in str(err.value)


def test_online_and_a_crossing_point_past_the_towers_are_refused():
    model = build_model("gfl_tiny", num_classes=3)
    with pytest.raises(UserError, match="drop --online"):
        with_stores(method_config("crosskd", "gfl_tiny"), model, _store(), online=True)
    cfg = method_config("crosskd", "gfl_tiny", crosskd_index=5)
    with pytest.raises(UserError, match="past the 4 tower convs"):
        with_stores(cfg, model, _store(path="x.pth"), online=False)
    with pytest.raises(UserError, match="--crosskd-index"):
        method_config("crosskd", "gfl_tiny", crosskd_index=-1)


@pytest.mark.parametrize(("name", "defaults"), [("gfl_tiny", (1.0, 1.0, 3)),
                                               ("mmfcos_tiny", (0.4, 0.75, 2)),
                                               ("retina_tiny", (1.0, 1.0, 3))])  # fmt: skip
def test_distill_model_runs_both_terms_from_one_cross_head_pass(tmp_path, name, defaults):
    torch.manual_seed(2)
    teacher = build_model(name, num_classes=3)
    path = save_checkpoint(tmp_path / "t.pth", teacher)
    student = build_model(name, num_classes=3).train()
    cfg = with_stores(method_config("crosskd", name), student,
                      _store(teacher=name, path=str(path)), online=False)  # fmt: skip
    assert (cfg.alpha, cfg.beta, cfg.loss_kwargs["index"]) == defaults  # the official configs'
    assert cfg.loss_kwargs["kind"] == name.split("_")[0]
    levels = list(student.strides)
    model = DistillModel(student, build_stage_losses(cfg, levels, 64, 64), cfg)
    x = torch.randn(2, 3, 64, 64)
    sizes = [(64, 64)] * 2
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([1])}] * 2
    with torch.no_grad():
        feats = teacher.extract_features(x)
    out = model(x, sizes, targets, TeacherBatch({"main": _views(feats)}))
    assert out["loss_cls_kd"].item() > 0 and out["loss_reg_kd"].item() > 0
    sum(out.values()).backward()
    first = getattr(student.head, "cls_convs", None)
    conv = first[0].conv if first else student.head.classification_head.conv[0][0]
    assert conv.weight.grad.abs().sum() > 0
    assert model.losses["crosskd"].pending_reg is None


def _distill(cache, data, out, *extra):
    argv = ["distill", "--student", "gfl_tiny", "--stages", "gfl_tiny", "--method", "crosskd",
            "--data", str(data), "--cache", str(cache), "--out", str(out), "--epochs", "1",
            "--batch-size", "2", "--warmup-iters", "2", "--num-workers", "0", "--device", "cpu",
            "--no-eval", "--img-scale", "128,96", *extra]  # fmt: skip
    code = _cli(argv)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return code, [r for r in rows if r.get("phase") == "train"]


@pytest.mark.slow
def test_cli_run_on_a_gfl_store_resumes_and_refuses_other_pairs(synthetic_root, tmp_path, capsys):
    weights = Path(__file__).parents[1] / "examples" / "demo_teachers" / "gfl_tiny.pth"
    cache = tmp_path / "cache"
    argv = ["precompute", "--teacher", "gfl_tiny", "--weights", str(weights), "--data",
            str(synthetic_root), "--cache", str(cache), "--img-scale", "128,96",
            "--batch-size", "2", "--num-workers", "0", "--device", "cpu", "--block", "4",
            "--store-logits"]  # fmt: skip
    assert _cli(argv) == 0
    store = TeacherStore.open(cache / "gfl_tiny" / "train2017.zarr")
    m = store.meta
    head = load_teacher_head(str(weights), "gfl_tiny", m.channels, 5, 5,
                             m.fingerprints["weights_sha256"])  # fmt: skip
    assert stored_logits_gap(store, head, range(3)) < 0.05  # float16 storage of maps and logits
    torch.manual_seed(3)
    other = build_model("gfl_tiny", num_classes=5).head.eval()
    assert stored_logits_gap(store, other, range(3)) > 0.5  # another head does not
    code, rows = _distill(cache, synthetic_root, tmp_path / "run", "--max-steps", "2")
    assert code == 0 and rows and rows[-1]["iteration"] == 2
    assert all(math.isfinite(r["loss_cls_kd"]) and r["loss_reg_kd"] > 0 for r in rows)
    code, rows = _distill(cache, synthetic_root, tmp_path / "run", "--max-steps", "1", "--resume")
    assert code == 0 and rows[-1]["iteration"] == 3 and rows[-1]["loss_reg_kd"] > 0
    capsys.readouterr()
    argv = ["distill", "--student", "retina_tiny", "--stages", "gfl_tiny", "--method", "crosskd",
            "--data", str(synthetic_root), "--cache", str(cache), "--out", str(tmp_path / "x"),
            "--epochs", "1", "--device", "cpu", "--img-scale", "128,96"]  # fmt: skip
    assert _cli(argv) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "same head family" in err and "Traceback" not in err

"""G-DetKD (``--method gdetkd``): the RoI level rule, the 1:3 region rule, SGFI's level weights and
loss, CKD's InfoNCE, its near-duplicate filter and queue, the registration, and a run from the
CLI on the session's tiny store (with a resume that matches the uninterrupted run)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import _cli
from torch import nn

from dfmsd_cli.distill.losses.gdetkd import CKDLoss, SGFILoss, info_nce, level_weights
from dfmsd_cli.distill.losses.regions import (
    batch_regions,
    duplicate_pairs,
    pool_assigned,
    roi_levels,
    sample_regions,
    teacher_strides,
)
from dfmsd_cli.distill.methods import method_config
from dfmsd_cli.distill.methods.registry import build_stage_losses
from dfmsd_cli.errors import UserError


def _square(side: float, x0: float = 0.0) -> list[float]:
    return [x0, 0.0, x0 + side, side]


# -- the RoI-to-level rule


def test_levels_equal_mmdetection_rule_on_p2_p5():
    """MMDetection's map_roi_levels: ⌊log2(√(wh)/56 + 1e-6)⌋ clamped to 0..3 on (4, 8, 16, 32)."""
    sides = torch.tensor([1.0, 20, 55.9, 56, 111.9, 112, 150, 223.9, 224, 300, 447.9, 448, 1300])
    boxes = torch.stack([torch.zeros_like(sides), torch.zeros_like(sides), sides, sides], 1)
    mmdet = torch.floor(torch.log2(sides / 56 + 1e-6)).clamp(0, 3).long()
    got = roi_levels(boxes, [4, 8, 16, 32])
    assert got.tolist() == mmdet.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3]
    wide = torch.tensor([[10.0, 10.0, 10.0 + 448.0, 10.0 + 28.0]])  # √(448·28) = 112 → level 1
    assert roi_levels(wide, [4, 8, 16, 32]).tolist() == [1]


def test_levels_keep_the_size_meaning_on_a_p3_store():
    """Starting at stride 8, a 224 px box still goes to stride 16 (MMDetection's relative rule
    would shift it to 32); below 112 px everything clamps to the finest level."""
    boxes = torch.tensor([_square(s) for s in (50.0, 112.0, 224.0, 448.0, 896.0, 1300.0)])
    strides = [8, 16, 32, 64]
    assert [strides[i] for i in roi_levels(boxes, strides)] == [8, 8, 16, 32, 64, 64]
    assert teacher_strides([128, 8, 16, 32, 64]) == [8, 16, 32, 64]  # the 4 finest


def test_pool_assigned_uses_the_level_of_each_box():
    maps = {4: torch.full((1, 1, 64, 64), 4.0), 8: torch.full((1, 1, 32, 32), 8.0)}
    rois = torch.tensor([[0.0, *_square(40.0, 10.0)], [0.0, *_square(200.0, 10.0)]])
    pooled = pool_assigned(maps, rois, [4, 8])
    assert pooled.shape == (2, 1, 7, 7)
    assert torch.all(pooled[0] == 4.0) and torch.all(pooled[1] == 8.0)


# -- regions: GT + stored detections, 1:3


def _detections():
    gt = torch.tensor([_square(10.0)])
    pos_det = [[0.0, 0.0, 10.0, 9.0]]  # IoU 0.9 with the GT: positive
    neg = [_square(10.0, 30.0 + 20 * k) for k in range(10)]  # far from the GT: negatives
    det = torch.tensor(pos_det + neg)
    scores = torch.tensor([0.5] + [0.1 * k for k in range(10)])  # negative k scores 0.1·k
    return gt, det, scores


def test_regions_one_to_three_exact_counts():
    gt, det, scores = _detections()
    boxes, positive = sample_regions(gt, det, scores)
    assert positive.tolist() == [True] * 2 + [False] * 6  # 2 positives (GT + det), 6 negatives
    assert torch.equal(boxes[0], gt[0]) and torch.equal(boxes[1], det[0])
    # the six highest-scoring negatives, best first: negatives 9, 8, ..., 4
    assert boxes[2:, 0].tolist() == [30.0 + 20 * k for k in (9, 8, 7, 6, 5, 4)]
    boxes, positive = sample_regions(gt, det, scores, max_pos=1)
    assert positive.tolist() == [True] + [False] * 3  # the GT alone, then 3 negatives
    boxes, positive = sample_regions(gt[:0], det, scores)
    assert positive.tolist() == [False] * 3  # no GT: every detection is negative, 3 kept
    degenerate = torch.tensor([[5.0, 5.0, 5.0, 9.0]])
    assert sample_regions(degenerate, det[:0], scores[:0])[0].shape == (0, 4)


def test_batch_regions_index_images_and_allow_no_detections():
    gt, det, scores = _detections()
    rois, positive = batch_regions([gt, gt], [det, det[:0]], [scores, scores[:0]], "cpu")
    assert rois[:, 0].tolist() == [0.0] * 8 + [1.0]  # image 1: its GT alone, no detections
    assert positive.sum() == 3
    rois, _ = batch_regions([gt], [], [], "cpu")  # a view without stored detections
    assert rois.tolist() == [[0.0, *gt[0].tolist()]]


# -- SGFI


def test_level_weights_are_a_softmax_over_levels():
    key_t = torch.tensor([[1.0, 0.0]])
    keys_s = torch.tensor([[[0.0, 1.0]], [[1.0, 0.0]], [[-1.0, 0.0]]])  # (L=3, N=1, D=2)
    alpha = level_weights(keys_s, key_t, 1.0)
    e = [1.0, math.e, math.exp(-1)]
    assert alpha[:, 0].tolist() == pytest.approx([x / sum(e) for x in e])
    assert float(alpha.sum()) == pytest.approx(1.0) and int(alpha[:, 0].argmax()) == 1
    assert level_weights(keys_s, key_t, 0.5)[1, 0] > alpha[1, 0]  # a lower τ sharpens


def _identity_sgfi(c: int) -> SGFILoss:
    loss = SGFILoss(c, c)
    with torch.no_grad():
        loss.adapt.weight.copy_(torch.eye(c)[:, :, None, None])
        loss.adapt.bias.zero_()
        for m in loss.embed:
            if isinstance(m, nn.Conv2d):
                m.bias.zero_()
    return loss


def test_sgfi_zero_when_every_level_equals_the_teacher():
    torch.manual_seed(0)
    loss = _identity_sgfi(4)
    t = torch.randn(3, 4, 7, 7)
    value, alpha = loss.pooled_loss(t.expand(5, -1, -1, -1, -1), t)
    assert value.item() == pytest.approx(0.0, abs=1e-10)
    assert torch.allclose(alpha.sum(0), torch.ones(3))


def test_sgfi_matching_level_takes_the_weight_and_the_loss_vanishes():
    """Student = teacher at level 1, zeros elsewhere (keys 0 with zero biases): level 1's key
    K_t·K_t / τ dominates, and with a small τ L_feat is ~0; with τ = 1e3 it is clearly not."""
    torch.manual_seed(0)
    loss = _identity_sgfi(4)
    t = torch.randn(2, 4, 7, 7)
    s = torch.stack([torch.zeros_like(t), t, torch.zeros_like(t)])
    value, alpha = loss.pooled_loss(s, t)
    assert torch.all(alpha.argmax(0) == 1) and torch.allclose(alpha.sum(0), torch.ones(2))
    with torch.no_grad():
        loss.log_tau.fill_(math.log(1e-4))
    value, alpha = loss.pooled_loss(s, t)
    assert value.item() < 1e-8
    with torch.no_grad():
        loss.log_tau.fill_(math.log(1e8))  # uniform weights: S_agg = T/3
    value, _ = loss.pooled_loss(s, t)
    assert value.item() == pytest.approx(float(((t * 2 / 3) ** 2).mean()), rel=1e-4)


def test_sgfi_forward_pools_from_maps_and_gt_boxes():
    loss = _identity_sgfi(2)
    student = {8: torch.full((1, 2, 12, 16), 0.5), 16: torch.full((1, 2, 6, 8), 0.5)}
    teacher = {8: torch.full((1, 2, 12, 16), 0.5), 16: torch.full((1, 2, 6, 8), 0.5)}
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 60.0, 40.0]])}]
    value = loss(student, teacher, [], [], targets)
    assert value.item() == pytest.approx(0.0, abs=1e-12)
    teacher = {s: m + 1.0 for s, m in teacher.items()}
    assert loss(student, teacher, [], [], targets).item() == pytest.approx(1.0)
    assert loss(student, teacher, [], [], [{"boxes": torch.zeros(0, 4)}]).item() == 0.0


# -- CKD


def test_info_nce_by_hand():
    z_s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    z_t = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    queue = torch.tensor([[-1.0, 0.0]])
    g = 0.5
    r = 1 / math.sqrt(2)
    cos = [[r, 0.0, -1.0], [r, 1.0, 0.0]]  # rows: student 0, 1; columns: teacher 0, 1, queue
    expect = [
        -math.log(math.exp(cos[i][i] / g) / sum(math.exp(c / g) for c in cos[i])) for i in (0, 1)
    ]
    got = info_nce(z_s, z_t, queue, g)
    assert float(got) == pytest.approx(sum(expect) / 2, rel=1e-6)
    exclude = torch.tensor([[False, True], [False, False]])  # teacher 1 is not 0's negative
    row0 = -math.log(math.exp(r / g) / (math.exp(r / g) + math.exp(-1 / g)))
    got = info_nce(z_s, z_t, queue, g, exclude)
    assert float(got) == pytest.approx((row0 + expect[1]) / 2, rel=1e-6)
    assert float(info_nce(z_s, z_t, queue[:0], g)) == pytest.approx(
        sum(-math.log(math.exp(cos[i][i] / g) / sum(math.exp(c / g) for c in cos[i][:2]))
            for i in (0, 1)) / 2, rel=1e-6)  # fmt: skip


def test_duplicates_same_image_high_iou_only():
    a, a2, b = [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 9.0], [50.0, 50.0, 60.0, 60.0]
    rois = torch.tensor([[0.0, *a], [0.0, *a2], [0.0, *b], [1.0, *a]])
    dup = duplicate_pairs(rois, 0.5)
    assert dup.nonzero().tolist() == [[0, 1], [1, 0]]  # not image 1's copy, not the diagonal
    assert not duplicate_pairs(rois, 0.95).any()


def test_queue_is_a_ring_buffer_in_the_state_dict():
    ckd = CKDLoss(2, 2, queue_size=3, dim=2)
    rows = torch.arange(8.0).reshape(4, 2)
    ckd.enqueue(rows[:2])
    assert (int(ckd.queue_len), int(ckd.queue_ptr)) == (2, 2)
    assert torch.equal(ckd.queued(), rows[:2])
    ckd.enqueue(rows[2:])
    assert (int(ckd.queue_len), int(ckd.queue_ptr)) == (3, 1)
    assert torch.equal(ckd.queue, torch.stack([rows[3], rows[1], rows[2]]))
    state = ckd.state_dict()
    assert {"queue", "queue_ptr", "queue_len"} <= set(state)
    fresh = CKDLoss(2, 2, queue_size=3, dim=2)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.queue, ckd.queue) and int(fresh.queue_ptr) == 1


def test_ckd_forward_enqueues_when_training_only():
    torch.manual_seed(0)
    ckd = CKDLoss(2, 3, queue_size=16)
    student = {8: torch.randn(1, 2, 12, 16), 16: torch.randn(1, 2, 6, 8)}
    teacher = {8: torch.randn(1, 3, 12, 16), 16: torch.randn(1, 3, 6, 8)}
    gt, det, scores = _detections()
    targets = [{"boxes": gt * 4}]
    value = ckd(student, teacher, [det * 4], [scores], targets)  # 8 regions
    assert value.requires_grad and value.item() > 0 and int(ckd.queue_len) == 8
    ckd.eval()
    ckd(student, teacher, [det * 4], [scores], targets)
    assert int(ckd.queue_len) == 8


# -- registration


def test_gdetkd_config_terms_and_switches():
    cfg = method_config("gdetkd", "retina_tiny")
    assert (cfg.alpha, cfg.stage_loss, cfg.sal) == (1.0, "sgfi", False)
    assert cfg.spec.store.boxes and cfg.needs_store
    assert "L_feat+L_ckd (heterogeneous form: no class-aware localisation KD" in cfg.summary()
    assert set(build_stage_losses(cfg, [8, 16], 4, 4)) == {"stage", "ckd"}
    cfg = method_config("gdetkd", "frcnn_tiny", ckd=False, ckd_queue=32)
    assert cfg.family == "two_stage" and set(build_stage_losses(cfg, [8], 4, 4)) == {"stage"}
    cfg = method_config("gdetkd", "retina_tiny", sgfi=False, ckd_queue=32)
    mods = build_stage_losses(cfg, [8], 4, 4)
    assert set(mods) == {"ckd"} and mods["ckd"].queue.shape[0] == 32
    assert cfg.loss_kwargs["parts"].startswith("L_ckd (")
    with pytest.raises(UserError, match="--no-sgfi with --no-ckd"):
        method_config("gdetkd", "retina_tiny", sgfi=False, ckd=False)
    with pytest.raises(UserError, match="--ckd-gamma must be positive"):
        method_config("gdetkd", "retina_tiny", ckd_gamma=0.0)
    with pytest.raises(UserError, match="--ckd-iou must be in"):
        method_config("gdetkd", "retina_tiny", ckd_iou=1.5)
    with pytest.raises(UserError, match="not of 'mgd'"):
        method_config("mgd", "retina_tiny", ckd_queue=8)


# -- end to end from the CLI on the session store


def _distill(out, tiny_cache, synthetic_root, *extra):
    argv = ["distill", "--student", "retina_tiny", "--stages", "retina_tiny", "--method",
            "gdetkd", "--data", str(synthetic_root), "--cache", str(tiny_cache), "--out",
            str(out), "--epochs", "1", "--batch-size", "2", "--warmup-iters", "2",
            "--num-workers", "0", "--device", "cpu", "--no-eval", "--img-scale", "128,96",
            *extra]  # fmt: skip
    return _cli(argv)


@pytest.mark.slow
def test_gdetkd_from_the_cli_and_resume(tiny_cache, synthetic_root, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert _distill(full, tiny_cache, synthetic_root, "--max-steps", "4") == 0
    rows = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("phase") == "train"]
    assert train and all(r["loss_kd"] > 0 and r["loss_ckd"] > 0 for r in train)
    resolved = json.loads((full / "config.json").read_text())["options"]["resolved"]
    assert resolved["name"] == "gdetkd" and resolved["loss_kwargs"]["ckd_queue"] == 4096
    assert _distill(part, tiny_cache, synthetic_root, "--max-steps", "2") == 0
    last = torch.load(part / "last.pth", map_location="cpu", weights_only=True)
    assert int(last["distill_state"]["ckd.queue_len"]) > 0  # the queue is checkpointed
    assert _distill(part, tiny_cache, synthetic_root, "--max-steps", "2", "--resume") == 0
    a = torch.load(full / "student.pth", map_location="cpu", weights_only=True)["state_dict"]
    b = torch.load(part / "student.pth", map_location="cpu", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_losses_are_float32_under_autocast():
    torch.manual_seed(0)
    sgfi, ckd = SGFILoss(2, 3), CKDLoss(2, 3, queue_size=8)
    student = {8: torch.randn(1, 2, 12, 16) * 50, 16: torch.randn(1, 2, 6, 8) * 50}
    teacher = {8: torch.randn(1, 3, 12, 16) * 50, 16: torch.randn(1, 3, 6, 8) * 50}
    gt, det, scores = _detections()
    args = (student, teacher, [det * 4], [scores], [{"boxes": gt * 4}])
    ref = sgfi(*args).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, c = sgfi(*args), ckd(*args)
    assert low.dtype == c.dtype == torch.float32 and math.isfinite(c.item())
    assert low.item() == pytest.approx(ref, rel=0.05)


def test_level_weights_of_fp16_keys_do_not_overflow():
    """Keys of 64 entries of 100 have a dot product of 6.4e5 > fp16's max (65504)."""
    keys_s = torch.full((2, 1, 64), 100.0, dtype=torch.float16)
    keys_s[1] *= 0.5
    alpha = level_weights(keys_s, keys_s[0, :, :], 1e5)
    assert torch.isfinite(alpha).all() and float(alpha.sum()) == pytest.approx(1.0)
    assert float(alpha[0, 0]) > float(alpha[1, 0])

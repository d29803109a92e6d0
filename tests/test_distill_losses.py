"""Distillation losses on small hand-computed tensors (docs/method.md has the formulas)."""

from __future__ import annotations

import math

import pytest
import torch

from dfmsd_cli.distill.losses import (
    DualMaskingLevel,
    DualMaskingLoss,
    FGDLoss,
    MGDLevel,
    SFALoss,
    channel_attention,
    dual_masks,
    foreground_background_masks,
    generation_loss,
    match_levels,
    pkd_level_loss,
    raw_statistics,
    select_fraction,
    spatial_attention,
)

# float(loss) on a graph-attached scalar is what these checks want
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # every random tensor and mask below is reproducible


def test_raw_statistics_by_hand():
    f = torch.tensor([[[[1.0, -3.0]], [[-2.0, 5.0]]]])  # (1, 2, 1, 2)
    valid = torch.tensor([[[True, False]]])
    spatial, channel = raw_statistics(f, valid)
    assert torch.allclose(spatial, torch.tensor([[[1.5, 0.0]]]))
    assert torch.allclose(channel, torch.tensor([[1.0, 2.0]]))  # mean |F| over the valid cell


def test_attention_by_hand_and_valid_only():
    tau = 0.5
    stat = torch.tensor([[[0.0, tau * math.log(3.0), 99.0]]])  # (1, 1, 3); last cell is padding
    valid = torch.tensor([[[True, True, False]]])
    a_s = spatial_attention(stat, valid, tau)
    # softmax([0, ln3]) = [1/4, 3/4], times n_valid = 2; padding gets exactly 0
    assert torch.allclose(a_s, torch.tensor([[[0.5, 1.5, 0.0]]]))
    a_c = channel_attention(torch.tensor([[0.0, tau * math.log(3.0)]]), tau)
    assert torch.allclose(a_c, torch.tensor([[0.5, 1.5]]))


def test_select_fraction_top_rule_by_hand():
    scores = torch.tensor([[3.0, 1.0, 2.0, 9.0]])
    valid = torch.tensor([[True, True, True, False]])
    m = select_fraction(scores, valid, 0.5, "top")  # k = round(0.5 * 3) = 2, index 3 is padding
    assert m.tolist() == [[True, False, True, False]]


@pytest.mark.parametrize("rule", ["sample", "top", "random"])
def test_masks_respect_valid_region_and_count(rule):
    g = torch.Generator().manual_seed(0)
    b, c, h, w = 3, 8, 5, 7
    valid = torch.zeros(b, h, w, dtype=torch.bool)
    valid[0, :5, :7] = True
    valid[1, :3, :4] = True
    valid[2, :2, :6] = True
    spatial = torch.rand(b, h, w, generator=g) * valid
    channel = torch.rand(b, c, generator=g)
    m_s, m_c = dual_masks(spatial, channel, valid, 0.65, 0.25, 0.5, rule)
    assert not (m_s & ~valid).any()
    for i in range(b):
        assert int(m_s[i].sum()) == round(0.65 * int(valid[i].sum()))
    assert m_c.sum(dim=1).tolist() == [2, 2, 2]


def test_sample_rule_follows_attention():
    g = torch.Generator().manual_seed(1)
    scores = torch.tensor([[1.0, 1000.0, 1.0, 1.0]]).expand(400, 4)
    valid = torch.ones(400, 4, dtype=torch.bool)
    picks = select_fraction(scores, valid, 0.25, "sample", g).float().mean(dim=0)
    assert picks[1] > 0.95  # p ∝ score: 1000 / 1003
    uniform = select_fraction(scores, valid, 0.25, "random", g).float().mean(dim=0)
    assert 0.15 < float(uniform[1]) < 0.35


def test_generation_loss_by_hand_and_zero_at_teacher():
    t = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    valid = torch.ones(2, 2, 2, dtype=torch.bool)
    assert float(generation_loss(t.clone(), t, valid)) == 0.0
    g = t.clone()
    g[0, 0, 0, 0] += 1.0
    g[1, 2, 1, 1] += 2.0  # (2)^2 = 4
    g[1, 1, 0, 1] += 5.0  # on a padding cell: ignored
    valid[1, 0, 1] = False
    # float32 rounding of (t + 1) - t: relative tolerance
    assert math.isclose(float(generation_loss(g, t, valid)), (1.0 + 4.0) / 2, rel_tol=1e-5)


def _identity_generation(level: DualMaskingLevel) -> None:
    """Make both generation blocks the identity on non-negative maps (center-tap 1×1 kernels)."""
    with torch.no_grad():
        for gen in (level.gen_s, level.gen_c):
            for conv in (gen[0], gen[2]):
                conv.weight.zero_()
                conv.bias.zero_()
                for k in range(conv.weight.shape[0]):
                    conv.weight[k, k, 1, 1] = 1.0


def test_dual_masking_level_zero_when_reconstruction_is_teacher_and_masked_cells_by_hand():
    t = torch.rand(1, 2, 2, 3) + 0.1
    valid = torch.ones(1, 2, 3, dtype=torch.bool)
    level = DualMaskingLevel(2, 2, lambda_s=0.0, lambda_c=0.0, rule="top")
    _identity_generation(level)
    with torch.no_grad():
        level.fuse_logits.copy_(torch.tensor([50.0, -50.0]))  # spatial branch only
    assert float(level(t.clone(), t, valid).detach()) < 1e-8
    # mask the top-attention half of the cells: G = 0 there, so L = Σ_c T² over those cells
    level.lambda_s = 0.5
    spatial, channel = raw_statistics(t, valid)
    top = spatial.flatten().argsort(descending=True)[:3]
    expected = float((t.flatten(2)[0][:, top] ** 2).sum())
    assert math.isclose(float(level(t.clone(), t, valid).detach()), expected, rel_tol=1e-5)


def test_dual_masking_gradients_reach_student_and_fusion():
    level = DualMaskingLevel(4, 6)
    s = torch.randn(2, 4, 5, 5, requires_grad=True)
    t = torch.randn(2, 6, 5, 5)
    loss = level(s, t, torch.ones(2, 5, 5, dtype=torch.bool))
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert level.fuse_logits.grad is not None and level.fuse_logits.grad.abs().sum() > 0


def test_heterogeneous_levels_matched_by_stride_and_resized():
    student = {8: torch.randn(1, 4, 8, 8), 16: torch.randn(1, 4, 4, 4), 32: torch.randn(1, 4, 2, 2)}
    teacher = {
        4: torch.randn(1, 6, 16, 16),
        8: torch.randn(1, 6, 8, 8),
        16: torch.randn(1, 6, 5, 5),
    }
    valid = {s: torch.ones(1, *t.shape[-2:], dtype=torch.bool) for s, t in teacher.items()}
    levels = match_levels(list(student), list(teacher))
    assert levels == [8, 16]
    loss = DualMaskingLoss(levels, 4, 6)(student, teacher, valid)
    loss = loss.detach()
    assert loss.ndim == 0 and math.isfinite(float(loss)) and float(loss) > 0
    with pytest.raises(ValueError):
        DualMaskingLoss([], 4, 6)


def test_mgd_mask_fraction_and_zero_loss():
    level = MGDLevel(3, 3, lam=0.0)
    with torch.no_grad():
        for conv in (level.generation[0], level.generation[2]):
            conv.weight.zero_()
            conv.bias.zero_()
            for k in range(3):
                conv.weight[k, k, 1, 1] = 1.0
    t = torch.rand(2, 3, 4, 4)
    assert float(level(t.clone(), t, torch.ones(2, 4, 4, dtype=torch.bool))) < 1e-10
    level.lam = 0.65
    torch.manual_seed(0)
    big = torch.ones(1, 3, 64, 64)
    loss = level(big, big, torch.ones(1, 64, 64, dtype=torch.bool))
    masked_fraction = float(loss) / (3 * 64 * 64)  # each masked cell costs C·1² (G = 0, T = 1)
    assert 0.6 < masked_fraction < 0.7


def test_pkd_by_hand_and_affine_invariance():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 4, 5, generator=g)
    t = torch.randn(2, 3, 4, 5, generator=g)
    valid = torch.ones(2, 4, 5, dtype=torch.bool)
    valid[1, 2:, :] = False
    assert float(pkd_level_loss(t, t, valid)) < 1e-10
    n = int(valid.sum())  # S = −T: (2 T̂)² / 2 averages 2·(n−1)/n with the unbiased std
    assert math.isclose(float(pkd_level_loss(-t, t, valid)), 2 * (n - 1) / n, rel_tol=1e-4)
    base = float(pkd_level_loss(s, t, valid))
    a = torch.tensor([0.5, 3.0, 7.0]).view(1, 3, 1, 1)
    b = torch.tensor([-2.0, 0.1, 40.0]).view(1, 3, 1, 1)
    assert math.isclose(float(pkd_level_loss(a * s + b, t, valid)), base, rel_tol=1e-4)
    assert math.isclose(float(pkd_level_loss(s, a * t + b, valid)), base, rel_tol=1e-4)
    # statistics over valid cells only: whatever sits in the padding changes nothing
    s2 = s.clone()
    s2[1, :, 2:, :] = 1e3
    assert math.isclose(float(pkd_level_loss(s2, t, valid)), base, rel_tol=1e-6)


def test_sfa_multilevel_sums_levels():
    s = {8: torch.randn(2, 3, 4, 4), 16: torch.randn(2, 3, 2, 2)}
    t = {8: torch.randn(2, 3, 4, 4), 16: torch.randn(2, 3, 2, 2)}
    v = {k: torch.ones(2, *x.shape[-2:], dtype=torch.bool) for k, x in t.items()}
    total = SFALoss([8, 16], 3, 3)(s, t, v)
    expected = sum(float(pkd_level_loss(s[k], t[k], v[k])) for k in (8, 16))
    assert math.isclose(float(total), expected, rel_tol=1e-6)


def _loop_masks(boxes, valid, stride):
    """Reference: FGD's per-box loop (yzd-v/FGD) with stride scaling and valid cells."""
    b, h, w = valid.shape
    fg = torch.zeros(b, h, w)
    for i in range(b):
        for x1, y1, x2, y2 in boxes[i].tolist():
            wmin, hmin = (
                min(int(math.floor(x1 / stride)), w - 1),
                min(int(math.floor(y1 / stride)), h - 1),
            )
            wmax, hmax = (
                min(int(math.ceil(x2 / stride)), w - 1),
                min(int(math.ceil(y2 / stride)), h - 1),
            )
            area = 1.0 / ((hmax + 1 - hmin) * (wmax + 1 - wmin))
            region = fg[i, hmin : hmax + 1, wmin : wmax + 1]
            fg[i, hmin : hmax + 1, wmin : wmax + 1] = torch.clamp(region, min=area)
    fg = fg * valid
    bg = ((fg == 0) & valid).float()
    bg = bg / bg.flatten(1).sum(1).clamp_min(1)[:, None, None]
    return fg, bg


def test_fgd_masks_by_hand_and_against_loop():
    valid = torch.ones(1, 4, 4, dtype=torch.bool)
    boxes = torch.tensor([[[0.0, 0.0, 16.0, 8.0]]])  # stride 8: x cells 0..2, y cells 0..1
    fg, bg = foreground_background_masks(boxes, torch.ones(1, 1, dtype=torch.bool), valid, 8)
    expected = torch.zeros(1, 4, 4)
    expected[0, 0:2, 0:3] = 1 / 6
    assert torch.allclose(fg, expected)
    assert torch.allclose(bg.sum(), torch.tensor(1.0)) and float(bg[0, 0, 0]) == 0.0
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(2, 5, 2, generator=g) * 60
    wh = torch.rand(2, 5, 2, generator=g) * 40 + 1
    many = torch.cat([xy, xy + wh], dim=-1)
    valid = torch.ones(2, 8, 10, dtype=torch.bool)
    valid[1, 6:, :] = False
    fg, bg = foreground_background_masks(many, torch.ones(2, 5, dtype=torch.bool), valid, 8)
    ref_fg, ref_bg = _loop_masks(many, valid, 8)
    assert torch.allclose(fg, ref_fg) and torch.allclose(bg, ref_bg)


def test_fgd_zero_when_student_equals_teacher_and_positive_otherwise():
    t = {8: torch.randn(2, 4, 6, 6), 16: torch.randn(2, 4, 3, 3)}
    v = {k: torch.ones(2, *x.shape[-2:], dtype=torch.bool) for k, x in t.items()}
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 20.0]])}, {"boxes": torch.zeros(0, 4)}]
    loss_fn = FGDLoss([8, 16], 4, 4)
    same = {k: x.clone().requires_grad_(True) for k, x in t.items()}
    assert float(loss_fn(same, t, v, targets=targets)) < 1e-12  # GcBlocks start as identity
    other = {k: torch.randn_like(x, requires_grad=True) for k, x in t.items()}
    loss = loss_fn(other, t, v, targets=targets)
    loss.backward()
    assert float(loss) > 0 and other[8].grad.abs().sum() > 0


def test_method_defaults_per_family_and_overrides():
    from dfmsd_cli.distill.methods import method_config, stage_has_me
    from dfmsd_cli.errors import UserError

    one = method_config("dfmsd", "retina_r50")
    assert (one.alpha, one.beta, one.gamma, one.sal, one.me, one.sfa) == (
        5e-5,
        0.25,
        6.0,
        True,
        True,
        True,
    )
    assert one.loss_kwargs == {"lambda_s": 0.65, "lambda_c": 0.5, "tau": 0.5, "rule": "sample"}
    assert stage_has_me(one, 1, 2) and not stage_has_me(one, 0, 2)
    assert method_config("mgd", "retina_r50").loss_kwargs["lam"] == 0.65
    two = method_config("mgd", "frcnn_r50")
    assert (two.family, two.alpha, two.loss_kwargs["lam"]) == ("two_stage", 5e-7, 0.45)
    assert method_config("fgd", "mmfcos_r50").loss_kwargs["temperature"] == 0.8
    assert method_config("pkd", "gfl_r50").alpha == 10.0
    abl = method_config("dfmsd", "retina_r50", me=False, sfa=False, alpha=1e-4, mask_rule="top")
    assert (abl.me, abl.sfa, abl.alpha, abl.loss_kwargs["rule"]) == (False, False, 1e-4, "top")
    assert not method_config("dfmsd", "retina_r50", me_stages="none").me
    for bad in (
        lambda: method_config("mdg", "retina_r50"),
        lambda: method_config("mgd", "retina_r50", sfa=True),
        lambda: method_config("pkd", "retina_r50", lambda_s=0.5),
        lambda: method_config("dfmsd", "retina_r50", lambda_c=1.5),
        lambda: method_config("dfmsd", "yolo_r50"),
    ):
        with pytest.raises(UserError):
            bad()

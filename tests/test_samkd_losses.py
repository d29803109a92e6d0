"""SAMKD's losses (SFD, SLD) and window helpers on small hand-computed tensors (docs/method.md)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dfmsd_cli.distill.losses import (
    DualMaskingLevel,
    SFDLevel,
    SFDLoss,
    SLDLoss,
    feature_difference_weights,
    logit_kd_map,
    max_pool_valid,
    raw_statistics,
    window_ids,
    window_masks,
    windowed_channel_mask,
    windowed_channel_stat,
    windowed_spatial_attention,
    windowed_spatial_mask,
)

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _letterboxed_valid() -> torch.Tensor:
    """Three images on a 7×9 canvas with valid extents 7×9, 5×6 and 3×2 (top-left)."""
    valid = torch.zeros(3, 7, 9, dtype=torch.bool)
    valid[0] = True
    valid[1, :5, :6] = True
    valid[2, :3, :2] = True
    return valid


def test_window_ids_by_hand_uneven_division_and_padding():
    valid = _letterboxed_valid()
    ids = window_ids(valid, 4)
    # 7 rows into 4: boundaries floor(7i/4) = 0, 1, 3, 5, 7; 9 cols: 0, 2, 4, 6, 9
    assert (ids[0, :, 0] // 4).tolist() == [0, 1, 1, 2, 2, 3, 3]
    assert (ids[0, 0, :] % 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 3]
    # windows follow the image's own extent (5×6), never the canvas; padding is -1
    ids2 = window_ids(valid, 2)
    assert ids2[1, :5, 0].tolist() == [0, 0, 2, 2, 2]
    assert ids2[1, 0, :6].tolist() == [0, 0, 0, 1, 1, 1]
    assert (ids2[1][~valid[1]] == -1).all()
    # 3 rows into 4 windows: row window 0 is empty, rows go to 1, 2, 3
    assert (ids[2, :3, 0] // 4).tolist() == [1, 2, 3]
    # every valid cell in exactly one window
    assert (window_masks(valid, 4).sum(dim=1) == valid.long()).all()


def test_windowed_attention_by_hand():
    tau = 0.5
    stat = torch.zeros(1, 2, 4)
    stat[0, 0, 1] = tau * math.log(3.0)
    stat[0, 1, 3] = 99.0  # a padding cell: never counted
    valid = torch.ones(1, 2, 4, dtype=torch.bool)
    valid[0, 1, 3] = False
    a = windowed_spatial_attention(stat, valid, 2, tau)
    # extent 2×4 → windows of 1×2 cells; window 0 = [0, ln3·τ]: softmax [1/4, 3/4] × 2 cells
    # window 3 holds one valid cell: weight 1; window 1 and 2 are flat: 1, 1
    expected = torch.tensor([[[0.5, 1.5, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]]])
    assert torch.allclose(a, expected)


@pytest.mark.parametrize("grid", [1, 2, 4])
def test_windowed_attention_sums_to_cell_count_per_window(grid):
    valid = _letterboxed_valid()
    stat = torch.rand(3, 7, 9) * 5
    a = windowed_spatial_attention(stat, valid, grid, 0.5)
    wv = window_masks(valid, grid)
    per_window = (a[:, None] * wv).sum(dim=(2, 3))
    assert torch.allclose(per_window, wv.sum(dim=(2, 3)).float(), atol=1e-4)
    assert (a[~valid] == 0).all()


def test_windowed_mask_top_rule_by_hand():
    att = torch.tensor([[[3.0, 1.0, 5.0, 2.0], [0.5, 0.1, 9.0, 0.2]]])  # (1, 2, 4)
    valid = torch.ones(1, 2, 4, dtype=torch.bool)
    valid[0, 1, 2] = False  # the highest score sits on padding
    m = windowed_spatial_mask(att, valid, 2, 0.5, "top")
    # windows (1×2): [3, 1] → 3; [5, 2] → 5; [0.5, 0.1] → 0.5; [pad, 0.2] → 1 valid cell,
    # round(0.5 · 1) = 0 (round half to even) → none
    expected = [[[True, False, True, False], [True, False, False, False]]]
    assert m.tolist() == expected


@pytest.mark.parametrize("rule", ["sample", "top", "random"])
@pytest.mark.parametrize("grid", [1, 2, 4])
def test_windowed_masks_exact_count_per_window_never_padding(rule, grid):
    valid = _letterboxed_valid()
    g = torch.Generator().manual_seed(3)
    att = windowed_spatial_attention(torch.rand(3, 7, 9, generator=g), valid, grid)
    m = windowed_spatial_mask(att, valid, grid, 0.65, rule, g)
    assert not (m & ~valid).any()
    wv = window_masks(valid, grid)
    chosen = (m[:, None] & wv).sum(dim=(2, 3))
    wanted = torch.round(wv.sum(dim=(2, 3)).float() * 0.65).long()
    assert torch.equal(chosen, wanted)
    # channel masks: round(λ_c · C) channels per window, constant over the window, off padding
    feat = torch.rand(3, 8, 7, 9, generator=g)
    mc = windowed_channel_mask(windowed_channel_stat(feat, valid, grid), valid, grid, 0.25)
    assert not (mc & ~valid[:, None]).any()
    for b in range(3):
        for k in range(grid * grid):
            cells = mc[b][:, wv[b, k]]  # (C, n_w)
            if cells.shape[1]:
                assert (cells == cells[:, :1]).all() and int(cells[:, 0].sum()) == 2


def test_windowed_channel_stat_by_hand():
    f = torch.tensor([[[[1.0, -3.0, 5.0, 7.0]]]])  # (1, 1, 1, 4)
    valid = torch.tensor([[[True, True, True, False]]])
    stat = windowed_channel_stat(f, valid, 2)
    # extent 1×3 into 2×2: the one row goes to row window 1 (row window 0 is empty);
    # column boundaries 0, 1, 3 → window 2 = col 0, window 3 = cols 1–2, padding ignored
    assert torch.allclose(stat[0, :, 0], torch.tensor([0.0, 0.0, 1.0, 4.0]))


def test_max_pool_valid_ignores_padding():
    x = torch.tensor([[[[1.0, 2.0, 99.0], [-4.0, -1.0, 99.0]]]])  # (1, 1, 2, 3)
    valid = torch.tensor([[[True, True, False], [True, True, False]]])
    pooled, pv = max_pool_valid(x, valid, 2)
    assert pooled.tolist() == [[[[2.0, 0.0]]]] and pv.tolist() == [[[True, False]]]


def _same_weights(sfd: SFDLevel, dfm: DualMaskingLevel) -> None:
    sfd.dfm.load_state_dict(dfm.state_dict())


def test_sfd_with_one_global_grid_is_dfm():
    dfm = DualMaskingLevel(4, 6)
    sfd = SFDLevel(4, 6, grids=(1,))
    _same_weights(sfd, dfm)
    s, t = torch.randn(2, 4, 5, 6), torch.randn(2, 6, 5, 6)
    valid = torch.ones(2, 5, 6, dtype=torch.bool)
    sp, ch = raw_statistics(t, valid)
    torch.manual_seed(5)
    expected = dfm(s, t, valid, sp, ch)
    torch.manual_seed(5)  # the same Gumbel draws
    assert torch.allclose(sfd(s, t, valid, sp, ch), expected)


def _identity_generation(level: SFDLevel) -> None:
    with torch.no_grad():
        for gen in (level.dfm.gen_s, level.dfm.gen_c):
            for conv in (gen[0], gen[2]):
                conv.weight.zero_()
                conv.bias.zero_()
                for k in range(conv.weight.shape[0]):
                    conv.weight[k, k, 1, 1] = 1.0
        level.dfm.fuse_logits.copy_(torch.tensor([50.0, -50.0]))  # spatial branch only


def test_sfd_masked_cells_by_hand():
    t = torch.rand(1, 2, 2, 4) + 0.1  # non-negative: the identity generation is exact
    valid = torch.ones(1, 2, 4, dtype=torch.bool)
    level = SFDLevel(2, 2, grids=(2,), lambda_s=0.0, lambda_c=0.0, rule="top", scale_weights=(1.0,))
    _identity_generation(level)
    assert float(level(t.clone(), t, valid)) < 1e-8
    # λ_s = 0.5: in every 1×2 window its higher-|T| cell is zeroed, so L = Σ_c T² there / B
    level.dfm.lambda_s = 0.5
    a = t.abs().mean(dim=1)[0]  # (2, 4)
    expected = 0.0
    for r in range(2):
        for c0 in (0, 2):
            c = c0 if a[r, c0] >= a[r, c0 + 1] else c0 + 1
            expected += float((t[0, :, r, c] ** 2).sum())
    assert math.isclose(float(level(t.clone(), t, valid)), expected, rel_tol=1e-5)


def test_sfd_scale_weights_learnable_and_fixed():
    s, t = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    valid = torch.ones(1, 8, 8, dtype=torch.bool)
    learn = SFDLevel(3, 3, scale_weights="learnable")
    assert torch.allclose(learn.scale_weights(), torch.full((3,), 1 / 3))
    assert torch.allclose(SFDLevel(3, 3).scale_weights(), torch.full((3,), 1 / 3))
    fixed = SFDLevel(3, 3, scale_weights=(0.5, 0.25, 0.25))
    fixed.dfm.load_state_dict(learn.dfm.state_dict())
    torch.manual_seed(1)
    per_scale = fixed.scale_losses(s, t, valid)
    torch.manual_seed(1)
    total = fixed(s, t, valid)
    assert torch.allclose(total, (torch.tensor([0.5, 0.25, 0.25]) * per_scale).sum())
    with pytest.raises(ValueError):
        SFDLevel(3, 3, scale_weights=(1.0, 0.0))
    with pytest.raises(ValueError):
        SFDLevel(3, 3, grids=(2, 3), pool=True)  # 2 does not divide 3


@pytest.mark.parametrize("pool", [False, True])
def test_sfd_gradients_reach_student_fusion_and_scale_logits(pool):
    loss_fn = SFDLoss([8, 16], 4, 6, pool=pool, scale_weights="learnable")
    valid = _letterboxed_valid()
    s = {8: torch.randn(3, 4, 7, 9, requires_grad=True), 16: torch.randn(3, 4, 4, 5)}
    t = {8: torch.randn(3, 6, 7, 9), 16: torch.randn(3, 6, 4, 5)}
    v = {8: valid, 16: torch.ones(3, 4, 5, dtype=torch.bool)}
    loss = loss_fn(s, t, v)
    assert loss.ndim == 0 and math.isfinite(float(loss)) and float(loss) > 0
    loss.backward()
    level = loss_fn.per_level["8"]
    assert s[8].grad.abs().sum() > 0
    assert level.dfm.fuse_logits.grad.abs().sum() > 0
    assert level.scale_logits.grad.abs().sum() > 0
    aligned = loss_fn.aligned(s, t)
    assert aligned[8].shape == t[8].shape and not aligned[8].requires_grad


@pytest.mark.parametrize("grid", [1, 2, 4])
def test_sfd_masks_do_not_depend_on_canvas_padding(grid):
    level = SFDLevel(3, 3, rule="top", lambda_c=0.34)
    t = torch.randn(1, 3, 5, 6)
    valid = torch.ones(1, 5, 6, dtype=torch.bool)
    m_s, m_c = level.masks(t, valid, grid)
    # the same image letterboxed on a bigger canvas (zero rows/cols, valid False there)
    tp, vp = F.pad(t, (0, 3, 0, 2)), F.pad(valid, (0, 3, 0, 2))
    p_s, p_c = level.masks(tp, vp, grid)
    assert torch.equal(p_s[:, :5, :6], m_s) and not p_s[~vp].any()
    assert torch.equal(p_c[:, :, :5, :6], m_c) and not p_c[:, :, 5:].any()


def test_sld_weight_map_by_hand():
    t = torch.zeros(1, 2, 2, 2)
    s = torch.zeros(1, 2, 2, 2)
    s[0, :, 0, 0] = 2.0  # d = mean_c (S − T)² = 4 at (0, 0)
    s[0, 0, 1, 1] = 2.0  # d = 2 at (1, 1), a padding cell
    valid = torch.ones(1, 2, 2, dtype=torch.bool)
    valid[0, 1, 1] = False
    # per cell: d = [4, 0, 0] over the 3 valid cells, mean 4/3 → W = [3, 0, 0], padding 0
    w = feature_difference_weights(s, t, valid, grid=None)
    assert torch.allclose(w, torch.tensor([[[3.0, 0.0], [0.0, 0.0]]]))
    # grid 1: one window, every valid cell gets D = 4/3 → W = 1
    w1 = feature_difference_weights(s, t, valid, grid=1)
    assert torch.allclose(w1, torch.tensor([[[1.0, 1.0], [1.0, 0.0]]]))
    # grid 2 (1×1 windows) is the per-cell map; equal features give uniform weight 1
    assert torch.allclose(feature_difference_weights(s, t, valid, grid=2), w)
    assert torch.allclose(feature_difference_weights(t, t, valid), valid.float())


def test_logit_kd_sigmoid_and_softmax_by_hand():
    tau = 2.0
    ln3 = math.log(3.0)
    # sigmoid: p_T = σ(2·ln3 / 2) = 3/4, p_S = σ(0) = 1/2
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    zt = torch.tensor([[[[2 * ln3]]]])
    zs = torch.zeros(1, 1, 1, 1)
    got = logit_kd_map(zs, zt, anchors=1, kind="sigmoid", tau=tau)
    assert math.isclose(float(got), tau**2 * kl, rel_tol=1e-5)
    bce = F.binary_cross_entropy_with_logits(zs / tau, torch.tensor(0.75).view(1, 1, 1, 1))
    ent = F.binary_cross_entropy_with_logits(zt / tau, torch.tensor(0.75).view(1, 1, 1, 1))
    assert math.isclose(float(got), tau**2 * float(bce - ent), rel_tol=1e-5)
    # softmax over K = 2: p_T = [1/4, 3/4], p_S = [1/2, 1/2] → the same KL value
    zt2 = torch.tensor([0.0, 2 * ln3]).view(1, 2, 1, 1)
    got2 = logit_kd_map(torch.zeros(1, 2, 1, 1), zt2, anchors=1, kind="softmax", tau=tau)
    assert math.isclose(float(got2), tau**2 * kl, rel_tol=1e-5)


def test_logit_kd_anchor_major_layout_and_zero_at_teacher():
    # A = 2 anchors × K = 3 classes; only anchor 1, class 2 differs, at cell (0, 1)
    zt = torch.randn(2, 6, 2, 3)
    zs = zt.clone()
    zs[0, 1 * 3 + 2, 0, 1] += 1.5
    for kind in ("sigmoid", "softmax"):
        same = logit_kd_map(zt.clone(), zt, anchors=2, kind=kind)
        assert torch.allclose(same, torch.zeros(2, 2, 3), atol=1e-6)
        got = logit_kd_map(zs, zt, anchors=2, kind=kind)
        assert (got > 1e-4).sum() == 1 and got[0, 0, 1] > 1e-4
    with pytest.raises(ValueError):
        logit_kd_map(zs, zt, anchors=4)  # 6 channels are not 4 anchors × K
    with pytest.raises(ValueError):
        logit_kd_map(zs[:, :3], zt, anchors=1)


def test_sld_loss_by_hand_gradients_and_zero():
    ln3 = math.log(3.0)
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    valid = {8: torch.ones(1, 1, 2, dtype=torch.bool), 16: torch.ones(1, 1, 1, dtype=torch.bool)}
    ft = {8: torch.zeros(1, 2, 1, 2), 16: torch.zeros(1, 2, 1, 1)}
    fs = {8: torch.zeros(1, 2, 1, 2), 16: torch.zeros(1, 2, 1, 1)}
    fs[8][0, :, 0, 0] = 1.0  # per-cell W at stride 8: [2, 0]; stride 16: 1 (equal features)
    fs[8].requires_grad_()  # the weight map is detached: no gradient may reach the feature
    zt = {8: torch.full((1, 1, 1, 2), ln3), 16: torch.full((1, 1, 1, 1), ln3)}
    zs = {8: torch.zeros(1, 1, 1, 2, requires_grad=True), 16: torch.zeros(1, 1, 1, 1)}
    loss_fn = SLDLoss([8, 16], anchors=1, kind="sigmoid", tau=1.0, grid=None)
    loss = loss_fn(zs, zt, fs, ft, valid)
    # (2·kl + 0·kl + 1·kl) / 3 valid positions
    assert math.isclose(float(loss), kl, rel_tol=1e-5)
    loss.backward()
    assert zs[8].grad[0, 0, 0, 0] < 0 and zs[8].grad[0, 0, 0, 1] == 0  # W = 0 there
    assert fs[8].grad is None
    assert float(loss_fn(zt, zt, fs, ft, valid)) == 0.0
    with pytest.raises(ValueError):
        loss_fn(zs, zt, {8: torch.zeros(1, 3, 1, 2), 16: fs[16]}, ft, valid)  # not aligned


def test_sfd_pooled_scale_by_hand():
    # pool: grids (1, 2) → the 1×1-window scale works on maps max-pooled by 2 (Σ/B over 1 cell)
    t = torch.rand(1, 2, 2, 2) + 0.1
    valid = torch.ones(1, 2, 2, dtype=torch.bool)
    level = SFDLevel(2, 2, grids=(1, 2), lambda_s=0.0, lambda_c=0.0, pool=True)
    _identity_generation(level)
    s = torch.zeros(1, 2, 2, 2)
    losses = level.scale_losses(s, t, valid)
    pooled = t.amax(dim=(2, 3))  # one cell; the student pools to 0 and reconstructs 0
    assert math.isclose(float(losses[0]), float((pooled**2).sum()), rel_tol=1e-5)
    assert math.isclose(float(losses[1]), float((t**2).sum()), rel_tol=1e-5)

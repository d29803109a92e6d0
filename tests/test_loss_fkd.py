"""FKD (attention-guided + non-local distillation) on small hand-computed tensors
(docs/method.md, "FKD")."""

from __future__ import annotations

import math

import pytest
import torch

from dfmsd_cli.distill.losses import FKD_DEFAULTS, FKDLevel, FKDLoss, RelationBlock, fkd_masks

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")

L3 = math.log(3.0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _example():
    """B=1, C=2, H=1, W=3 with the last cell padding (huge values that must not count).

    τ = 0.5, a = τ·ln3: T = [0, a] on both channels, so mean_c|T| = [0, a] and softmax gives
    A_s(T) = 2·[1/4, 3/4]; S = [0, 0] on channel 0 and [ln3, ln3] on channel 1, so
    A_s(S) = [1, 1] and mean_V|S| = [0, ln3] gives A_c(S) = 2·softmax([0, 2·ln3]) = [0.2, 1.8];
    A_c(T) = [1, 1]. Hence M_s = [0.75, 1.25], M_c = [0.6, 1.4].
    """
    a = 0.5 * L3
    t = torch.tensor([[[[0.0, a, 99.0]], [[0.0, a, 99.0]]]])
    s = torch.tensor([[[[0.0, 0.0, 50.0]], [[L3, L3, 50.0]]]])
    valid = torch.tensor([[[True, True, False]]])
    return s, t, valid


def _identity_adapters(level: FKDLevel) -> FKDLevel:
    with torch.no_grad():
        c = level.adapt.weight.shape[0]
        level.adapt.weight.copy_(torch.eye(c)[:, :, None, None])
        level.adapt.bias.zero_()
        level.relation_adapt.weight.copy_(torch.eye(c)[:, :, None, None])
        level.relation_adapt.bias.zero_()
        level.channel_adapt.weight.copy_(torch.eye(c))
        level.channel_adapt.bias.zero_()
        level.spatial_adapt.weight.zero_()
        level.spatial_adapt.weight[0, 0, 1, 1] = 1.0
        level.spatial_adapt.bias.zero_()
    return level


def test_masks_by_hand_padding_excluded():
    s, t, valid = _example()
    m_s, m_c = fkd_masks(t * valid[:, None], s * valid[:, None], valid, tau=0.5)
    assert torch.allclose(m_s, torch.tensor([[[0.75, 1.25, 0.0]]]))
    assert torch.allclose(m_c, torch.tensor([[0.6, 1.4]]))
    assert not m_s.requires_grad and not m_c.requires_grad


def test_masks_average_one_over_valid_cells_and_channels():
    t, s = torch.randn(2, 5, 4, 6), torch.randn(2, 5, 4, 6)
    valid = torch.zeros(2, 4, 6, dtype=torch.bool)
    valid[0] = True
    valid[1, :3, :2] = True
    m_s, m_c = fkd_masks(t, s, valid, tau=0.1, ratio=0.5)
    assert m_s.shape == (2, 4, 6) and m_c.shape == (2, 5)
    assert (m_s[~valid] == 0).all()
    assert torch.allclose(m_s.flatten(1).sum(1), valid.flatten(1).sum(1).float())  # mean 1 on V
    assert torch.allclose(m_c.sum(1), torch.full((2,), 5.0))


def test_four_terms_by_hand():
    s, t, valid = _example()
    level = _identity_adapters(FKDLevel(2, 2, temperature=0.5, channel_mask=True))
    terms = level.terms(s, t, valid)
    # feat: Σ M_s·M_c·(T − S)², diff ch0 [0, a], ch1 [−ln3, −ln3/2]:
    # 0.6·1.25·a² + 1.4·(0.75 + 1.25/4)·ln3² = (0.1875 + 1.4875)·ln3²
    assert float(terms["feat"]) == pytest.approx(math.sqrt(1.675) * L3, rel=1e-5)
    # channel: mean_V T − mean_V S = [a/2, a/2 − ln3] = ln3·[0.25, −0.75]
    assert float(terms["channel"]) == pytest.approx(math.sqrt(0.625) * L3, rel=1e-5)
    # spatial: mean_c T − mean_c S = [0 − ln3/2, a − ln3/2] = [−ln3/2, 0]
    assert float(terms["spatial"]) == pytest.approx(0.5 * L3, rel=1e-5)
    # non-local: R(x) = x at init (BN weight 0), so the term is ‖T − S‖ over V:
    # ch0 a² = ln3²/4, ch1 ln3² + (ln3/2)² → (0.25 + 1.25)·ln3²
    assert float(terms["nonlocal"]) == pytest.approx(math.sqrt(1.5) * L3, rel=1e-5)


def test_feature_term_without_channel_mask_and_weighted_sum():
    s, t, valid = _example()
    level = _identity_adapters(
        FKDLevel(
            2,
            2,
            temperature=0.5,
            channel_mask=False,
            feat_weight=1.0,
            channel_weight=10.0,
            spatial_weight=100.0,
            nonlocal_weight=1000.0,
        )
    )
    # Σ M_s·(T − S)² = 1.25·a² + 0.75·ln3² + 1.25·ln3²/4 = 1.375·ln3²
    assert float(level.terms(s, t, valid)["feat"]) == pytest.approx(math.sqrt(1.375) * L3)
    expected = (math.sqrt(1.375) + 10 * math.sqrt(0.625) + 100 * 0.5 + 1000 * math.sqrt(1.5)) * L3
    assert float(level(s, t, valid)) == pytest.approx(expected, rel=1e-5)


def test_relation_block_by_hand():
    block = RelationBlock(1, 1, pool=2)
    with torch.no_grad():
        for conv in (block.theta, block.phi, block.g, block.w):
            conv.weight.fill_(1.0)
            conv.bias.zero_()
        block.bn.weight.fill_(1.0)
    block.eval()  # BN with running mean 0, var 1: identity up to √(1 + eps)
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    # φ, g max-pooled 2×2 → 4, N = 1: y_q = (θ_q·4 / 1)·4 = 16·x_q, R = x + 16x
    expected = 17.0 * x
    assert torch.allclose(block(x), expected, rtol=1e-4)
    # a 1×2 map with pool 2 is pooled by its own height (1): θ=φ=g=[1, 2], N = 2,
    # f = [[1, 2], [2, 4]] / 2, y = f·g = [2.5, 5], R = [3.5, 7]
    y = block(torch.tensor([[[[1.0, 2.0]]]]))
    assert torch.allclose(y, torch.tensor([[[[3.5, 7.0]]]]), rtol=1e-4)


def test_zero_at_teacher_with_finite_gradients():
    t = torch.randn(2, 4, 3, 5)
    s = t.clone().requires_grad_(True)
    valid = torch.ones(2, 3, 5, dtype=torch.bool)
    level = _identity_adapters(FKDLevel(4, 4))
    loss = level(s, t, valid)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
    loss.backward()  # ‖0‖ has a zero subgradient here, not NaN
    assert torch.isfinite(s.grad).all()


def test_gradients_reach_student_and_every_adapter_heterogeneous_shapes():
    level = FKDLevel(3, 4, index=0)
    s = torch.randn(2, 3, 4, 4, requires_grad=True)  # resized to the teacher's 8×8
    t = torch.randn(2, 4, 8, 8)
    valid = torch.ones(2, 8, 8, dtype=torch.bool)
    valid[1, 5:] = False
    loss = level(s, t, valid)
    assert torch.isfinite(loss) and float(loss) > 0
    loss.backward()
    assert s.grad.abs().sum() > 0
    for mod in (level.adapt, level.channel_adapt, level.spatial_adapt, level.relation_adapt):
        assert mod.weight.grad.abs().sum() > 0
    assert level.relation_s.bn.weight.grad.abs().sum() > 0  # relation blocks learn
    assert level.relation_t.bn.weight.grad.abs().sum() > 0


def test_padding_does_not_change_the_loss():
    level = FKDLevel(2, 2, temperature=0.5)
    s, t = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    valid = torch.ones(1, 3, 3, dtype=torch.bool)
    valid[0, :, 2] = False
    base = level.terms(s, t, valid)
    s2, t2 = s.clone(), t.clone()
    s2[..., 2] = 1e3  # anything in the padding column
    t2[..., 2] = -1e3
    other = level.terms(s2, t2, valid)
    for name in ("feat", "channel", "spatial", "nonlocal"):
        assert float(other[name]) == pytest.approx(float(base[name]), rel=1e-5)


def test_loss_relation_sizes_follow_stride_order_and_levels_sum():
    loss = FKDLoss([16, 8, 64, 32], 16, 16)  # unsorted on purpose
    sizes = {
        s: (lv.relation_s.theta.out_channels, lv.relation_s.pool)
        for s, lv in ((int(k), v) for k, v in loss.per_level.items())
    }
    assert sizes == {8: (4, 8), 16: (4, 4), 32: (8, 2), 64: (8, 2)}
    feats_s = {s: torch.randn(1, 16, 64 // s, 64 // s) for s in (8, 16, 32, 64, 128)}
    feats_t = {s: torch.randn(1, 16, 64 // s, 64 // s) for s in (8, 16, 32, 64)}
    valid = {s: torch.ones(1, 64 // s, 64 // s, dtype=torch.bool) for s in (8, 16, 32, 64)}
    total = loss(feats_s, feats_t, valid)  # stride 128 has no teacher level: skipped
    parts = sum(loss.per_level[str(s)](feats_s[s], feats_t[s], valid[s]) for s in (8, 16, 32, 64))
    assert float(total) == pytest.approx(float(parts), rel=1e-5)


def test_family_defaults_build():
    assert FKD_DEFAULTS["one_stage"]["temperature"] == 0.1
    assert FKD_DEFAULTS["two_stage"]["temperature"] == 0.5
    for family in ("one_stage", "two_stage"):
        level = FKDLevel(4, 4, **FKD_DEFAULTS[family])
        assert level.channel_mask is FKD_DEFAULTS[family]["channel_mask"]


def test_one_value_per_channel_level_trains():
    # batch 1 on a 1×1 level (P7 of a small image): BatchNorm has no batch variance there
    level = FKDLevel(4, 4, index=4)
    s = torch.randn(1, 4, 1, 1, requires_grad=True)
    loss = level(s, torch.randn(1, 4, 1, 1), torch.ones(1, 1, 1, dtype=torch.bool))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()

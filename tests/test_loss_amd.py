"""AMD (adaptive masked distillation) on small hand-computed tensors (docs/method.md, "AMD")."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dfmsd_cli.distill.losses import AMD_DEFAULTS, AMDLevel, AMDLoss, attention_spatial_mask

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _transparent(level: AMDLevel) -> AMDLevel:
    """SE with zero weights (gate σ(0) = ½ on every channel) and identity 3×3 generation convs,
    so ``G = ReLU(½·S') = ½·S'`` for a non-negative S' — a reconstruction computable by hand."""
    with torch.no_grad():
        for fc in (level.se.fc1, level.se.fc2):
            fc.weight.zero_()
            fc.bias.zero_()
        for conv in (level.generation[0], level.generation[2]):
            conv.weight.zero_()
            conv.bias.zero_()
            for c in range(conv.weight.shape[0]):
                conv.weight[c, c, 1, 1] = 1.0
    return level


def test_spatial_mask_top_rule_by_hand_and_padding_never_masked():
    stat = torch.tensor([[[0.0, 3.0, 1.0, 2.0, 9.0]]])  # (1, 1, 5); the last cell is padding
    valid = torch.tensor([[[True, True, True, True, False]]])
    # k = round(0.5 · 4) = 2: the two highest-attention valid cells (stats 3 and 2)
    m = attention_spatial_mask(stat, valid, 0.5, tau=0.5, rule="top")
    assert m.tolist() == [[[False, True, False, True, False]]]


@pytest.mark.parametrize("rule", ["sample", "top", "random"])
def test_mask_shape_and_exact_count_per_image(rule):
    b, h, w = 3, 5, 6
    valid = torch.zeros(b, h, w, dtype=torch.bool)
    valid[0] = True
    valid[1, :4, :3] = True  # 12 valid cells
    valid[2, :1, :1] = True  # one valid cell
    stat = torch.rand(b, h, w)
    m = attention_spatial_mask(stat, valid, 0.65, rule=rule)
    assert m.shape == (b, h, w) and m.dtype == torch.bool
    assert not (m & ~valid).any()
    assert m.flatten(1).sum(1).tolist() == [round(0.65 * 30), round(0.65 * 12), round(0.65 * 1)]


def test_sample_rule_prefers_high_attention_cells():
    # one cell carries almost all attention: it is masked in (nearly) every draw, a flat cell
    # in about λ of them
    stat = torch.zeros(1, 1, 10)
    stat[0, 0, 3] = 5.0
    valid = torch.ones(1, 1, 10, dtype=torch.bool)
    hits = torch.zeros(10)
    for _ in range(200):
        hits += attention_spatial_mask(stat, valid, 0.3, tau=0.5, rule="sample")[0, 0].float()
    assert hits[3] == 200
    assert hits[0] < 100  # expected 200 · 2/9 ≈ 44


def test_level_loss_by_hand_single_branch_no_channel_mask():
    level = _transparent(AMDLevel(2, 2, lam=0.5, rule="top"))
    s = torch.tensor([[[[2.0, 4.0, 6.0, 8.0, 100.0]], [[4.0, 2.0, 2.0, 2.0, 0.0]]]])  # (1,2,1,5)
    t = torch.ones(1, 2, 1, 5)
    t[..., 4] = 50.0  # padding: never a target
    valid = torch.tensor([[[True, True, True, True, False]]])
    stat = torch.tensor([[[0.0, 3.0, 1.0, 2.0, 9.0]]])  # masks cells 1 and 3 (top rule)
    loss = level(s, t, valid, spatial_stat=stat)
    # G = ½·S ⊙ keep on both channels (no channel is masked):
    # ch0 [1, 0, 3, 0] vs 1 → 0 + 1 + 4 + 1 = 6; ch1 [2, 0, 1, 0] vs 1 → 1 + 1 + 0 + 1 = 3
    assert float(loss) == pytest.approx(9.0)


def test_level_loss_is_divided_by_batch_only():
    level = _transparent(AMDLevel(1, 1, lam=0.0, rule="top"))  # nothing masked
    s = torch.full((2, 1, 2, 2), 2.0)  # G = 1 everywhere
    t = torch.full((2, 1, 2, 2), 3.0)
    valid = torch.ones(2, 2, 2, dtype=torch.bool)
    valid[1, 1] = False  # image 1 has 2 valid cells
    # Σ_V (1 − 3)² = 4 · (4 + 2) = 24, divided by B = 2
    assert float(level(s, t, valid)) == pytest.approx(12.0)


def test_mask_from_teacher_when_no_stat_is_given():
    level = _transparent(AMDLevel(1, 1, lam=0.25, rule="top"))
    t = torch.tensor([[[[1.0, -7.0, 2.0, 3.0]]]])  # |T| largest at cell 1 → it is masked
    s = torch.full((1, 1, 1, 4), 2.0)
    valid = torch.ones(1, 1, 4, dtype=torch.bool)
    # G = [1, 0, 1, 1]: (1−1)² + (0+7)² + (1−2)² + (1−3)² = 0 + 49 + 1 + 4
    assert float(level(s, t, valid)) == pytest.approx(54.0)


def test_gradients_reach_student_align_se_and_generation():
    level = AMDLevel(3, 4, lam=0.5)
    s = torch.randn(2, 3, 4, 5, requires_grad=True)
    t = torch.randn(2, 4, 4, 5)
    valid = torch.ones(2, 4, 5, dtype=torch.bool)
    level(s, t, valid).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert isinstance(level.align, nn.Conv2d) and level.align.weight.grad.abs().sum() > 0
    assert level.se.fc1.weight.grad is not None
    assert level.generation[0].weight.grad.abs().sum() > 0


def test_loss_matches_levels_uses_stored_stat_and_resizes():
    loss = AMDLoss([8, 16], 2, 2, lam=0.5, rule="top")
    for lv in loss.per_level.values():
        _transparent(lv)
    s8 = torch.tensor([[[[2.0, 4.0, 6.0, 8.0, 100.0]], [[4.0, 2.0, 2.0, 2.0, 0.0]]]])
    t8 = torch.ones(1, 2, 1, 5)
    v8 = torch.tensor([[[True, True, True, True, False]]])
    stats = {"spatial": {8: torch.tensor([[[0.0, 3.0, 1.0, 2.0, 9.0]]])}, "channel": {}}
    # stride 16: student 1×1 resized to the teacher's 1×2 (constant 2 → G = 1), k = 1 masked
    s16 = torch.full((1, 2, 1, 1), 2.0)
    t16 = torch.tensor([[[[1.0, 3.0]], [[1.0, 3.0]]]])
    v16 = torch.ones(1, 1, 2, dtype=torch.bool)
    student = {8: s8, 16: s16, 32: torch.zeros(1, 2, 1, 1)}  # 32: no teacher level, skipped
    total = loss(student, {8: t8, 16: t16}, {8: v8, 16: v16}, stats)
    # level 8 as by hand above: 9; level 16: |T| largest at cell 1 → masked (G = 0 there):
    # per channel (1 − 1)² + (0 − 3)² = 9, two channels → 18
    assert float(total) == pytest.approx(27.0)


def test_invalid_arguments_and_family_defaults():
    with pytest.raises(ValueError, match="mask rule"):
        AMDLevel(4, 4, rule="best")
    with pytest.raises(ValueError, match="outside"):
        AMDLevel(4, 4, lam=1.5)
    assert AMD_DEFAULTS["one_stage"] == {"alpha": 2e-5, "lam": 0.65}
    assert AMD_DEFAULTS["two_stage"] == {"alpha": 5e-7, "lam": 0.45}

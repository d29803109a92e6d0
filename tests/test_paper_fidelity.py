"""Issue 12: the DFMSD paper's Eq. 8 (L_ME mean), Eq. 5 (SFA level average, P1-P3), FGD's
per-head defaults and the distillation-weight warm-up, on small hand-checked tensors."""

from __future__ import annotations

import math

import pytest
import torch

from dfmsd_cli.distill.losses import (
    DualMaskingLoss,
    SFALoss,
    finest_levels,
    generation_loss,
    pkd_level_loss,
)
from dfmsd_cli.distill.methods import build_stage_losses, method_config, parse_sfa_levels
from dfmsd_cli.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


def test_generation_loss_mean_is_eq8_mean_over_valid_elements():
    # B=2, C=2, 2x2 cells, one padding cell in image 1
    t = torch.zeros(2, 2, 2, 2)
    g = t.clone()
    g[0, 0, 0, 0] = 1.0  # 1
    g[0, 1, 1, 1] = 2.0  # 4
    g[1, 0, 1, 0] = 3.0  # 9
    g[1, 1, 0, 1] = 7.0  # on the padding cell: ignored
    valid = torch.ones(2, 2, 2, dtype=torch.bool)
    valid[1, 0, 1] = False
    # 7 valid cells x 2 channels = 14 elements; (1 + 4 + 9) / 14 = 1.0
    assert math.isclose(float(generation_loss(g, t, valid, "mean")), 1.0, rel_tol=1e-6)
    # Eq. 7's reduction on the same tensors: Σ / B = 14 / 2
    assert math.isclose(float(generation_loss(g, t, valid, "batch")), 7.0, rel_tol=1e-6)
    with pytest.raises(ValueError):
        generation_loss(g, t, valid, "sum")


def test_me_loss_is_a_mean_per_level_summed_over_levels_and_stage_loss_is_not():
    torch.manual_seed(0)
    cfg = method_config("dfmsd", "retina_r50")
    mods = build_stage_losses(cfg, [8, 16], 4, 4, with_me=True)
    assert mods["me"].per_level["8"].reduction == "mean"
    assert mods["stage"].per_level["8"].reduction == "batch"
    # a level whose generation blocks output 0: its loss is mean(T²) over its valid elements
    me = DualMaskingLoss([8, 16], 4, 4, reduction="mean", lambda_s=0.0, lambda_c=0.0)
    for lvl in me.per_level.values():
        for gen in (lvl.gen_s, lvl.gen_c):
            torch.nn.init.zeros_(gen[2].weight)
            torch.nn.init.zeros_(gen[2].bias)
    t = {8: torch.full((1, 4, 2, 2), 2.0), 16: torch.full((1, 4, 1, 1), 3.0)}
    s = {k: torch.randn_like(v) for k, v in t.items()}
    v = {k: torch.ones(1, *x.shape[-2:], dtype=torch.bool) for k, x in t.items()}
    # Σ_l mean_l (0 − T)² = 4 + 9, whatever the number of cells per level
    assert math.isclose(float(me(s, t, v)), 13.0, rel_tol=1e-6)


def test_sfa_averages_the_three_finest_shared_levels():
    torch.manual_seed(0)
    strides = [8, 16, 32, 64, 128]
    assert finest_levels([32, 8, 128, 16, 64], 3) == [8, 16, 32]
    assert finest_levels(strides, None) == strides
    s = {k: torch.randn(2, 3, 8 // (k // 8) + 1, 4) for k in strides}
    t = {k: torch.randn_like(v) for k, v in s.items()}
    v = {k: torch.ones(2, *x.shape[-2:], dtype=torch.bool) for k, x in t.items()}
    per = {k: float(pkd_level_loss(s[k], t[k], v[k])) for k in strides}
    # Eq. 5: (1/3) Σ over P3..P5 (strides 8, 16, 32)
    mods = build_stage_losses(method_config("dfmsd", "retina_r50"), strides, 3, 3, False)
    assert mods["sfa"].levels == [8, 16, 32]
    expected = (per[8] + per[16] + per[32]) / 3
    assert math.isclose(float(mods["sfa"](s, t, v)), expected, rel_tol=1e-6)
    # 'all': every shared level, still averaged
    cfg_all = method_config("dfmsd", "retina_r50", sfa_levels="all")
    mods = build_stage_losses(cfg_all, strides, 3, 3, False)
    assert math.isclose(float(mods["sfa"](s, t, v)), sum(per.values()) / 5, rel_tol=1e-6)
    # PKD as a baseline keeps its official per-level sum over every level
    pkd = build_stage_losses(method_config("pkd", "retina_r50"), strides, 3, 3, False)["stage"]
    assert math.isclose(float(pkd(s, t, v)), sum(per.values()), rel_tol=1e-6)
    assert math.isclose(float(SFALoss([8], 3, 3, average=True)(s, t, v)), per[8], rel_tol=1e-6)


def test_parse_sfa_levels():
    assert parse_sfa_levels("all") is None
    assert parse_sfa_levels("2") == 2
    for bad in ("0", "-1", "p3", "8,16"):
        with pytest.raises(UserError, match="--sfa-levels"):
            parse_sfa_levels(bad)


def test_fgd_defaults_per_head():
    fcos = method_config("fgd", "fcos_r50").loss_kwargs
    assert fcos == {
        "alpha_fg": 1.6e-3,
        "beta_bg": 8e-4,
        "gamma_mask": 8e-4,
        "lambda_rela": 8e-6,
        "temperature": 0.8,
    }
    assert method_config("fgd", "mmfcos_r50").loss_kwargs == fcos
    retina = method_config("fgd", "retina_r50").loss_kwargs
    assert retina == {
        "alpha_fg": 1e-3,
        "beta_bg": 5e-4,
        "gamma_mask": 5e-4,
        "lambda_rela": 5e-6,
        "temperature": 0.5,
    }
    assert method_config("fgd", "gfl_r50").loss_kwargs == retina
    assert method_config("fgd", "frcnn_r50").loss_kwargs["alpha_fg"] == 5e-5


def test_kd_warmup_factor_and_model_scaling():
    from dfmsd_cli.distill.model import DistillModel
    from dfmsd_cli.distill.task import kd_warmup_factor

    assert [kd_warmup_factor(i, 4) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert kd_warmup_factor(0, 0) == 1.0
    assert method_config("fgd", "retina_r50", kd_warmup=100).kd_warmup == 100
    with pytest.raises(UserError, match="--kd-warmup"):
        method_config("fgd", "retina_r50", kd_warmup=-1)

    class _Student(torch.nn.Module):
        def forward(self, images, sizes, targets):
            out = type("O", (), {})()
            out.losses = {"loss_cls": images.sum() * 0 + 1.0}
            out.features = {8: images}
            return out

    torch.manual_seed(0)
    cfg = method_config("dfmsd", "retina_r50", me=False)
    mods = build_stage_losses(cfg, [8], 3, 3, with_me=False)
    model = DistillModel(_Student(), mods, cfg)
    x = torch.randn(1, 3, 4, 4)
    from dfmsd_cli.store.batch import TeacherBatch, TeacherView

    view = TeacherView(
        {8: torch.randn(1, 3, 4, 4)}, {8: torch.ones(1, 4, 4, dtype=torch.bool)}, {}, {}
    )
    teacher = TeacherBatch({"main": view})
    torch.manual_seed(1)
    full = model(x, [(4, 4)], [{}], teacher)
    model.kd_scale = 0.25
    torch.manual_seed(1)
    quarter = model(x, [(4, 4)], [{}], teacher)
    assert float(quarter["loss_cls"]) == float(full["loss_cls"])  # L_det is never scaled
    for k in ("loss_kd", "loss_sfa"):
        assert math.isclose(float(quarter[k]), 0.25 * float(full[k]), rel_tol=1e-6)

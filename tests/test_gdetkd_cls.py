"""G-DetKD's class-aware region KD (L_cls) on stored teacher logits: the cells of a region, the
per-region mean by hand, the Bernoulli KL by hand, and when the term runs (matching heads)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from dfmsd_cli.distill.losses.gdetkd_cls import (
    ClassKDLoss,
    centre_cell,
    region_cells,
    region_logit_kd,
)
from dfmsd_cli.distill.methods import method_config
from dfmsd_cli.distill.methods.gdetkd import with_stores
from dfmsd_cli.distill.methods.registry import build_stage_losses
from dfmsd_cli.models import build_model

BOX_A = [0.0, 4.0, 4.0, 20.0, 12.0]  # image 0; stride-8 cell centres are 4, 12, 20, 28
BOX_B = [0.0, 9.0, 9.0, 11.0, 11.0]  # between cell centres at every stride


def test_region_cells_are_the_cells_whose_centre_is_inside():
    m = region_cells(torch.tensor([BOX_A]), 8, (4, 4))[0]
    want = torch.zeros(4, 4, dtype=torch.bool)
    want[0:2, 0:3] = True  # y centres 4, 12 and x centres 4, 12, 20
    assert torch.equal(m, want)
    assert not region_cells(torch.tensor([BOX_B]), 8, (4, 4)).any()
    c = centre_cell(torch.tensor([BOX_B]), 8, (4, 4))[0]
    assert c.sum() == 1 and c[1, 1]  # centre (10, 10) lies in cell (1, 1)


def test_region_kd_is_the_mean_over_regions_of_each_regions_mean_by_hand():
    kd = {8: torch.arange(16.0).reshape(1, 4, 4), 16: torch.full((1, 2, 2), 100.0)}
    rois = torch.tensor([BOX_A, BOX_B])
    # A: stride 8 cells (0..1) x (0..2) = 0+1+2+4+5+6 = 18 over 6, stride 16 cell (0, 0) = 100:
    # 118 / 7. B: no cell centre inside at any stride, its centre cell at stride 8: kd = 5.
    want = (118 / 7 + 5) / 2
    assert float(region_logit_kd(kd, rois)) == pytest.approx(want)
    valid = {8: torch.ones(1, 4, 4, dtype=torch.bool), 16: torch.zeros(1, 2, 2, dtype=torch.bool)}
    assert float(region_logit_kd(kd, rois, valid)) == pytest.approx((18 / 6 + 5) / 2)


def _targets(*boxes):
    return [{"boxes": torch.tensor([list(b[1:]) for b in boxes])}]


def test_class_kd_bernoulli_kl_by_hand_and_only_inside_regions():
    """One class, one anchor: σ(ln 3) = 0.75 against σ(0) = 0.5 gives
    KL = 0.75·ln(0.75/0.5) + 0.25·ln(0.25/0.5) = 0.130812 at every cell."""
    loss = ClassKDLoss([8], anchors=1, kind="sigmoid")
    zt = {8: torch.full((1, 1, 4, 4), math.log(3.0))}
    zs = {8: torch.zeros(1, 1, 4, 4, requires_grad=True)}
    valid = {8: torch.ones(1, 4, 4, dtype=torch.bool)}
    got = loss(zs, zt, valid, [], [], _targets(BOX_A))
    want = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert float(got.detach()) == pytest.approx(want, rel=1e-5)
    got.backward()
    grad = zs[8].grad[0, 0]
    assert (grad[0:2, 0:3] != 0).all() and (grad[2:] == 0).all() and (grad[:, 3] == 0).all()
    # the student equal to the teacher inside the region, different outside: no loss
    inside = zt[8].clone()
    inside[..., 2:, :] = -5.0
    inside[..., :, 3] = -5.0
    assert float(loss({8: inside}, zt, valid, [], [], _targets(BOX_A))) == pytest.approx(0.0)


def test_class_kd_softmax_heads_and_anchors():
    """Two anchors of two classes (softmax): KL summed over anchors; 0 when equal."""
    loss = ClassKDLoss([8], anchors=2, kind="softmax")
    zt = torch.zeros(1, 4, 4, 4)
    zt[:, 0] = math.log(3.0)  # anchor 0: softmax (0.75, 0.25); anchor 1: (0.5, 0.5)
    zs = torch.zeros(1, 4, 4, 4)  # uniform on both anchors
    valid = {8: torch.ones(1, 4, 4, dtype=torch.bool)}
    got = loss({8: zs}, {8: zt}, valid, [], [], _targets(BOX_A))
    want = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # anchor 1 adds 0
    assert float(got) == pytest.approx(want, rel=1e-5)
    assert float(loss({8: zt}, {8: zt}, valid, [], [], _targets(BOX_A))) == pytest.approx(0.0)


def _stores(logits):
    meta = SimpleNamespace(logits=logits)
    return [SimpleNamespace(store=SimpleNamespace(meta=meta, path="T.zarr"))]


GFL_LOGITS = {"dtype": "float16", "anchors": 1, "classes": 5, "kind": "sigmoid"}


def test_class_kd_runs_only_for_matching_heads_with_stored_logits():
    gfl, retina = build_model("gfl_tiny", num_classes=5), build_model("retina_tiny", num_classes=5)
    cfg = with_stores(method_config("gdetkd", "gfl_tiny"), gfl, _stores(GFL_LOGITS), False)
    assert cfg.loss_kwargs["class_kd_active"] and not cfg.notes
    assert cfg.loss_kwargs["parts"].startswith("L_feat+L_ckd+L_cls (class-aware KD")
    mods = build_stage_losses(cfg, [8, 16], 4, 4)
    assert set(mods) == {"stage", "ckd", "cls"} and mods["cls"].anchors == 1
    assert cfg.loss_kwargs["class_kd_weight"] == 1.0
    cfg = method_config("gdetkd", "gfl_tiny", class_kd_weight=0.5, ckd=False)
    cfg = with_stores(cfg, gfl, _stores(GFL_LOGITS), False)
    assert cfg.loss_kwargs["parts"].startswith("L_feat+L_cls (")
    assert set(build_stage_losses(cfg, [8], 4, 4)) == {"stage", "cls"}

    def note(student, name, stores, online=False, teachers=(), **kw):
        cfg = method_config("gdetkd", name, **kw)
        cfg = with_stores(cfg, student, stores, online, teachers=teachers)
        assert not cfg.loss_kwargs.get("class_kd_active") and "cls" not in build_stage_losses(
            cfg, [8], 4, 4
        )
        assert cfg.loss_kwargs["parts"].endswith("(heterogeneous form: no class-aware "
                                                 "localisation KD, no head transfer)")  # fmt: skip
        return cfg.notes[0]

    assert "heads differ" in note(retina, "retina_tiny", _stores(GFL_LOGITS))
    assert "holds no teacher logits" in note(gfl, "gfl_tiny", _stores(None))
    assert "no teacher" in note(gfl, "gfl_tiny", [None], online=True)
    two_stage = note(gfl, "gfl_tiny", [None], online=True, teachers=["frcnn_tiny"])
    assert "frcnn_tiny has no dense classification head" in two_stage
    # --online with a live teacher of the same head: L_cls on, from the architecture alone
    cfg = with_stores(method_config("gdetkd", "gfl_tiny"), gfl, [None], True, teachers=["gfl_tiny"])
    assert cfg.loss_kwargs["class_kd_active"] and cfg.loss_kwargs["class_kd_anchors"] == 1
    assert "--no-class-kd" in note(gfl, "gfl_tiny", _stores(GFL_LOGITS), class_kd=False)
    frcnn = build_model("frcnn_tiny", num_classes=5)
    assert "no dense classification head" in note(frcnn, "frcnn_tiny", _stores(GFL_LOGITS))

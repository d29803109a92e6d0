"""The method registry: a new method is one ``register_method`` call (here a plain L2 on FPN
features, registered by the test itself) and trains through the unchanged engine; the student
family comes from the head registry; option checks and lists come from the registry."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import _cli
from torch import nn

from dfmsd_cli.distill.methods import (
    LossTerm,
    MethodOption,
    MethodSpec,
    StoreNeeds,
    call_features,
    list_methods,
    method_config,
    register_method,
    student_family,
    unregister_method,
)
from dfmsd_cli.errors import UserError


class L2Loss(nn.Module):
    """``Σ_s Σ_{valid} (A_s(S_s) − T_s)² / B``: a 1×1 conv aligns the student's channels."""

    def __init__(self, levels: list[int], student_channels: int, teacher_channels: int):
        super().__init__()
        self.levels = list(levels)
        self.align = nn.ModuleDict(
            {str(s): nn.Conv2d(student_channels, teacher_channels, 1) for s in levels}
        )

    def forward(self, student, teacher, valid):
        total = student[self.levels[0]].new_zeros(())
        for s in self.levels:
            diff = (self.align[str(s)](student[s]) - teacher[s]) * valid[s][:, None]
            total = total + diff.pow(2).sum() / student[s].shape[0]
        return total


def _norm(value):
    return None if value in ("sum", "mean") else f"must be sum or mean, got '{value}'"


TOY = MethodSpec(
    "l2toy",
    "L_det + α·Σ(S−T)², one stage (a test's toy)",
    terms=(LossTerm("loss_kd", "stage", lambda c, *a: L2Loss(*a), "alpha", call=call_features),),
    defaults={"one_stage": {"alpha": 1e-3}, "two_stage": {"alpha": 1e-4}},
    store=StoreNeeds(),
    stage_loss="l2",
    options=(
        MethodOption(
            "toy_norm", str, None, "l2toy: sum or mean.", "the toy's norm", _norm, kwarg=True
        ),
    ),  # fmt: skip
)


@pytest.fixture
def toy():
    register_method(TOY)
    yield TOY
    unregister_method(TOY.name)


def test_l2_loss_by_hand():
    loss = L2Loss([8], 1, 1)
    nn.init.ones_(loss.align["8"].weight), nn.init.zeros_(loss.align["8"].bias)
    s = {8: torch.tensor([[[[1.0, 2.0]]], [[[0.0, 0.0]]]])}  # (B=2, C=1, 1, 2)
    t = {8: torch.tensor([[[[0.0, 0.0]]], [[[3.0, 1.0]]]])}
    v = {8: torch.tensor([[[True, False]], [[True, True]]])}
    assert float(loss(s, t, v).detach()) == pytest.approx((1.0 + 9.0 + 1.0) / 2)


def test_toy_method_trains_without_any_other_edit(toy, tiny_cache, synthetic_root, tmp_path):
    """Registered after the CLI was imported: its option is a flag of ``dfmsd distill`` (help,
    parse, check) and reaches the method config, with no other edit."""
    from typer.testing import CliRunner

    from dfmsd_cli.cli import app

    assert "l2toy" in list_methods()
    cfg = method_config("l2toy", "retina_tiny", alpha=2e-3)
    assert (cfg.family, cfg.alpha, cfg.needs_store) == ("one_stage", 2e-3, True)
    help_text = CliRunner().invoke(app, ["distill", "--help"], env={"COLUMNS": "200"}).output
    assert "--toy-norm" in help_text and "l2toy: sum or mean." in help_text
    from dfmsd_cli.distill.methods import method_help

    assert ", l2toy" in method_help()  # --method's help lists it
    assert "l2toy" in " ".join(help_text.split()).replace("│", "")  # (wrapped in the panel)
    out = tmp_path / "run"
    argv = [
        "distill", "--student", "retina_tiny", "--out", str(out), "--stages", "retina_tiny",
        "--data", str(synthetic_root), "--cache", str(tiny_cache), "--method", "l2toy",
        "--epochs", "1", "-b", "2", "--warmup-iters", "2", "--num-workers", "0",
        "--device", "cpu", "--no-eval", "--max-steps", "2", "--img-scale", "128,96",
    ]  # fmt: skip
    assert _cli([*argv, "--toy-norm", "max"]) == 2  # the method's check, before any work
    assert not out.exists()
    assert _cli([*argv, "--toy-norm", "mean"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    kd = [r["loss_kd"] for r in rows if r.get("phase") == "train"]
    assert kd and all(v > 0 for v in kd)
    config = json.loads((out / "config.json").read_text())
    resolved = config["options"]["resolved"]
    assert resolved["name"] == "l2toy" and resolved["alpha"] == 1e-3
    assert resolved["loss_kwargs"] == {"toy_norm": "mean"}
    assert config["options"]["toy_norm"] == "mean"  # the option itself, at the top level
    state = torch.load(out / "student.pth", weights_only=True)
    assert state["distill"]["method"]["stage_loss"] == "l2"
    assert state["distill"]["method"]["loss_kwargs"] == {"toy_norm": "mean"}


def test_method_options_reach_the_config_from_python(toy):
    from dfmsd_cli.distill.run import DistillOptions, resolve_method

    opts = DistillOptions(student="retina_tiny", out="x", method="l2toy",
                          method_options={"toy_norm": "sum", "sal": True})  # fmt: skip
    assert resolve_method(opts).loss_kwargs == {"toy_norm": "sum"}  # sal: its default, ignored
    with pytest.raises(UserError, match="--toy-norm sets the toy's norm of l2toy, not of 'mgd'"):
        resolve_method(DistillOptions(student="retina_tiny", out="x", method="mgd",
                                      method_options={"toy_norm": "sum"}))  # fmt: skip
    with pytest.raises(UserError, match="unknown method option.* toy_nrom"):
        resolve_method(DistillOptions(student="retina_tiny", out="x", method="l2toy",
                                      method_options={"toy_nrom": "sum"}))  # fmt: skip


def test_toy_method_options_are_checked(toy):
    with pytest.raises(UserError, match="--lambda-s sets the dual masking of dfmsd/dmkd/.*not of"):
        method_config("l2toy", "retina_tiny", lambda_s=0.5)
    with pytest.raises(UserError, match="--sfa is part of --method dfmsd only"):
        method_config("l2toy", "retina_tiny", sfa=True)
    assert method_config("l2toy", "retina_tiny", sfa=False).sfa is False  # already off


def test_register_by_name_and_fields():
    spec = register_method("l2kw", description="keyword form", terms=TOY.terms, store=StoreNeeds())
    try:
        assert spec.terms == TOY.terms and "l2kw" in list_methods()
        assert method_config("l2kw", "retina_tiny", alpha=0.5).alpha == 0.5
    finally:
        unregister_method("l2kw")
    assert "l2kw" not in list_methods()


def test_unknown_method_lists_the_registry(toy, tmp_path):
    names = list_methods()
    assert names[:6] == ["dfmsd", "dmkd", "mgd", "pkd", "fgd", "none"] and "l2toy" in names
    with pytest.raises(UserError, match=f"use one of {', '.join(names)}$"):
        method_config("l2tyo", "retina_tiny")
    argv = ["distill", "--student", "retina_tiny", "--out", str(tmp_path / "x"), "--method", "x"]
    assert _cli(argv) == 2


def test_student_family_from_the_head_registry():
    from dfmsd_cli.models.registry import get_spec, list_heads

    for name, family in (("retina_r50", "one_stage"), ("mmfcos_r50", "one_stage"),
                         ("gfl_r50", "one_stage"), ("frcnn_r50", "two_stage"),
                         ("mmmrcnn_r50", "two_stage"), ("cmr_r50", "two_stage")):  # fmt: skip
        assert student_family(name) == family == get_spec(name).family
    assert "atss" not in list_heads() and "crcnn" not in list_heads()
    # FGD's FCOS weights are keyed on the registered head, for both FCOS layouts
    fcos = method_config("fgd", "fcos_r50").loss_kwargs
    assert fcos == method_config("fgd", "mmfcos_r50").loss_kwargs and fcos["temperature"] == 0.8


def test_head_without_family_has_no_defaults(monkeypatch):
    from dfmsd_cli.models import registry

    registry._load_all()
    monkeypatch.setitem(registry._HEADS, "toyhead", registry.HeadEntry("toyhead", None, (8,)))
    monkeypatch.setattr(registry, "_SPEC_CACHE", {})
    with pytest.raises(UserError, match="head 'toyhead'.*registers no family"):
        student_family("toyhead_tiny")
    with pytest.raises(ValueError, match="family"):
        registry.register_head("bad", None, strides=(8,), family="three_stage")


def test_docs_table_has_every_registered_method():
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "method.md").read_text()
    for name in list_methods():
        assert f"| `{name}` | `methods/{name}.py` |" in text, name


def test_term_weight_from_a_function_of_the_config():
    """A term may take its weight from the method's own loss_kwargs (no MethodConfig field)."""
    from dfmsd_cli.distill.model import DistillModel
    from dfmsd_cli.store.batch import TeacherBatch, TeacherView

    def build(cfg, levels, cs, ct):
        loss = L2Loss(levels, cs, ct)
        nn.init.ones_(loss.align["8"].weight), nn.init.zeros_(loss.align["8"].bias)
        return loss

    term = LossTerm("loss_l2", "l2", build, lambda c: c.loss_kwargs["w"], call=call_features)
    register_method("l2w", description="own weight", terms=(term,), store=StoreNeeds(),
                    defaults={"one_stage": {"loss_kwargs": {"w": 3.0}}})  # fmt: skip
    try:
        from dfmsd_cli.distill.methods import build_stage_losses

        cfg = method_config("l2w", "retina_tiny")
        mods = build_stage_losses(cfg, [8], 1, 1)

        class _Student(nn.Module):
            def forward(self, images, sizes, targets):
                return type("O", (), {"losses": {}, "features": {8: images}})()

        x = torch.tensor([[[[1.0, 2.0]]]])
        valid = {8: torch.ones(1, 1, 2, dtype=torch.bool)}
        view = TeacherView({8: torch.zeros_like(x)}, valid, {}, {})
        out = DistillModel(_Student(), mods, cfg)(x, [(1, 2)], [{}], TeacherBatch({"main": view}))
        assert float(out["loss_l2"].detach()) == pytest.approx(3.0 * (1.0 + 4.0))
    finally:
        unregister_method("l2w")


def test_kd_term_cannot_replace_a_detector_loss():
    """A KD metric named like a detector loss (G-DetKD's first L_cls was ``loss_cls``) once
    silently replaced GFL's classification loss; DistillModel now refuses it."""
    import torch

    from dfmsd_cli.distill.model import _join

    det = {"loss_cls": torch.tensor(1.0), "loss_bbox": torch.tensor(2.0)}
    joined = _join(det, {"loss_cls_kd": torch.tensor(3.0)})
    assert {k: float(v) for k, v in joined.items()} == {
        "loss_cls": 1.0, "loss_bbox": 2.0, "loss_cls_kd": 3.0
    }  # fmt: skip
    with pytest.raises(RuntimeError, match=r"\['loss_cls'\].*detector loss"):
        _join(det, {"loss_cls": torch.tensor(3.0)})

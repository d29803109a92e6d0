"""samkd's SLD term: on with stored teacher logits of a matching head, else SFD alone with the
reason as a note; ``--no-sld``; a 2-step CLI run with ``loss_sld`` in metrics.jsonl."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import _cli

from dfmsd_cli.distill.methods import method_config
from dfmsd_cli.distill.methods.registry import build_stage_losses
from dfmsd_cli.distill.methods.samkd import with_stores
from dfmsd_cli.distill.model import DistillModel
from dfmsd_cli.models import build_model
from dfmsd_cli.store.batch import TeacherBatch, TeacherView

RETINA_LOGITS = {"dtype": "float16", "anchors": 9, "classes": 3, "kind": "sigmoid"}


def _stores(logits):
    store = SimpleNamespace(path="cache/t/train2017.zarr", meta=SimpleNamespace(logits=logits))
    return [SimpleNamespace(store=store)]


def test_sld_turns_on_only_with_stored_logits_of_a_matching_head():
    student = build_model("retina_tiny", num_classes=3)
    cfg = method_config("samkd", "retina_tiny")
    on = with_stores(cfg, student, _stores(RETINA_LOGITS), online=False)
    assert on.loss_kwargs["sld_active"] and on.loss_kwargs["sld_anchors"] == 9
    assert on.notes == ("SAMKD runs SFD + SLD (w=1, τ=1; sigmoid logits, 9 anchor(s) × 3 "
                        "classes, from store cache/t/train2017.zarr)",)  # fmt: skip
    old = with_stores(cfg, student, _stores(None), online=False)
    assert "sld_active" not in old.loss_kwargs and "--store-logits" in old.notes[0]
    fcos = build_model("fcos_tiny", num_classes=3)
    mismatch = with_stores(method_config("samkd", "fcos_tiny"), fcos, _stores(RETINA_LOGITS), False)
    assert "sld_active" not in mismatch.loss_kwargs
    assert "heads differ" in mismatch.notes[0] and "9 anchors" in mismatch.notes[0]
    other_k = with_stores(cfg, student, _stores({**RETINA_LOGITS, "classes": 80}), False)
    assert "heads differ" in other_k.notes[0]
    off = method_config("samkd", "retina_tiny", sld=False)
    assert "--no-sld" in with_stores(off, student, _stores(RETINA_LOGITS), False).notes[0]
    online = with_stores(cfg, student, [None], online=True, teachers=["retina_tiny"])
    assert online.loss_kwargs == on.loss_kwargs and "live teacher retina_tiny" in online.notes[0]
    live_fcos = with_stores(cfg, student, [None], online=True, teachers=["fcos_tiny"])
    assert "sld_active" not in live_fcos.loss_kwargs and "heads differ" in live_fcos.notes[0]
    two_stage = with_stores(cfg, student, [None], online=True, teachers=["frcnn_tiny"])
    assert "sld_active" not in two_stage.loss_kwargs and "two-stage" in two_stage.notes[0]
    assert set(build_stage_losses(old, [8, 16], 16, 16)) == {"stage"}
    assert set(build_stage_losses(on, [8, 16], 16, 16)) == {"stage", "sld"}


def test_distill_model_feeds_student_logits_to_sld_and_it_vanishes_at_student_equals_teacher():
    """The SLD term gets the student's logits of the training forward; with the teacher's
    logits set to those same values, L_SLD = 0 while its gradient path exists."""
    torch.manual_seed(0)
    student = build_model("retina_tiny", num_classes=3).train()
    cfg = with_stores(method_config("samkd", "retina_tiny"), student, _stores(RETINA_LOGITS), False)
    levels = list(student.strides)
    losses = build_stage_losses(cfg, levels, student.out_channels, student.out_channels)
    model = DistillModel(student, losses, cfg)
    x = torch.randn(2, 3, 64, 64)
    sizes = [(64, 64)] * 2
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([1])}] * 2
    with torch.no_grad():
        ref = student(x, sizes, targets, return_logits=True)
    valid = {s: torch.ones(2, *f.shape[-2:], dtype=torch.bool) for s, f in ref.features.items()}
    stat = {s: f.abs().mean(1) for s, f in ref.features.items()}
    view = TeacherView(
        features={s: f + 0.1 for s, f in ref.features.items()},
        valid=valid,
        att_spatial=stat,
        att_channel={s: f.abs().mean((2, 3)) for s, f in ref.features.items()},
        logits={s: z.clone() for s, z in ref.logits.items()},
    )
    out = model(x, sizes, targets, TeacherBatch({"main": view}))
    assert "loss_sld" in out and out["loss_sld"].item() == pytest.approx(0.0, abs=1e-5)
    view.logits = {s: z + 1.0 for s, z in ref.logits.items()}
    out = model(x, sizes, targets, TeacherBatch({"main": view}))
    assert out["loss_sld"].item() > 0
    out["loss_sld"].backward()
    assert student.head.classification_head.cls_logits.weight.grad.abs().sum() > 0


def _distill(cache, data, out, *extra):
    argv = ["distill", "--student", "retina_tiny", "--stages", "retina_tiny", "--method", "samkd",
            "--data", str(data), "--cache", str(cache), "--out", str(out), "--epochs", "1",
            "--batch-size", "2", "--warmup-iters", "2", "--num-workers", "0", "--device", "cpu",
            "--no-eval", "--max-steps", "2", "--img-scale", "128,96", *extra]  # fmt: skip
    assert _cli(argv) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    resolved = json.loads((out / "config.json").read_text())["options"]["resolved"]
    return [r for r in rows if r.get("phase") == "train"], resolved


@pytest.mark.slow
def test_two_step_cli_run_with_sld_on_a_store_with_logits(synthetic_root, tmp_path, capsys):
    cache = tmp_path / "cache"
    argv = ["precompute", "--teacher", "retina_tiny", "--data", str(synthetic_root), "--cache",
            str(cache), "--img-scale", "128,96", "--batch-size", "2", "--num-workers", "0",
            "--device", "cpu", "--block", "4", "--store-logits"]  # fmt: skip
    assert _cli(argv) == 0
    capsys.readouterr()
    rows, resolved = _distill(cache, synthetic_root, tmp_path / "sld")
    assert rows and all(math.isfinite(r["loss_sld"]) and r["loss_sld"] > 0 for r in rows)
    assert resolved["loss_kwargs"]["sld_active"] is True
    assert resolved["notes"][0].startswith("SAMKD runs SFD + SLD")
    assert "SFD alone" not in " ".join(capsys.readouterr().err.split())
    rows, resolved = _distill(cache, synthetic_root, tmp_path / "nosld", "--no-sld")
    assert rows and all("loss_sld" not in r for r in rows)
    assert "--no-sld" in resolved["notes"][0]


@pytest.mark.slow
def test_old_store_without_logits_runs_sfd_alone_with_the_note(
    tiny_cache, synthetic_root, tmp_path, capsys
):
    rows, resolved = _distill(tiny_cache, synthetic_root, tmp_path / "old")
    assert rows and all("loss_sld" not in r and math.isfinite(r["loss_kd"]) for r in rows)
    assert "--store-logits" in resolved["notes"][0]
    assert "note: SAMKD runs SFD alone" in " ".join(capsys.readouterr().err.split())


def test_sld_weight_and_temperature_flags_reach_the_term():
    from dfmsd_cli.errors import UserError

    student = build_model("retina_tiny", num_classes=3)
    cfg = method_config("samkd", "retina_tiny", sld_weight=2.5, sld_tau=2.0)
    cfg = with_stores(cfg, student, _stores(RETINA_LOGITS), online=False)
    sld_term = next(t for t in cfg.spec.terms if t.key == "sld")
    assert sld_term.weight_of(cfg) == 2.5 and "w=2.5, τ=2" in cfg.notes[0]
    assert build_stage_losses(cfg, [8, 16], 16, 16)["sld"].tau == 2.0
    for bad in ({"sld_weight": -1.0}, {"sld_tau": 0.0}):
        with pytest.raises(UserError, match="--sld-"):
            method_config("samkd", "retina_tiny", **bad)

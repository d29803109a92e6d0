"""The ME pass is back-propagated after the main pass (two graphs never held at once): the
gradients equal those of one backward through the summed loss, and so does the logged loss."""

from __future__ import annotations

import torch

from dfmsd_cli.distill.step import train_step
from dfmsd_cli.store.batch import TeacherBatch, TeacherView

LEVELS = (8, 16, 32, 64, 128)


def _model():
    from dfmsd_cli.distill.methods import build_stage_losses, method_config
    from dfmsd_cli.distill.model import DistillModel
    from dfmsd_cli.models import build_model

    torch.manual_seed(0)
    student = build_model("retina_tiny", num_classes=3)
    cfg = method_config("dfmsd", "retina_tiny")
    losses = build_stage_losses(cfg, list(LEVELS), student.out_channels, 32, with_me=True)
    return DistillModel(student, losses, cfg).train()


def _scaled(view: TeacherView, k: float) -> TeacherView:
    """``view`` with its maps (not its valid masks) multiplied by ``k``."""
    return TeacherView(
        {s: v * k for s, v in view.features.items()},
        view.valid,
        {s: v * k for s, v in view.att_spatial.items()},
        {s: v * k for s, v in view.att_channel.items()},
    )


def _batch() -> dict:
    g = torch.Generator().manual_seed(7)
    images = torch.randn(2, 3, 64, 96, generator=g)
    main = TeacherView({}, {}, {}, {})
    for s in LEVELS:
        h, w = -(-64 // s), -(-96 // s)
        f = torch.randn(2, 32, h, w, generator=g)
        main.features[s] = f
        main.valid[s] = torch.ones(2, h, w, dtype=torch.bool)
        main.att_spatial[s] = f.abs().mean(1)
        main.att_channel[s] = f.abs().mean((2, 3))
    teacher = TeacherBatch({"main": main, "me": _scaled(main, 0.5)})
    teacher.inputs["me"] = images.flip(-1) + 0.1
    return {
        "images": images,
        "image_sizes": [(64, 96), (60, 90)],
        "targets": [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1])}]
        * 2,
        "teacher": teacher,
    }


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_two_pass_step_equals_one_backward_of_the_sum():
    model, batch = _model(), _batch()
    torch.manual_seed(3)  # the masks are random: same draws in both runs
    losses = model(batch["images"], batch["image_sizes"], batch["targets"], batch["teacher"])
    assert set(losses) >= {"loss_kd", "loss_sfa", "loss_me"}
    total = sum(losses.values())
    total.backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)

    torch.manual_seed(3)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    values, loss = train_step(model, _batch(), torch.device("cpu"), False, scaler)
    got = _grads(model)
    assert set(got) == set(expected)
    me_params = [n for n in got if n.startswith("losses.me.")]
    assert me_params and any(got[n].abs().sum() > 0 for n in me_params)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-6, msg=n)
    total = float(total.detach())
    assert abs(values["loss"] - total) < 1e-4 * total
    assert abs(values["loss_me"] - float(losses["loss_me"].detach())) < 1e-6 * total


def test_three_pass_step_with_adv_equals_one_backward_of_the_sum():
    from dfmsd_cli.distill.methods import build_stage_losses, method_config
    from dfmsd_cli.distill.model import DistillModel

    model = _model()
    torch.manual_seed(0)
    cfg = method_config("dfmsd", "retina_tiny", adv_weight=0.5)
    channels = model.student.out_channels
    losses = build_stage_losses(cfg, list(LEVELS), channels, 32, with_me=True, with_adv=True)
    model = DistillModel(model.student, losses, cfg).train()
    batch = _batch()
    batch["teacher"].views["adv"] = _scaled(batch["teacher"].main, 2.0)
    batch["teacher"].inputs["adv"] = batch["images"] + 0.05
    torch.manual_seed(3)
    out = model(batch["images"], batch["image_sizes"], batch["targets"], batch["teacher"])
    assert set(out) >= {"loss_kd", "loss_sfa", "loss_me", "loss_adv"}
    sum(out.values()).backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    values, _ = train_step(model, batch, torch.device("cpu"), False, scaler)
    got = _grads(model)
    assert set(got) == set(expected)
    assert any(got[n].abs().sum() > 0 for n in got if n.startswith("losses.adv."))
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-6, msg=n)
    assert abs(values["loss_adv"] - float(out["loss_adv"].detach())) < 1e-5

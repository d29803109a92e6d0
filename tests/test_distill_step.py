"""The ME pass is back-propagated after the main pass (two graphs never held at once): the
gradients equal those of one backward through the summed loss, and so does the logged loss."""

from __future__ import annotations

import torch

from dfmsd_cli.distill.step import train_step

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


def _batch() -> dict:
    g = torch.Generator().manual_seed(7)
    images = torch.randn(2, 3, 64, 96, generator=g)
    teacher = {"features": {}, "valid": {}, "att_spatial": {}, "att_channel": {}}
    for s in LEVELS:
        h, w = -(-64 // s), -(-96 // s)
        f = torch.randn(2, 32, h, w, generator=g)
        teacher["features"][s] = f
        teacher["valid"][s] = torch.ones(2, h, w, dtype=torch.bool)
        teacher["att_spatial"][s] = f.abs().mean(1)
        teacher["att_channel"][s] = f.abs().mean((2, 3))
    teacher_me = {k: {s: v * 0.5 for s, v in d.items()} for k, d in teacher.items()}
    teacher_me["valid"] = teacher["valid"]
    return {
        "images": images,
        "image_sizes": [(64, 96), (60, 90)],
        "targets": [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1])}]
        * 2,
        "teacher": teacher,
        "teacher_me": teacher_me,
        "me_images": images.flip(-1) + 0.1,
    }


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_two_pass_step_equals_one_backward_of_the_sum():
    model, batch = _model(), _batch()
    torch.manual_seed(3)  # the masks are random: same draws in both runs
    losses = model(
        batch["images"], batch["image_sizes"], batch["targets"], batch["teacher"],
        batch["me_images"], batch["teacher_me"],
    )  # fmt: skip
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
    batch["teacher_adv"] = {
        k: {s: v * 2.0 for s, v in d.items()} for k, d in batch["teacher"].items()
    }
    batch["teacher_adv"]["valid"] = batch["teacher"]["valid"]
    batch["adv_images"] = batch["images"] + 0.05
    torch.manual_seed(3)
    out = model(
        batch["images"], batch["image_sizes"], batch["targets"], batch["teacher"],
        batch["me_images"], batch["teacher_me"], adv_images=batch["adv_images"],
        teacher_adv=batch["teacher_adv"],
    )  # fmt: skip
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

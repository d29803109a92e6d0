"""The adversarial view (DFMSD §3.4, docs/method.md): the perturbation raises the teacher's
detection loss, is stored exactly (int8 + checksum), replays bit-identically, and L_adv trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dfmsd_cli.data.adversarial import (
    AdvConfig,
    attack,
    loss_mode,
    regenerate,
    replay,
    teacher_loss,
)
from dfmsd_cli.data.enhance import input_checksum
from dfmsd_cli.data.geometry import Geometry, normalize, pad_batch
from dfmsd_cli.errors import UserError

GEOM = Geometry(img_scale=(128, 96))


@pytest.fixture(scope="module")
def teacher():
    from dfmsd_cli.models import build_model

    torch.manual_seed(0)
    return build_model("fcos_tiny", num_classes=3).eval()


def _image():
    g = torch.Generator().manual_seed(0)
    raw = (torch.rand(3, 64, 96, generator=g) * 255).round()
    raw[:, :4] = 0.0  # pixels at the range limits: clipping must hold
    raw[:, -4:] = 255.0
    target = {"boxes": torch.tensor([[10.0, 8.0, 50.0, 40.0]]), "labels": torch.tensor([2])}
    return raw, target


def _loss(model, raw, target) -> float:
    loss_mode(model)
    try:
        with torch.no_grad():
            return float(teacher_loss(model, raw, target, GEOM))
    finally:
        model.eval()


@pytest.mark.parametrize("steps", [1, 3])
def test_attack_raises_teacher_loss_within_budget_and_is_reproducible(teacher, steps):
    raw, target = _image()
    cfg = AdvConfig(eps=6, steps=steps)
    delta = attack(teacher, raw, target, GEOM, cfg, image_id=11)
    assert delta.dtype == torch.int8 and delta.shape == raw.shape
    assert int(delta.abs().max()) <= 6 and int(delta.abs().max()) > 0
    if steps == 1:  # FGSM: ±ε wherever the gradient is non-zero
        assert set(delta.unique().tolist()) <= {-6, 0, 6}
    x_adv = replay(raw, delta)
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 255.0
    assert _loss(teacher, x_adv, target) > _loss(teacher, raw, target)
    assert not teacher.training  # attack leaves the teacher in eval mode
    assert torch.equal(attack(teacher, raw, target, GEOM, cfg, image_id=11), delta)


def test_replay_is_bit_identical_and_checked(teacher):
    raw, target = _image()
    delta = attack(teacher, raw, target, GEOM, AdvConfig(eps=4, steps=2), image_id=3)
    x = replay(raw, delta)
    # by hand: x + δ clipped, exactly
    assert torch.equal(x, (raw + delta.float()).clamp(0, 255))
    checksum = input_checksum(x)
    assert torch.equal(regenerate(raw, delta, checksum), x)
    other = delta.clone()
    y, x0 = [int(v[0]) for v in torch.nonzero((raw[0] > 10) & (raw[0] < 245), as_tuple=True)]
    other[0, y, x0] += 1  # one grey level on a pixel far from the clipping limits
    with pytest.raises(UserError, match="adversarial input differs"):
        regenerate(raw, other, checksum)


def test_adv_config_validation():
    assert AdvConfig(eps=8, steps=1).step_size == 8
    assert AdvConfig(eps=8, steps=10).step_size == 2  # ceil(2.5 * 8 / 10)
    assert AdvConfig(eps=1, steps=10).step_size == 1
    for bad in (dict(eps=0), dict(eps=128), dict(eps=2.5), dict(eps=4, steps=0)):
        with pytest.raises(UserError, match="--adv-"):
            AdvConfig(**bad)


@pytest.fixture(scope="module")
def adv_env(synthetic_root, tmp_path_factory) -> dict:
    from dfmsd_cli.store.precompute import PrecomputeOptions, precompute

    data = synthetic_root
    ann, imgs = data / "annotations" / "instances_train2017.json", data / "train2017"
    cache = tmp_path_factory.mktemp("adv") / "cache"
    opts = PrecomputeOptions(
        teacher="fcos_tiny",
        cache=str(cache),
        views=["orig", "hflip"],
        adv=AdvConfig(eps=4, steps=2, seed=5),
        geometry=GEOM,
        num_workers=0,
        device="cpu",
        seed=1,
        max_images=4,
        progress=False,
    )
    summary = precompute(ann, imgs, opts)
    return {"data": data, "cache": cache, "path": summary["path"], "ann": ann, "imgs": imgs}


def test_precomputed_adv_view_is_the_teachers_attack_replayed(adv_env):
    from dfmsd_cli.data.coco import CocoDetection
    from dfmsd_cli.models.checkpoint import load_teacher
    from dfmsd_cli.store.inspect import store_info
    from dfmsd_cli.store.reader import TeacherStore

    store = TeacherStore.open(adv_env["path"])
    assert store.meta.views == ("orig", "hflip", "adv")
    assert store.meta.attrs["adv"]["eps"] == 4 and store.meta.attrs["adv"]["method"] == "pgd"
    assert store_info(adv_env["path"])["views"] == ["orig", "hflip", "adv"]
    ds = CocoDetection(adv_env["ann"], adv_env["imgs"], geometry=GEOM, train=False, max_images=4)
    ds.keep_raw = True
    model = load_teacher("fcos_tiny", ds.num_classes, None, seed=1)
    cfg = AdvConfig(eps=4, steps=2, seed=5)
    for i in range(4):
        s = ds.get(i, "orig")
        t = store.get(i, "adv")
        delta = t["adversarial"]["delta"]
        target = {"boxes": s["boxes"], "labels": s["labels"]}
        assert torch.equal(delta, attack(model, s["raw"], target, GEOM, cfg, s["image_id"]))
        x = regenerate(s["raw"], delta, t["adversarial"]["checksum"])  # raises on mismatch
        with torch.inference_mode():
            ref = model(pad_batch([normalize(x, GEOM)], 32), [tuple(x.shape[-2:])]).features
        torch.testing.assert_close(t["features"][8], ref[8][0], atol=2e-3, rtol=2e-3)
        assert store.get(i, "orig")["adversarial"] is None


def _distill(adv_env, out: Path, online: bool = False, **method):
    from dfmsd_cli.distill.run import DistillOptions, distill

    opts = DistillOptions(
        student="retina_tiny",
        out=out,
        stages=("fcos_tiny",),
        data=adv_env["data"],
        cache=str(adv_env["cache"]),
        epochs=(1,),
        batch_size=2,
        warmup_iters=2,
        num_workers=0,
        device="cpu",
        evaluate=False,
        max_steps=2,
        online=online,
        method_options={"me": False, **method},
    )
    return distill(opts)


def test_distill_adds_l_adv_from_the_store_and_the_switch_removes_it(adv_env, tmp_path):
    _distill(adv_env, tmp_path / "adv", adv=True)
    lines = (tmp_path / "adv" / "metrics.jsonl").read_text().splitlines()
    train = [json.loads(x) for x in lines if '"train"' in x]
    assert train and all(r["loss_adv"] > 0 for r in train)
    _distill(adv_env, tmp_path / "noadv", adv=False)
    lines = (tmp_path / "noadv" / "metrics.jsonl").read_text().splitlines()
    assert all("loss_adv" not in json.loads(x) for x in lines)


def test_adv_errors(adv_env, tmp_path, synthetic_root):
    from dfmsd_cli.distill.methods import method_config

    with pytest.raises(UserError, match="--adv is part of --method dfmsd"):
        method_config("mgd", "retina_r50", adv=True)
    with pytest.raises(UserError, match="--adv"):
        _distill(adv_env, tmp_path / "online", adv=True, online=True)
    from dfmsd_cli.store.precompute import PrecomputeOptions, precompute

    with pytest.raises(UserError, match="--adv-eps"):
        precompute(
            adv_env["ann"],
            adv_env["imgs"],
            PrecomputeOptions(teacher="fcos_tiny", views=["orig", "adv"], cache=str(tmp_path)),
        )

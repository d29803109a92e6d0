"""samkd's SLD with ``--online``: the live teacher's class logits (same layout as the store's),
the same L_SLD as from a ``--store-logits`` store on one image within float16 rounding, and
the CLI run on the homogeneous demo pair (gfl_tiny ← the shipped gfl_tiny teacher)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import _cli

from dfmsd_cli.data.coco import CocoDetection
from dfmsd_cli.data.geometry import Geometry
from dfmsd_cli.distill.dataset import DistillDataset, collate_distill
from dfmsd_cli.distill.methods import method_config
from dfmsd_cli.distill.methods.registry import build_stage_losses
from dfmsd_cli.distill.methods.samkd import with_stores
from dfmsd_cli.distill.model import DistillModel
from dfmsd_cli.distill.online import OnlineTeacher, load_online_teacher, teacher_logit_layout
from dfmsd_cli.models import build_model
from dfmsd_cli.store.precompute import PrecomputeOptions, precompute
from dfmsd_cli.store.reader import TeacherStore

GEOM = Geometry(img_scale=(128, 96))
TEACHER = "retina_tiny"  # 9 anchors: the anchor-major layout is exercised
SHIPPED_GFL = Path(__file__).resolve().parents[1] / "examples" / "demo_teachers" / "gfl_tiny.pth"


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    from dfmsd_cli.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("samkd_online")
    data = make_synthetic(root / "data", images=2, seed=3, min_size=64, max_size=128)
    ann, imgs = data / "annotations" / "instances_train2017.json", data / "train2017"
    opts = PrecomputeOptions(teacher=TEACHER, cache=str(root / "cache"), geometry=GEOM,
                             views=["orig", "hflip"], store_logits=True, num_workers=0,
                             device="cpu", seed=5, progress=False)  # fmt: skip
    path = precompute(ann, imgs, opts)["path"]
    coco = CocoDetection(ann, imgs, geometry=GEOM, views=("orig", "hflip"))
    return {"coco": coco, "store": TeacherStore.open(path)}


def test_teacher_logit_layout_is_what_the_store_records(env):
    k = env["coco"].num_classes
    assert teacher_logit_layout(TEACHER, k) == {
        key: v for key, v in env["store"].meta.logits.items() if key != "dtype"
    }
    assert teacher_logit_layout("gfl_tiny", k) == {"anchors": 1, "classes": k, "kind": "sigmoid"}
    assert teacher_logit_layout("frcnn_tiny", k) is None  # two-stage: no per-position logits


def test_online_and_store_fed_sld_agree_on_one_image(env):
    """One image, both views: the live teacher's logits equal the stored ones within float16
    rounding, and the student's L_SLD against either differs by float16 rounding only."""
    coco, store = env["coco"], env["store"]
    torch.manual_seed(0)
    student = build_model("retina_tiny", num_classes=coco.num_classes).train()
    layout_store = SimpleNamespace(store=store)
    cfg = with_stores(method_config("samkd", "retina_tiny"), student, [layout_store], False)
    cfg_online = with_stores(
        method_config("samkd", "retina_tiny"), student, [None], True, teachers=[TEACHER]
    )
    assert cfg.loss_kwargs == cfg_online.loss_kwargs and cfg.loss_kwargs["sld_active"]
    levels = list(store.meta.strides)
    losses = build_stage_losses(cfg, levels, student.out_channels, store.meta.channels)
    model = DistillModel(student, losses, cfg)
    rows = {i: r for r, i in enumerate(store.meta.image_ids)}
    stored = DistillDataset(coco, store, [rows[i] for i in coco.image_ids], tuple(levels))
    plain = DistillDataset(coco, None)
    teacher = load_online_teacher(TEACHER, coco.num_classes, None, 5, "cpu")  # the store's seed
    online = OnlineTeacher(teacher, levels, GEOM, logits=True)
    for k in (0, 1):  # image 0: orig, hflip
        a = collate_distill([stored[k]])
        b = online(collate_distill([plain[k]]), a["images"])
        za, zb = a["teacher"].main.logits, b.main.logits
        assert set(za) == set(zb) == set(levels)
        for s in levels:
            assert za[s].shape == zb[s].shape
            assert ((za[s] - zb[s]).abs() <= zb[s].abs() * 2.0**-11 + 1e-3).all()
        targets = a["targets"]
        with torch.no_grad():
            la = model(a["images"], a["image_sizes"], targets, a["teacher"])["loss_sld"]
            lb = model(a["images"], a["image_sizes"], targets, b)["loss_sld"]
        assert float(lb) > 0 and float(la) == pytest.approx(float(lb), rel=2e-3)


def test_online_teacher_without_logits_gives_none(env):
    coco = env["coco"]
    teacher = load_online_teacher(TEACHER, coco.num_classes, None, 5, "cpu")
    batch = collate_distill([DistillDataset(coco, None)[0]])
    view = OnlineTeacher(teacher, [8, 16], GEOM)(batch, batch["images"]).main
    assert view.logits == {} and set(view.features) == {8, 16}


def _run(data, cache, out, *extra) -> tuple[list[dict], dict]:
    argv = ["distill", "--student", "gfl_tiny", "--stages", "gfl_tiny", "--method", "samkd",
            "--data", str(data), "--out", str(out), "--epochs", "1", "--batch-size", "2",
            "--warmup-iters", "2", "--num-workers", "0", "--device", "cpu", "--no-eval",
            "--max-steps", "2", "--img-scale", "128,96", *extra]  # fmt: skip
    if cache is not None:
        argv += ["--cache", str(cache)]
    assert _cli(argv) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    resolved = json.loads((out / "config.json").read_text())["options"]["resolved"]
    return [r for r in rows if r.get("phase") == "train"], resolved


@pytest.mark.slow
def test_homogeneous_demo_pair_runs_sfd_and_sld_from_store_and_online(
    synthetic_root, tmp_path, capsys
):
    """gfl_tiny ← the shipped gfl_tiny teacher: SFD + SLD from a --store-logits store and with
    --online (weights given), and the start-of-run note says so."""
    cache = tmp_path / "cache"
    argv = ["precompute", "--teacher", "gfl_tiny", "--weights", str(SHIPPED_GFL), "--data",
            str(synthetic_root), "--cache", str(cache), "--img-scale", "128,96", "--batch-size",
            "2", "--num-workers", "0", "--device", "cpu", "--store-logits"]  # fmt: skip
    assert _cli(argv) == 0
    capsys.readouterr()
    for out, cache_arg, extra, source in (
        (tmp_path / "store", cache, (), "from store"),
        (tmp_path / "online", None, ("--online", "--teacher-weights", str(SHIPPED_GFL)),
         "from the live teacher gfl_tiny"),
    ):  # fmt: skip
        rows, resolved = _run(synthetic_root, cache_arg, out, *extra)
        assert rows and all(math.isfinite(r["loss_kd"]) for r in rows)
        assert all(math.isfinite(r["loss_sld"]) and r["loss_sld"] > 0 for r in rows)
        note = resolved["notes"][0]
        assert note.startswith("SAMKD runs SFD + SLD") and source in note
        assert "1 anchor(s) × 5 classes" in note
        said = " ".join(capsys.readouterr().err.split())
        assert "note: SAMKD runs SFD + SLD" in said

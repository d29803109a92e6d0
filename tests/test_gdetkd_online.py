"""G-DetKD ``--online``: the live teacher gives the store's regions and RoI features (one image,
within float16 rounding), its detections are the writer's top-K, and a run from the CLI; the
homogeneous pair (gfl_tiny <- gfl_tiny, store with logits) runs L_cls from the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import _cli

from dfmsd_cli.data.geometry import Geometry
from dfmsd_cli.distill.losses.regions import batch_regions, pool_assigned, teacher_strides
from dfmsd_cli.distill.online import ONLINE_TOPK, online_needs, top_detections

TEACHER = "gfl_tiny"
WEIGHTS = Path(__file__).resolve().parents[1] / "examples" / "demo_teachers" / "gfl_tiny.pth"
GEOM = Geometry(img_scale=(320, 256))  # the shipped teacher's scale: it detects there


@pytest.fixture(scope="module")
def gfl_cache(synthetic_root, tmp_path_factory) -> Path:
    """The shipped ``gfl_tiny`` teacher's store (orig+hflip, with logits) of 2 images."""
    from dfmsd_cli.store.precompute import PrecomputeOptions, precompute

    cache = tmp_path_factory.mktemp("gdetkd_online") / "cache"
    opts = PrecomputeOptions(
        teacher=TEACHER,
        weights=str(WEIGHTS),
        cache=str(cache),
        views=["orig", "hflip"],
        geometry=GEOM,
        num_workers=0,
        device="cpu",
        seed=3,
        max_images=2,
        progress=False,
        store_logits=True,
    )
    data = synthetic_root
    precompute(data / "annotations" / "instances_train2017.json", data / "train2017", opts)
    return cache


def test_online_topk_is_precomputes_default():
    from dfmsd_cli.distill.methods import method_config
    from dfmsd_cli.store.precompute import PrecomputeOptions

    assert ONLINE_TOPK == PrecomputeOptions(teacher=TEACHER).topk
    assert online_needs(method_config("gdetkd", "retina_tiny"))["topk"] == ONLINE_TOPK
    assert online_needs(method_config("dfmsd", "retina_tiny"))["topk"] == 0


def test_top_detections_sorts_stably_and_cuts():
    det = {
        "boxes": torch.arange(16.0).reshape(4, 4),
        "scores": torch.tensor([0.2, 0.9, 0.2, 0.5]),
        "labels": torch.tensor([1, 2, 3, 4]),
    }
    top = top_detections(det, 3)
    assert top["labels"].tolist() == [2, 4, 1]  # ties keep their order (the writer's sort)
    assert torch.equal(top["boxes"][0], det["boxes"][1])
    assert top_detections(det, 0)["boxes"].shape == (0, 4)


def test_online_regions_and_roi_features_match_the_store(synthetic_root, gfl_cache):
    """One image per batch (the store runs each image at its own padded size): the live
    teacher's top-K detections are the stored ones, so the regions are the same, and the
    teacher RoI features pooled from its live FPN maps equal those pooled from the stored
    float16 maps within float16 rounding; the class logits likewise."""
    from dfmsd_cli.data.coco import CocoDetection
    from dfmsd_cli.distill.dataset import DistillDataset, collate_distill
    from dfmsd_cli.distill.online import OnlineTeacher, load_online_teacher
    from dfmsd_cli.store.reader import TeacherStore

    data = synthetic_root
    coco = CocoDetection(
        data / "annotations" / "instances_train2017.json",
        data / "train2017",
        geometry=GEOM,
        views=("orig", "hflip"),
    )
    store = TeacherStore.open(gfl_cache / TEACHER / "train2017.zarr")
    rows = {i: r for r, i in enumerate(store.meta.image_ids)}
    levels = (8, 16, 32, 64, 128)
    index = [rows.get(i, -1) for i in coco.image_ids]
    stored = DistillDataset(coco, store, index, levels)
    plain = DistillDataset(coco, None)
    teacher = load_online_teacher(TEACHER, coco.num_classes, str(WEIGHTS), 3, "cpu")
    online = OnlineTeacher(teacher, list(levels), GEOM, topk=ONLINE_TOPK, logits=True)
    strides = teacher_strides(levels)
    for k in (0, 1):  # image 0, orig and hflip views
        a = collate_distill([stored[k]])
        b = online(collate_distill([plain[k]]), a["images"])
        va, vb = a["teacher"].main, b.main
        assert len(va.boxes[0]) > 0  # the shipped teacher detects: regions beyond the GT
        assert vb.boxes[0].shape == va.boxes[0].shape
        torch.testing.assert_close(vb.boxes[0], va.boxes[0], atol=1e-3, rtol=0)
        torch.testing.assert_close(vb.scores[0], va.scores[0], atol=1e-4, rtol=0)
        assert torch.equal(vb.labels[0], va.labels[0])
        gt = [t["boxes"] for t in a["targets"]]
        rois_a, pos_a = batch_regions(gt, va.boxes, va.scores, torch.device("cpu"))
        rois_b, pos_b = batch_regions(gt, vb.boxes, vb.scores, torch.device("cpu"))
        assert torch.equal(pos_a, pos_b) and rois_a.shape[0] > gt[0].shape[0]
        torch.testing.assert_close(rois_b, rois_a, atol=1e-3, rtol=0)
        ta = pool_assigned(va.features, rois_a, strides)
        tb = pool_assigned(vb.features, rois_a, strides)
        assert ta.abs().max() > 0
        assert (ta - tb).abs().max() <= 1e-3 * ta.abs().max() + 1e-3  # float16: 2^-11 relative
        for s in levels:
            za, zb = va.logits[s], vb.logits[s]
            assert (za - zb).abs().max() <= 1e-3 * za.abs().max() + 1e-3


@pytest.mark.slow
def test_gdetkd_online_from_the_cli(synthetic_root, tmp_path):
    argv = ["distill", "--student", "retina_tiny", "--stages", TEACHER, "--teacher-weights",
            str(WEIGHTS), "--method", "gdetkd", "--online", "--data", str(synthetic_root),
            "--out", str(tmp_path / "on"), "--epochs", "1", "--batch-size", "2",
            "--warmup-iters", "2", "--num-workers", "0", "--device", "cpu", "--no-eval",
            "--img-scale", "128,96", "--max-steps", "2", "--ckd-queue", "16"]  # fmt: skip
    assert _cli(argv) == 0
    rows = (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()
    train = [r for r in map(json.loads, rows) if r.get("phase") == "train"]
    assert train and all(r["loss_kd"] > 0 and r["loss_ckd"] > 0 for r in train)


@pytest.mark.slow
def test_gdetkd_homogeneous_pair_runs_class_kd_from_the_cli(synthetic_root, gfl_cache, tmp_path):
    def run(out, *extra):
        argv = ["distill", "--student", TEACHER, "--stages", TEACHER, "--method", "gdetkd",
                "--data", str(synthetic_root), "--cache", str(gfl_cache), "--out", str(out),
                "--epochs", "1", "--batch-size", "2", "--warmup-iters", "2", "--num-workers",
                "0", "--device", "cpu", "--no-eval", "--img-scale", "320,256", "--ckd-queue",
                "16", *extra]  # fmt: skip
        assert _cli(argv) == 0
        rows = (out / "metrics.jsonl").read_text().splitlines()
        resolved = json.loads((out / "config.json").read_text())["options"]["resolved"]
        return [r for r in map(json.loads, rows) if r.get("phase") == "train"], resolved

    train, resolved = run(tmp_path / "homo")
    assert train and all(r["loss_cls_kd"] > 0 and r["loss_cls"] > 0 for r in train)
    assert resolved["loss_kwargs"]["parts"].startswith("L_feat+L_ckd+L_cls (class-aware KD")
    train, resolved = run(tmp_path / "ablation", "--no-class-kd")
    assert train and all("loss_cls_kd" not in r and r["loss_cls"] > 0 for r in train)
    assert resolved["notes"] == ["G-DetKD runs without class-aware KD (L_cls): --no-class-kd"]

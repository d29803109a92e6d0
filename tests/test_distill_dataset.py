"""DistillDataset's batched fetch: one store round trip per batch, the same samples as item by
item (store replay and resume stay bit-exact)."""

from __future__ import annotations

import pytest
import torch

from dfmsd_cli.data.adversarial import AdvConfig
from dfmsd_cli.data.geometry import Geometry

GEOM = Geometry(img_scale=(128, 96))  # tiny_cache's geometry


@pytest.fixture(scope="module")
def me_adv_store(synthetic_root, tmp_path_factory):
    """retina_tiny's store over 4 images with the orig, hflip, me (enhanced from fcos_tiny's
    store) and adv views."""
    from dfmsd_cli.store.precompute import PrecomputeOptions, precompute

    cache = tmp_path_factory.mktemp("me_adv") / "cache"
    data = synthetic_root
    for teacher, enhance_from in (("fcos_tiny", None), ("retina_tiny", "fcos_tiny")):
        opts = PrecomputeOptions(
            teacher=teacher,
            cache=str(cache),
            views=["orig", "hflip"],
            enhance_from=enhance_from,
            adv=AdvConfig(eps=4, steps=1, seed=5) if enhance_from else None,
            geometry=GEOM,
            num_workers=0,
            device="cpu",
            seed=1,
            max_images=4,
            progress=False,
        )
        ann = data / "annotations" / "instances_train2017.json"
        path = precompute(ann, data / "train2017", opts)["path"]
    return path


def _dataset(root, path, views=("orig", "hflip"), **kw):
    from dfmsd_cli.data.coco import CocoDetection
    from dfmsd_cli.distill.dataset import DistillDataset
    from dfmsd_cli.store.reader import TeacherStore

    coco = CocoDetection(
        root / "annotations" / "instances_train2017.json",
        root / "train2017",
        geometry=GEOM,
        views=views,
    )
    store = TeacherStore.open(path)
    rows = {i: r for r, i in enumerate(store.meta.image_ids)}
    index = [rows.get(i, -1) for i in coco.image_ids]
    return DistillDataset(coco, store, index, tuple(store.meta.strides), **kw)


def _assert_same(a, b, where="sample"):
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_batched_fetch_equals_item_by_item(synthetic_root, tiny_cache):
    ds = _dataset(synthetic_root, tiny_cache / "retina_tiny" / "train2017.zarr", ("orig",))
    ks = [5, 0, 11, 3, 2, 7]  # out of order
    batch = ds.__getitems__(ks)
    assert len(batch) == len(ks) and all("teacher" in s for s in batch)
    for k, s in zip(ks, batch, strict=True):
        _assert_same(s, ds[k], f"item {k}")
        assert "features" in s["teacher"] and "boxes" in s["teacher"]


def test_batched_fetch_with_me_and_adv_views_equals_item_by_item(synthetic_root, me_adv_store):
    ds = _dataset(synthetic_root, me_adv_store, me=True, adv=True)
    ks = [1, 6, 0, 3]  # images 0-3 (the store's), orig and hflip, out of order
    batch = ds.__getitems__(ks)
    for k, s in zip(ks, batch, strict=True):
        assert {"teacher_me", "me_image", "teacher_adv", "adv_image"} <= s.keys()
        assert "raw" not in s
        _assert_same(s, ds[k], f"item {k}")


class _Counting:
    """A store proxy counting ``get_many`` calls (the round trips)."""

    def __init__(self, store):
        self.store, self.calls = store, 0

    def get_many(self, items, strides=None):
        self.calls += 1
        return self.store.get_many(items, strides)


def test_dataloader_reads_one_batch_in_one_round_trip(synthetic_root, tiny_cache):
    from dfmsd_cli.distill.dataset import collate_distill

    ds = _dataset(synthetic_root, tiny_cache / "retina_tiny" / "train2017.zarr", ("orig",))
    ds.store = counting = _Counting(ds.store)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=4, sampler=range(8), collate_fn=collate_distill, num_workers=0
    )
    batches = list(loader)
    assert len(batches) == 2 and counting.calls == 2  # not 8: one get_many per batch
    assert batches[0]["teacher"].views["main"].features


def test_store_flags_reach_the_store(synthetic_root, tiny_cache, tmp_path, monkeypatch):
    """``--store-concurrency`` and ``--cache-local`` of ``dfmsd distill`` are passed to
    ``TeacherStore.open`` (they act on object storage only; tests/test_store_s3.py reads S3)."""
    from conftest import _cli

    from dfmsd_cli.store.reader import TeacherStore

    opened, real = [], TeacherStore.open.__func__

    def spy(cls, path, mode="r", concurrency=None, cache_local=None):
        opened.append((str(path), concurrency, cache_local))
        return real(cls, path, mode, concurrency, cache_local)

    monkeypatch.setattr(TeacherStore, "open", classmethod(spy))
    local = tmp_path / "local"
    argv = ["distill", "--student", "retina_tiny", "--stages", "retina_tiny", "--data",
            str(synthetic_root), "--cache", str(tiny_cache), "--img-scale", "128,96",
            "--batch-size", "2", "--num-workers", "0", "--device", "cpu", "--max-steps", "1",
            "--no-eval", "--out", str(tmp_path / "run"), "--store-concurrency", "3",
            "--cache-local", str(local)]  # fmt: skip
    assert _cli(argv) == 0
    store = str(tiny_cache / "retina_tiny" / "train2017.zarr")
    assert (store, 3, str(local)) in opened
    assert _cli([*argv[:-4], "--store-concurrency", "0"]) == 2  # a count: at least 1


def test_cache_verify_passes_store_concurrency(tiny_cache, monkeypatch):
    from conftest import _cli

    from dfmsd_cli.store.reader import TeacherStore

    opened, real = [], TeacherStore.open.__func__

    def spy(cls, path, mode="r", concurrency=None, cache_local=None):
        opened.append(concurrency)
        return real(cls, path, mode, concurrency, cache_local)

    monkeypatch.setattr(TeacherStore, "open", classmethod(spy))
    store = str(tiny_cache / "retina_tiny" / "train2017.zarr")
    assert _cli(["cache", "verify", store, "--quick", "--store-concurrency", "5"]) == 0
    assert 5 in opened

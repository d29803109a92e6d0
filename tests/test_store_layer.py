"""Store layer with random tensors: round trip, quantisation, markers, fingerprints, enhancement."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from dfmsd_cli.data.enhance import (
    EnhanceConfig,
    EnhanceParams,
    apply_enhance,
    area_ratio,
    choose,
    input_checksum,
    regenerate,
)
from dfmsd_cli.data.geometry import Geometry
from dfmsd_cli.errors import UserError
from dfmsd_cli.store.dataset import StoreDataset
from dfmsd_cli.store.quantize import FeatureRangeError, dequantize_uint8, quantize_uint8
from dfmsd_cli.store.reader import TeacherStore, collate_teacher
from dfmsd_cli.store.schema import shard_range, store_path
from dfmsd_cli.store.writer import ImageResult, StoreSpec, StoreWriter, ViewResult, create_or_open

GEOM = Geometry(img_scale=(128, 96))
STRIDES = [8, 16, 32]
C = 6
# (h, w) resized sizes: landscape, portrait (stored transposed), square, small
SIZES = [(96, 128), (128, 90), (64, 64), (40, 100)]


def spec(**kw) -> StoreSpec:
    base = dict(
        teacher="retina_tiny",
        num_classes=3,
        weights_sha256="a" * 64,
        split="train2017",
        ann_sha256="b" * 64,
        image_ids=[11, 12, 13, 14],
        geometry=GEOM.to_dict(),
        strides=STRIDES,
        channels=C,
        views=["orig", "hflip"],
        block=2,
        topk=5,
    )
    base.update(kw)
    return StoreSpec(**base)


def result(i: int, views=("orig", "hflip"), scale: float = 1.0) -> ImageResult:
    g = torch.Generator().manual_seed(i)
    h, w = SIZES[i]
    H, W = math.ceil(h / 32) * 32, math.ceil(w / 32) * 32
    vr = {}
    for v in views:
        feats = {
            s: torch.randn(C, math.ceil(H / s), math.ceil(W / s), generator=g) * scale
            for s in STRIDES
        }
        n = 3 + i
        boxes = torch.rand(n, 4, generator=g) * 50
        boxes[:, 2:] += boxes[:, :2]
        vr[v] = ViewResult(
            feats, boxes, torch.rand(n, generator=g), torch.randint(1, 4, (n,), generator=g)
        )
    return ImageResult(i, (h, w), (H, W), vr)


@pytest.mark.parametrize(
    "dtype,codec,tol",
    [
        ("float16", "zstd", 2e-3),
        ("uint8", "zstd", 2.5e-2),
        ("float16", "blosc", 2e-3),
        ("uint8", "blosc", 2.5e-2),
        ("float16", "pcodec", 2e-3),
        ("bfloat16", "pcodec", 8e-3),
    ],
)
def test_round_trip(tmp_path, dtype, codec, tol):
    path = tmp_path / "s.zarr"
    w = StoreWriter(create_or_open(path, spec(dtype=dtype, codec=codec), fix="x"))
    results = [result(i) for i in range(4)]
    for r in results[:3]:
        w.write(r)
    store = TeacherStore.open(path)
    assert store.meta.image_ids == [11, 12, 13, 14] and store.meta.dtype == dtype
    assert list(store.done()) == [1, 1, 1, 0]
    assert bool(np.asarray(store.group["transposed"][:])[1])  # the portrait image
    for r in results[:3]:
        for v in ("orig", "hflip"):
            t = store.get(r.index, v)
            for s in STRIDES:
                ref = r.views[v].features[s]
                got = t["features"][s]
                assert got.shape == ref.shape and t["valid"][s] == tuple(ref.shape[-2:])
                rel = float((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())
                assert rel < tol
                torch.testing.assert_close(t["att_spatial"][s], ref.abs().mean(0))
                torch.testing.assert_close(t["att_channel"][s], ref.abs().mean((1, 2)))
            order = torch.argsort(r.views[v].scores, descending=True)[:5]
            torch.testing.assert_close(t["scores"], r.views[v].scores[order])
            torch.testing.assert_close(t["boxes"], r.views[v].boxes[order])
            assert t["labels"].dtype == torch.int64
    with pytest.raises(UserError, match="not complete"):
        store.get(3, "orig")
    with pytest.raises(UserError, match="view 'me' is not in store"):
        store.get(0, "me")


def test_collate_teacher_pads_and_masks(tmp_path):
    path = tmp_path / "s.zarr"
    w = StoreWriter(create_or_open(path, spec(), fix="x"))
    for i in range(3):
        w.write(result(i))
    store = TeacherStore.open(path)
    samples = [store.get(i, "orig") for i in range(3)]
    b = collate_teacher(samples, batch_hw=(128, 128))
    for s in STRIDES:
        hs = math.ceil(128 / s)
        assert b.features[s].shape == (3, C, hs, hs) and b.valid[s].shape == (3, hs, hs)
        for k, t in enumerate(samples):
            h, w_ = t["valid"][s]
            assert int(b.valid[s][k].sum()) == h * w_
            assert torch.equal(b.features[s][k, :, :h, :w_], t["features"][s])
            assert float(b.features[s][k].abs().sum()) == pytest.approx(
                float(t["features"][s].abs().sum()), rel=1e-5
            )
    assert b.area_ratio.shape == (3,)
    assert b.image_id == [t["image_id"] for t in samples] and len(b.boxes) == 3


def test_float16_overflow_refused_and_nothing_marked(tmp_path):
    path = tmp_path / "s.zarr"
    w = StoreWriter(create_or_open(path, spec(), fix="x"))
    with pytest.raises(FeatureRangeError, match="--dtype uint8"):
        w.write(result(0, scale=1e6))
    assert TeacherStore.open(path).done()[0] == 0
    # uint8 stores the same features without inf
    w8 = StoreWriter(create_or_open(tmp_path / "u.zarr", spec(dtype="uint8"), fix="x"))
    w8.write(result(0, scale=1e6))
    t = TeacherStore.open(tmp_path / "u.zarr").get(0, "orig")
    assert all(torch.isfinite(f).all() for f in t["features"].values())


def test_uint8_constant_channel_exact():
    x = torch.randn(3, 4, 5)
    x[1] = 2.5
    q, p = quantize_uint8(x)
    y = dequantize_uint8(q, p)
    assert torch.equal(y[1], x[1])
    assert float((y - x).abs().max()) <= float(p[:, 0].max()) / 2 + 1e-6


@pytest.mark.parametrize(
    "change,what",
    [
        ({"weights_sha256": "c" * 64}, "teacher weights"),
        ({"geometry": Geometry(img_scale=(160, 96)).to_dict()}, "geometry img_scale"),
        ({"image_ids": [11, 12, 14, 13]}, "ordered image ids"),
        ({"ann_sha256": "d" * 64}, "annotation file"),
        ({"teacher": "frcnn_tiny"}, "teacher model"),
        ({"dtype": "uint8"}, "dtype"),
        ({"codec": "zstd"}, "codec"),
    ],
)
def test_reopen_mismatch_names_what_differs(tmp_path, change, what):
    path = tmp_path / "s.zarr"
    create_or_open(path, spec(), fix="use another --cache")
    create_or_open(path, spec(), fix="use another --cache")  # same spec reopens fine
    with pytest.raises(UserError, match=what) as exc:
        create_or_open(path, spec(**change), fix="use another --cache")
    assert "use another --cache" in str(exc.value) and "\n" not in str(exc.value)


def test_reader_check_and_pickle(tmp_path):
    path = tmp_path / "s.zarr"
    StoreWriter(create_or_open(path, spec(), fix="x")).write(result(0))
    store = TeacherStore.open(path)
    store.check(image_ids=[11, 12, 13, 14], geometry=GEOM, strides=(8, 16), views=("orig",))
    with pytest.raises(UserError, match="geometry img_scale"):
        store.check(geometry=Geometry(img_scale=(1333, 800)))
    with pytest.raises(UserError, match=r"strides \[64\] not in the store"):
        store.check(strides=(8, 64))
    with pytest.raises(UserError, match="ordered image ids"):
        store.check(image_ids=[1, 2, 3, 4])
    clone = pickle.loads(pickle.dumps(store))  # lazy: reopens on first use
    assert clone._group is None
    assert torch.equal(clone.get(0, "hflip")["features"][8], store.get(0, "hflip")["features"][8])
    ds = StoreDataset(path, views=("orig", "hflip"))
    assert len(ds) == 2 and ds[1]["view"] == "hflip"


def test_missing_store_is_user_error(tmp_path):
    with pytest.raises(UserError, match="no teacher store"):
        TeacherStore.open(tmp_path / "nope.zarr")


def test_shard_ranges_block_aligned_and_cover():
    for n in (1, 7, 64, 130):
        for k in (1, 2, 3, 5):
            ranges = [shard_range(n, i, k, 4) for i in range(k)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            for (_, a1), (b0, _) in zip(ranges, ranges[1:], strict=False):
                assert a1 == b0 and a1 % 4 == 0 or a1 == n


def test_enhance_regenerates_bit_identical():
    raw = torch.rand(3, 40, 56, generator=torch.Generator().manual_seed(0)) * 255
    cfg = EnhanceConfig(p=1.0)
    for ratio, kind in ((0.1, "noise"), (0.9, "crop")):
        p = choose(ratio, image_id=7, size=(40, 56), cfg=cfg)
        assert p.kind == kind
        x = apply_enhance(raw, p)
        assert x.shape == raw.shape and not torch.equal(x, raw)
        stored = EnhanceParams.from_array(p.to_array(), input_checksum(x))
        y = regenerate(raw.clone(), stored.to_dict())
        assert torch.equal(x, y)
    assert choose(0.1, 7, (40, 56), EnhanceConfig(p=0.0)).kind == "none"
    with pytest.raises(UserError, match="differs from the one the teacher saw"):
        regenerate(raw + 1, stored)


def test_background_writer_reraises_and_leaves_no_marker(tmp_path):
    from dfmsd_cli.store.writer import BackgroundWriter

    path = tmp_path / "s.zarr"
    bg = BackgroundWriter(StoreWriter(create_or_open(path, spec(), fix="x")), threads=2)
    bg.submit(result(0))
    bg.submit(result(1, scale=1e6))  # float16 overflow in a chunk thread
    bg.submit(3)  # unreadable image marker
    with pytest.raises(FeatureRangeError):
        bg.close()
    done = TeacherStore.open(path).done()
    assert done[1] == 0 and done[0] in (0, 1)


def test_teacher_batch_views_and_device_move():
    from dfmsd_cli.store.batch import TeacherBatch, TeacherView

    f = torch.ones(1, 2, 3, 3)
    v = torch.ones(1, 3, 3, dtype=torch.bool)
    view = TeacherView({8: f}, {8: v}, {8: f[:, 0]}, {8: f.mean((2, 3))}, boxes=[torch.zeros(0, 4)])
    batch = TeacherBatch({"main": view, "me": view})
    assert batch.has("main") and not batch.has("me")  # an extra view needs its student input
    batch.inputs["me"] = torch.zeros(1, 3, 24, 24)
    moved = batch.to("meta")
    assert batch.has("me") and moved.main.features[8].is_meta and moved.inputs["me"].is_meta
    assert moved.main.stats["channel"][8].is_meta and not moved.main.boxes[0].is_meta
    assert view.features[8].device.type == "cpu"  # .to returns a copy


def test_store_path_layout_and_direct_store():
    assert store_path("cache/", "retina_r50", "val2017") == "cache/retina_r50/val2017.zarr"
    assert store_path("cache", "/data/t.zarr", "val2017") == "/data/t.zarr"  # --stages entry


def test_area_ratio_by_hand():
    boxes = torch.tensor([[0.0, 0.0, 5.0, 4.0], [8.0, 6.0, 14.0, 12.0], [0.0, 0.0, 10.0, 10.0]])
    scores = torch.tensor([0.9, 0.5, 0.1])
    # box 1: 5*4 = 20; box 2 clipped to the 10x8 image: 2*2 = 4; box 3 below the threshold
    assert area_ratio(boxes, scores, (8, 10), 0.3) == pytest.approx(24 / 80)
    assert area_ratio(boxes, scores, (8, 10), 0.95) == 0.0


def test_cache_local_false_never_reads_through_a_local_copy(monkeypatch, tmp_path):
    """``cache verify``/``--repair`` open with ``cache_local=False``: DFMSD_CACHE_LOCAL must not
    give them a local copy (a chunk damaged on the server but cached intact would pass)."""
    from dfmsd_cli.store.reader import local_copy_dir

    local = str(tmp_path / "local")
    monkeypatch.setenv("DFMSD_CACHE_LOCAL", local)
    assert local_copy_dir(None, remote=True) == local
    assert local_copy_dir("/x", remote=True) == "/x"
    assert local_copy_dir(False, remote=True) is None
    assert local_copy_dir("/x", remote=False) is None  # a local store never gets a copy


def test_teacher_pass_casts_float16_on_the_device_after_its_range_check():
    from types import SimpleNamespace

    from dfmsd_cli.store.teacher_pass import _features_and_statistics

    g = torch.Generator().manual_seed(0)
    feats = {8: torch.randn(4, 3, 5, 6, generator=g), 16: torch.randn(4, 3, 3, 3, generator=g)}
    items, views = [(7, {}), (8, {})], ["orig", "hflip"]  # rows: 7 orig, 7 hflip, 8 orig, 8 hflip
    half = SimpleNamespace(dtype="float16", pca=None)
    out, stats = _features_and_statistics(feats, [8, 16], items, views, half)
    assert out[8].dtype == torch.float16 and torch.equal(out[8], feats[8].half())
    assert torch.equal(stats[16][1], feats[16].abs().mean(dim=(2, 3)))  # of the float32 map
    for o in (SimpleNamespace(dtype="uint8", pca=None), SimpleNamespace(dtype="float16", pca=4)):
        assert _features_and_statistics(feats, [8], items, views, o)[0][8].dtype == torch.float32
    feats[16][3, 0, 1, 1] = 1e5  # beyond float16's range, in row 3: image 8, view hflip
    with pytest.raises(FeatureRangeError, match="image 8 view hflip stride 16.*--dtype uint8"):
        _features_and_statistics(feats, [8, 16], items, views, half)
    feats[16][3, 0, 1, 1] = float("nan")
    with pytest.raises(FeatureRangeError, match="image 8 view hflip stride 16 contain NaN"):
        _features_and_statistics(feats, [8, 16], items, views, half)

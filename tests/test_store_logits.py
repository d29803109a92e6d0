"""Teacher class logits: the dense detectors' ``return_logits``, ``precompute --store-logits``
(float16 round trip, checksums, resume), old stores without logits, and the collate."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import small_synthetic, train_files
from zarr.codecs import Crc32cCodec

from dfmsd_cli.cli import main
from dfmsd_cli.data.coco import CocoDetection
from dfmsd_cli.data.geometry import Geometry
from dfmsd_cli.errors import UserError
from dfmsd_cli.models import build_model
from dfmsd_cli.models.checkpoint import load_teacher
from dfmsd_cli.models.dense import tv_level_logits
from dfmsd_cli.store.batch import collate_teacher
from dfmsd_cli.store.precompute import PrecomputeOptions, precompute
from dfmsd_cli.store.reader import TeacherStore

GEOM = Geometry(img_scale=(128, 96))
N_IMAGES = 4
K = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return small_synthetic(tmp_path_factory, N_IMAGES)


_files = train_files


def _opts(cache: Path, **kw) -> PrecomputeOptions:
    base = dict(teacher="retina_tiny", cache=str(cache), geometry=GEOM, views=["orig", "hflip"],
                block=2, batch_size=2, num_workers=0, device="cpu", progress=False)  # fmt: skip
    return PrecomputeOptions(**{**base, **kw})


@pytest.fixture(scope="module")
def with_logits(data, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("lg")
    return Path(precompute(*_files(data), _opts(cache, store_logits=True))["path"])


# ------------------------------------------------------------------------------------ models
def test_tv_level_logits_layout_hand_checked():
    """Flattened torchvision rows (h, w, a) with a background column 0 -> (B, A·K, H, W),
    anchor-major, background dropped: entry [b, a·K + k, h, w] = flat[b, (h·W + w)·A + a, k+1]."""
    b, a, k, h, w = 2, 3, 2, 2, 3
    flat = torch.arange(b * h * w * a * (k + 1), dtype=torch.float32).reshape(b, h * w * a, k + 1)
    (lv,) = tv_level_logits(flat, [torch.zeros(b, 1, h, w)], a)
    assert lv.shape == (b, a * k, h, w)
    for bb, aa, kk, hh, ww in [(0, 0, 0, 0, 0), (1, 2, 1, 1, 2), (0, 1, 0, 1, 0)]:
        assert lv[bb, aa * k + kk, hh, ww] == flat[bb, (hh * w + ww) * a + aa, kk + 1]


@pytest.mark.parametrize("name,anchors", [("retina", 9), ("fcos", 1), ("gfl", 1), ("mmfcos", 1)])
def test_dense_detectors_return_logits_per_level(name, anchors):
    torch.manual_seed(0)
    model = build_model(f"{name}_tiny", num_classes=K).eval()
    assert model.logit_anchors == anchors
    x = torch.randn(2, 3, 80, 112)
    with torch.inference_mode():
        out = model(x, return_logits=True)
        plain = model(x)
    assert plain.logits == {}
    assert list(out.logits) == list(model.strides)
    for s, z in out.logits.items():
        assert z.shape == (2, anchors * K, math.ceil(80 / s), math.ceil(112 / s))
    # RetinaNet/GFL score = σ(logit): no detection scores above the best logit's σ
    # (FCOS multiplies in the centerness)
    top = max(torch.sigmoid(z[0]).max().item() for z in out.logits.values())
    if name in ("retina", "gfl") and len(plain.detections[0]["scores"]):
        assert plain.detections[0]["scores"].max().item() <= top + 1e-5


def test_student_logits_carry_the_graph_in_train_mode():
    torch.manual_seed(0)
    model = build_model("retina_tiny", num_classes=K).train()
    t = [{"boxes": torch.tensor([[8.0, 10.0, 60.0, 70.0]]), "labels": torch.tensor([1])}] * 2
    out = model(torch.randn(2, 3, 64, 64), targets=t, return_logits=True)
    assert all(z.requires_grad for z in out.logits.values())


def test_two_stage_has_no_per_level_logits():
    model = build_model("frcnn_tiny", num_classes=K).eval()
    assert model.logit_anchors is None
    with pytest.raises(ValueError, match="no dense classification head"):
        model(torch.randn(1, 3, 64, 64), return_logits=True)


# ------------------------------------------------------------------------------------- store
def test_stored_logits_round_trip_float16(data, with_logits):
    """Stored logits = the teacher on each image alone, within float16 rounding (rel 2^-11),
    portrait images included (stored transposed); every logits array has crc32c."""
    store = TeacherStore.open(with_logits)
    ds = CocoDetection(*_files(data), geometry=GEOM, train=False)
    nc = ds.num_classes
    assert store.meta.logits == {"dtype": "float16", "anchors": 9, "classes": nc,
                                 "kind": "sigmoid"}  # fmt: skip
    model = load_teacher("retina_tiny", ds.num_classes, None, seed=0)
    worst = 0.0
    for i in range(N_IMAGES):
        s = ds.get(i, "orig")
        h, w = s["size"]
        H, W = math.ceil(h / 32) * 32, math.ceil(w / 32) * 32
        x = torch.zeros(1, 3, H, W)
        x[0, :, :h, :w] = s["image"]
        with torch.inference_mode():
            ref = model(x, [(h, w)], return_logits=True).logits
        t = store.get(i, "orig")
        for st in store.meta.strides:
            assert t["logits"][st].shape == ref[st][0].shape
            err = (t["logits"][st] - ref[st][0]).abs()
            bound = ref[st][0].abs() * 2.0**-11 + 1e-3  # float16 rounding + kernel noise
            assert (err <= bound).all()
            worst = max(worst, float(err.max()))
    assert worst > 0  # the encoding is lossy: the test compares what it should
    g = zarr.open_group(str(with_logits), mode="r")
    arr = g["logits/hflip/8"]
    assert arr.shape[1] == 9 * nc and arr.dtype == np.float16
    assert any(isinstance(c, Crc32cCodec) for c in arr.compressors)


def test_collate_pads_logits_like_features(with_logits):
    store = TeacherStore.open(with_logits)
    samples = [store.get(i, "orig") for i in range(2)]
    hw = max(t["pad_size"][0] for t in samples), max(t["pad_size"][1] for t in samples)
    H, W = max(hw), max(hw)
    view = collate_teacher(samples, (H, W))
    nc = store.meta.logits["classes"]
    for s in store.meta.strides:
        assert view.logits[s].shape == (2, 9 * nc, math.ceil(H / s), math.ceil(W / s))
        h, w = samples[1]["valid"][s]
        torch.testing.assert_close(view.logits[s][1, :, :h, :w], samples[1]["logits"][s])
        assert view.logits[s][1, :, h:, :].abs().sum() == 0
    assert set(view.to("cpu").logits) == set(store.meta.strides)


def test_old_store_without_logits_still_opens(data, tmp_path):
    """A store written without --store-logits (as every older store) reads with ``{}`` logits;
    precompute --store-logits into it names the difference."""
    path = precompute(*_files(data), _opts(tmp_path, max_images=2, views=["orig"]))["path"]
    g = zarr.open_group(path, mode="r+")
    attrs = dict(g.attrs)["dfmsd"]
    del attrs["logits"]  # exactly an older store's attributes
    g.attrs["dfmsd"] = attrs
    store = TeacherStore.open(path)
    assert store.meta.logits is None
    t = store.get(0, "orig")
    assert t["logits"] == {}
    assert collate_teacher([t], t["pad_size"]).logits == {}
    with pytest.raises(UserError, match="stored teacher logits"):
        precompute(*_files(data), _opts(tmp_path, max_images=2, views=["orig"], store_logits=True))


def test_store_logits_resumes(data, with_logits, tmp_path):
    """An image left pending is recomputed with its logits, identical to the first run."""
    path = precompute(*_files(data), _opts(tmp_path, store_logits=True))["path"]
    g = zarr.open_group(path, mode="r+")
    done = np.asarray(g["done"][:])
    done[1] = 0
    g["done"][:] = done
    g["logits/orig/16"][1] = 0
    summary = precompute(*_files(data), _opts(tmp_path, store_logits=True))
    assert summary["written"] == 1 and summary["done"] == N_IMAGES
    want = np.asarray(zarr.open_group(str(with_logits), mode="r")["logits/orig/16"][:])
    got = np.asarray(zarr.open_group(path, mode="r")["logits/orig/16"][:])
    np.testing.assert_array_equal(got, want)


def test_two_stage_teacher_with_store_logits_is_a_user_error(data, tmp_path, capsys):
    with pytest.raises(UserError, match="two-stage"):
        precompute(*_files(data), _opts(tmp_path, teacher="frcnn_tiny", store_logits=True))
    argv = ["precompute", "--teacher", "frcnn_tiny", "--data", str(data), "--cache",
            str(tmp_path), "--img-scale", "128,96", "--num-workers", "0", "--device", "cpu",
            "--store-logits"]  # fmt: skip
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "two-stage" in err[0] and "Traceback" not in err[0]


def test_cache_info_and_verify_cover_the_logits(with_logits, tmp_path):
    import shutil

    from dfmsd_cli.store.inspect import store_info, verify_store

    path = tmp_path / "s.zarr"
    shutil.copytree(with_logits, path)
    g = zarr.open_group(str(path), mode="r+")

    def stored(name: str) -> int:
        return sum(a.nbytes_stored() for _, v in g[name].groups() for _, a in v.arrays())

    lg, feat = stored("logits"), stored("feat")
    assert lg > 0
    assert store_info(path)["bytes_on_disk"] > lg + feat
    z = np.asarray(g["logits/orig/8"][0])
    z[0, 0, 0] = np.inf
    g["logits/orig/8"][0] = z
    report = verify_store(path)
    assert any("NaN/inf in the teacher logits" in p for p in report.problems)

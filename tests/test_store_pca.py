"""``precompute --pca K``: the per-level channel projection (store/pca.py) — the fit by hand,
the round trip on a tiny teacher (its error is the discarded energy), resume, old stores, and
``cache verify`` / ``--repair``."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import small_synthetic, train_files

from dfmsd_cli.data.coco import CocoDetection
from dfmsd_cli.data.geometry import Geometry
from dfmsd_cli.errors import UserError
from dfmsd_cli.models.checkpoint import load_teacher
from dfmsd_cli.store.inspect import store_info, verify_store
from dfmsd_cli.store.pca import PcaAccumulator, image_stat, project, reconstruct, split_basis
from dfmsd_cli.store.precompute import PrecomputeOptions, precompute
from dfmsd_cli.store.reader import TeacherStore
from dfmsd_cli.store.teacher_pass import run_batch

GEOM = Geometry(img_scale=(128, 96))
N_IMAGES = 4
K = 8  # of retina_tiny's 64 channels


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return small_synthetic(tmp_path_factory, N_IMAGES)


_files = train_files


def _opts(cache: Path, **kw) -> PrecomputeOptions:
    base = dict(teacher="retina_tiny", cache=str(cache), geometry=GEOM, views=["orig", "hflip"],
                block=4, batch_size=2, num_workers=0, device="cpu", progress=False)  # fmt: skip
    base["pca"] = K
    return PrecomputeOptions(**{**base, **kw})


@pytest.fixture(scope="module")
def pca_store(data, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("pca")
    return Path(precompute(*_files(data), _opts(cache))["path"])


def _teacher_features(data: Path) -> list[dict]:
    """The teacher's float32 features of every image and view, each image alone."""
    ann, img = _files(data)
    ds = CocoDetection(ann, img, geometry=GEOM, train=False)
    model = load_teacher("retina_tiny", ds.num_classes, None, 0)
    opts = _opts(Path("."))
    out = []
    for i in range(len(ds.image_ids)):
        (r,) = run_batch(model, [(i, ds.get(i, "orig"))], ["orig", "hflip"], opts, "cpu",
                          None, list(model.strides))  # fmt: skip
        out.append({v: r.views[v].features for v in ("orig", "hflip")})
    return out


def test_fit_by_hand_two_channels():
    """Points on the line y = x (plus a constant offset): one component keeps everything;
    with a perpendicular wobble of variance v, the kept variance is 2/(2 + v)."""
    x = torch.tensor([[-1.0, 1.0, -1.0, 1.0], [-1.0, 1.0, -1.0, 1.0]]) + 3.0  # (C=2, 4 positions)
    x[0] += torch.tensor([0.1, 0.1, -0.1, -0.1])
    x[1] -= torch.tensor([0.1, 0.1, -0.1, -0.1])
    acc = PcaAccumulator()
    acc.add({8: x.reshape(2, 2, 2)})
    bases, report = acc.fit(1)
    mu, w = split_basis(bases[8])
    torch.testing.assert_close(mu, torch.tensor([3.0, 3.0]))
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.0]]) / 2**0.5)  # sign: lead positive
    # eigenvalues: along (1,1)/√2 variance 2, along (1,-1)/√2 variance 0.02
    assert report["8"]["variance_kept"] == pytest.approx(2 / 2.02)
    energy = 2.02 + 18.0  # tr Σ + ‖μ‖²
    assert report["8"]["energy_kept"] == pytest.approx(1 - 0.02 / energy)
    z = project(x.reshape(2, 2, 2), mu, w)
    err = (reconstruct(z, mu, w) - x.reshape(2, 2, 2)).pow(2).sum() / 4
    assert float(err) == pytest.approx(0.02, rel=1e-5)
    stat = image_stat(x.reshape(2, 2, 2), z, mu, w)  # mean |z|, Σ‖x − x̂‖², Σ‖x‖²
    assert stat[0] == pytest.approx(2**0.5, rel=1e-5)  # |z| = √2 at every position
    assert stat[1] == pytest.approx(0.08, rel=1e-4)
    assert stat[2] == pytest.approx(float(x.pow(2).sum()), rel=1e-6)


def test_round_trip_error_is_the_discarded_energy(data, pca_store):
    """The store's basis is fitted on these very images (all 4 < FIT_IMAGES): the pooled
    squared error of the maps read back equals the discarded energy (+ float16 rounding), and
    the reader returns C-channel maps. Attention statistics are those of the full features."""
    store = TeacherStore.open(pca_store)
    assert store.meta.pca["components"] == K and store.meta.channels == 64
    assert zarr.open_group(str(pca_store), mode="r")["feat/orig/8"].shape[1] == K
    full = _teacher_features(data)
    for s in store.meta.strides:
        err = tot = 0.0
        for i in range(N_IMAGES):
            for v in ("orig", "hflip"):
                t = store.get(i, v)
                x = full[i][v][s]
                assert t["features"][s].shape == x.shape
                err += float((t["features"][s].double() - x.double()).pow(2).sum())
                tot += float(x.double().pow(2).sum())
                torch.testing.assert_close(t["att_channel"][s], x.abs().mean(dim=(1, 2)))
        kept = store.meta.pca["levels"][str(s)]["energy_kept"]
        if s == 8:  # many more positions than K: something is discarded (not vacuous)
            assert 1 - kept > 1e-3
        assert err / tot == pytest.approx(1 - kept, rel=0.02, abs=1e-6)
    info = store_info(pca_store)
    for e in info["pca"]["levels"].values():
        assert e["energy_kept_stored"] == pytest.approx(e["energy_kept_fit"], abs=1e-5)


def test_resume_is_exact_and_never_refits(data, pca_store, tmp_path):
    cache = tmp_path / "c"
    path = Path(precompute(*_files(data), _opts(cache, max_images=None))["path"])
    g = zarr.open_group(str(path), mode="r+")
    done = np.asarray(g["done"][:])
    done[1] = 0
    g["done"][:] = done
    g["feat/orig/16"][1] = 0
    basis = np.asarray(g["pca/8"][:]).copy()
    summary = precompute(*_files(data), _opts(cache))
    assert summary["written"] == 1
    ref = zarr.open_group(str(pca_store), mode="r")
    got = zarr.open_group(str(path), mode="r")
    np.testing.assert_array_equal(np.asarray(got["pca/8"][:]), basis)
    for name in ("feat/orig/16", "feat/hflip/8", "pca_stat/orig/16", "pca/16"):
        np.testing.assert_array_equal(np.asarray(got[name][:]), np.asarray(ref[name][:]))


def test_pca_mismatch_named_and_bad_k_refused(data, pca_store, tmp_path):
    cache = pca_store.parent.parent
    with pytest.raises(UserError, match="channel projection components"):
        precompute(*_files(data), _opts(cache, pca=None))
    with pytest.raises(UserError, match="channel projection components"):
        precompute(*_files(data), _opts(cache, pca=K + 1))
    with pytest.raises(UserError, match="1..63"):
        precompute(*_files(data), _opts(tmp_path, pca=64))


def test_old_store_without_pca_attributes_opens_unchanged(data, tmp_path):
    path = precompute(*_files(data), _opts(tmp_path, pca=None, max_images=2))["path"]
    g = zarr.open_group(path, mode="r+")
    attrs = dict(g.attrs)["dfmsd"]
    del attrs["pca"], attrs["pca_components"]  # exactly an older store's attributes
    g.attrs["dfmsd"] = attrs
    store = TeacherStore.open(path)
    assert store.meta.pca is None
    assert store.get(0, "orig")["features"][8].shape[0] == 64
    assert store_info(path)["pca"] is None
    assert precompute(*_files(data), _opts(tmp_path, pca=None, max_images=2))["written"] == 0
    assert verify_store(path).problems == []


@pytest.mark.parametrize("dtype", ["uint8", "bfloat16"])
def test_other_dtypes_store_components(data, tmp_path, dtype):
    path = precompute(*_files(data), _opts(tmp_path, dtype=dtype, max_images=2))["path"]
    assert verify_store(path).problems == []
    f = TeacherStore.open(path).get(0, "hflip")["features"][16]
    assert f.shape[0] == 64 and torch.isfinite(f).all()


def test_verify_and_repair_a_damaged_component_chunk(data, pca_store, tmp_path):
    from dfmsd_cli.store.repair import repair_store

    path = tmp_path / "cache" / "retina_tiny" / "train2017.zarr"
    shutil.copytree(pca_store, path)
    g = zarr.open_group(str(path), mode="r+")
    assert verify_store(path).problems == []
    z = np.asarray(g["feat/orig/8"][2])
    g["feat/orig/8"][2] = z * 2  # a valid chunk (crc fine) that disagrees with pca_stat
    report = verify_store(path)
    assert report.damaged == [2] and "disagree" in report.problems[0]
    repair_store(path, *_files(data), report.damaged, num_workers=0, device="cpu",
                 progress=False)  # fmt: skip
    assert verify_store(path).problems == []
    ref = zarr.open_group(str(pca_store), mode="r")
    want = np.asarray(ref["feat/orig/8"][2])
    np.testing.assert_array_equal(np.asarray(g["feat/orig/8"][2]), want)


def test_dry_run_counts_components_and_logits(data, tmp_path):
    """Raw bytes by hand from the images' sizes: per level and view, K (not C) float16 values
    and a float32 att_s per position; --store-logits adds A·K float16 logits per position."""
    from dfmsd_cli.store.projection import LOGITS_RATIO

    ann, img = _files(data)
    ds = CocoDetection(ann, img, geometry=GEOM, train=False)
    cells = 0
    for i in range(N_IMAGES):
        info = ds.image_info(i)
        w, h = GEOM.padded_size(info["width"], info["height"])
        cells += sum(-(-h // s) * -(-w // s) for s in (8, 16, 32, 64, 128))
    views = 2
    full = precompute(ann, img, _opts(tmp_path, pca=None), dry_run=True)
    pca = precompute(ann, img, _opts(tmp_path), dry_run=True)
    lg = precompute(ann, img, _opts(tmp_path, store_logits=True), dry_run=True)
    assert full["raw_bytes_per_image"] * N_IMAGES == views * cells * (64 * 2 + 4)
    assert pca["raw_bytes_per_image"] * N_IMAGES == views * cells * (K * 2 + 4)
    logit_raw = views * cells * 9 * ds.num_classes * 2  # retina_tiny: 9 anchors
    assert lg["raw_bytes_per_image"] * N_IMAGES == views * cells * (K * 2 + 4) + logit_raw
    assert lg["projected_logit_bytes"] == pytest.approx(logit_raw * LOGITS_RATIO)
    assert lg["projected_bytes"] == pytest.approx(pca["projected_bytes"] + logit_raw * LOGITS_RATIO)
    assert pca["projected_bytes"] < full["projected_bytes"]
    assert not (tmp_path / "retina_tiny").exists()


def test_cli_precompute_pca_and_cache_info_report_energy(data, tmp_path, capsys):
    from dfmsd_cli.cli import main

    argv = ["precompute", "--teacher", "retina_tiny", "--data", str(data), "--cache",
            str(tmp_path), "--img-scale", "128,96", "--num-workers", "0", "--device", "cpu",
            "--max-images", "2", "--pca", "4"]  # fmt: skip
    try:
        main(argv)
    except SystemExit as exc:
        assert not exc.code
    assert "energy kept, stride 8" in capsys.readouterr().err
    try:
        main(["cache", "info", str(tmp_path / "retina_tiny" / "train2017.zarr")])
    except SystemExit as exc:
        assert not exc.code
    err = capsys.readouterr().err
    assert "pca components" in err and "energy kept, stride 128" in err
    try:
        main([*argv, "--dry-run", "--store-logits", "--cache", str(tmp_path / "dry")])
    except SystemExit as exc:
        assert not exc.code
    assert "of which logits" in capsys.readouterr().err
    assert not (tmp_path / "dry").exists()


def test_repair_options_keep_every_recorded_encoding(data, tmp_path):
    """Repair re-runs precompute with the store's own options: --keepbits and --store-logits
    too (before, a logits store failed its fingerprint check and keepbits was dropped)."""
    from dfmsd_cli.store.repair import options_of_store

    kw = dict(pca=None, max_images=2, store_logits=True, keepbits=5)
    path = precompute(*_files(data), _opts(tmp_path, **kw))["path"]
    o = options_of_store(TeacherStore.open(path))
    assert (o.keepbits, o.store_logits, o.pca) == (5, True, None)
    assert precompute(*_files(data), o)["written"] == 0  # the fingerprints match

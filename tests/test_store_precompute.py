"""precompute end to end on generated data with tiny teachers: exactness, resume after SIGKILL,
shards, mismatch errors, the enhancement view, and ``cache verify``."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import small_synthetic, train_files

from dfmsd_cli.cli import main
from dfmsd_cli.data.coco import CocoDetection
from dfmsd_cli.data.enhance import EnhanceConfig, regenerate
from dfmsd_cli.data.geometry import Geometry
from dfmsd_cli.errors import UserError
from dfmsd_cli.models.checkpoint import load_teacher
from dfmsd_cli.store.inspect import store_info, verify_store
from dfmsd_cli.store.precompute import PrecomputeOptions, precompute
from dfmsd_cli.store.reader import TeacherStore
from dfmsd_cli.store.statistics import raw_statistics

GEOM = Geometry(img_scale=(128, 96))
N_IMAGES = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return small_synthetic(tmp_path_factory, N_IMAGES)


_files = train_files


def _opts(cache: Path, **kw) -> PrecomputeOptions:
    base = dict(
        teacher="retina_tiny",
        cache=str(cache),
        geometry=GEOM,
        views=["orig", "hflip"],
        block=2,
        batch_size=2,
        num_workers=0,
        device="cpu",
        progress=False,
    )
    base.update(kw)
    return PrecomputeOptions(**base)


@pytest.fixture(scope="module")
def baseline(data, tmp_path_factory) -> Path:
    """An uninterrupted, single-process run: the reference store."""
    cache = tmp_path_factory.mktemp("base")
    summary = precompute(*_files(data), _opts(cache))
    assert summary["written"] == N_IMAGES and summary["done"] == N_IMAGES
    return Path(summary["path"])


def _arrays(path: Path) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(a[:]) for name, a in g.arrays()} | {
        f"{gn}/{name}": np.asarray(a[:]) for gn, sub in g.groups() for name, a in _walk(sub)
    }


def _walk(group, prefix=""):
    for name, a in group.arrays():
        yield prefix + name, a
    for gn, sub in group.groups():
        yield from _walk(sub, prefix + gn + "/")


def assert_same_store(a: Path, b: Path) -> None:
    xa, xb = _arrays(a), _arrays(b)
    assert sorted(xa) == sorted(xb)
    for k in xa:
        assert np.array_equal(xa[k], xb[k]), f"array {k} differs"


def _run(data: Path, cache: Path, shard: tuple[int, int], delay: float, kw: dict) -> None:
    """Child-process body: a real, separate writer process (spawned: a forked child can inherit
    torch's intra-op thread pool in a broken state, "Invalid thread pool!");
    ``delay`` seconds after each batch keep it running long enough to be killed mid-way."""
    opts = _opts(cache, shard=shard, **kw)
    precompute(*_files(data), opts, on_batch=lambda: time.sleep(delay))


def _spawn(data: Path, cache: Path, shard=(0, 1), delay=0.0, **kw) -> mp.Process:
    p = mp.get_context("spawn").Process(target=_run, args=(data, cache, shard, delay, kw))
    p.start()
    return p


def test_features_are_the_teacher_on_each_image_alone(data, baseline):
    """Stored maps = the teacher run on the image alone at its own padded size (and flipped)."""
    store = TeacherStore.open(baseline)
    ds = CocoDetection(*_files(data), geometry=GEOM, train=False)
    assert store.meta.image_ids == ds.image_ids
    model = load_teacher("retina_tiny", ds.num_classes, None, seed=0)
    portrait = 0
    for i in range(N_IMAGES):
        s = ds.get(i, "orig")
        h, w = s["size"]
        H, W = math.ceil(h / 32) * 32, math.ceil(w / 32) * 32
        portrait += H > W
        x, xf = torch.zeros(2, 1, 3, H, W)
        x[0, :, :h, :w] = s["image"]
        xf[0, :, :h, :w] = s["image"].flip(-1)  # flip the image, then pad bottom/right
        for view, inp in (("orig", x), ("hflip", xf)):
            with torch.inference_mode():
                ref = model(inp, [(h, w)]).features
            t = store.get(i, view)
            for st in store.meta.strides:
                assert t["features"][st].shape == ref[st][0].shape
                torch.testing.assert_close(t["features"][st], ref[st][0], atol=2e-3, rtol=2e-3)
                sp, ch = raw_statistics(ref[st])  # of the full-precision map
                torch.testing.assert_close(t["att_spatial"][st], sp[0], atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(t["att_channel"][st], ch[0], atol=1e-4, rtol=1e-4)
    assert portrait > 0  # the transposed layout is exercised
    info = store_info(baseline)
    assert info["done"] == N_IMAGES and info["bytes_on_disk"] > 0


@pytest.mark.slow  # a spawned writer process, killed
def test_sigkill_then_resume_equals_uninterrupted(data, baseline, tmp_path):
    _kill_resume_and_compare(data, baseline, tmp_path)


# every other encoding: the resume mechanism is dtype-agnostic, this shows it (issue 18)
ENCODINGS = [
    {"dtype": "uint8"},
    {"dtype": "bfloat16", "keepbits": 3},
    {"dtype": "float32"},
    {"dtype": "float16", "keepbits": 5, "store_logits": True},
    {"dtype": "uint8", "pca": 8},
    {"dtype": "bfloat16", "codec": "pcodec"},
]


@pytest.mark.slow  # a baseline, a killed and a resumed precompute per encoding
@pytest.mark.parametrize("kw", ENCODINGS, ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
def test_sigkill_then_resume_equals_uninterrupted_for_every_encoding(data, tmp_path, kw):
    base = Path(precompute(*_files(data), _opts(tmp_path / "base", **kw))["path"])
    _kill_resume_and_compare(data, base, tmp_path / "run", **kw)
    assert verify_store(tmp_path / "run" / "retina_tiny" / "train2017.zarr").problems == []


def _kill_resume_and_compare(data: Path, baseline: Path, tmp_path: Path, **kw) -> None:
    p = _spawn(data, tmp_path, delay=0.3, **kw)
    store = tmp_path / "retina_tiny" / "train2017.zarr"
    deadline = time.time() + 300  # a wait limit, not a timing check: slow under load
    killed_at = None
    while time.time() < deadline and p.is_alive():
        if (store / "zarr.json").exists():
            done = np.asarray(zarr.open_group(str(store), mode="r")["done"][:])
            if 0 < (done == 1).sum() < N_IMAGES:
                os.kill(p.pid, signal.SIGKILL)  # no cleanup of any kind runs
                killed_at = int((done == 1).sum())
                break
        time.sleep(0.02)
    p.join()
    assert killed_at is not None and p.exitcode == -signal.SIGKILL
    done = np.asarray(zarr.open_group(str(store), mode="r")["done"][:])
    assert (done == 1).sum() < N_IMAGES
    summary = precompute(*_files(data), _opts(tmp_path, **kw))  # resume
    assert 0 < summary["written"] < N_IMAGES and summary["done"] == N_IMAGES
    assert_same_store(store, baseline)


@pytest.mark.slow  # two spawned writer processes
def test_two_shard_processes_equal_one(data, baseline, tmp_path):
    procs = [_spawn(data, tmp_path, shard=(k, 2)) for k in range(2)]
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    assert_same_store(tmp_path / "retina_tiny" / "train2017.zarr", baseline)


@pytest.mark.parametrize(
    "change,what",
    [
        ({"seed": 1}, "teacher weights"),
        ({"geometry": Geometry(img_scale=(160, 96))}, "geometry img_scale"),
        ({"max_images": 6}, "ordered image ids"),
        ({"views": ["orig"]}, "views"),
    ],
)
def test_precompute_into_mismatching_store_names_difference(data, baseline, change, what):
    cache = baseline.parent.parent
    with pytest.raises(UserError, match=what):
        precompute(*_files(data), _opts(cache, **change))


def test_enhancement_view_regenerates_bit_identical(data, baseline, tmp_path):
    cache = tmp_path / "c"
    shutil.copytree(baseline.parent, cache / "retina_tiny")
    weak = TeacherStore.open(cache / "retina_tiny" / "train2017.zarr")
    ratios = weak.area_ratios()
    theta = float(np.median(ratios)) + 1e-6 if ratios.max() > 0 else 1.0
    cfg = EnhanceConfig(theta=theta, p=1.0, seed=3)
    precompute(
        *_files(data),
        _opts(cache, teacher="frcnn_tiny", enhance_from="retina_tiny", views=["orig"], enhance=cfg),
    )
    store = TeacherStore.open(cache / "frcnn_tiny" / "train2017.zarr")
    assert store.meta.views == ("orig", "me") and store.meta.enhance["source"] == "retina_tiny"
    ds = CocoDetection(*_files(data), geometry=GEOM, train=False)
    ds.keep_raw = True
    model = load_teacher("frcnn_tiny", ds.num_classes, None, seed=0)
    kinds = set()
    for i in range(N_IMAGES):
        t = store.get(i, "me")
        kinds.add(t["enhance"]["kind"])
        raw = ds.get(i, "orig")["raw"]
        x = regenerate(raw, t["enhance"])  # raises on a checksum mismatch
        assert torch.equal(x, regenerate(raw, t["enhance"]))
        if i < 2:  # the stored ME features are the teacher on that input
            from dfmsd_cli.data.geometry import normalize, pad_batch

            with torch.inference_mode():
                ref = model(pad_batch([normalize(x, GEOM)], 32), [tuple(x.shape[-2:])]).features
            torch.testing.assert_close(t["features"][8], ref[8][0], atol=2e-3, rtol=2e-3)
    assert kinds == {"noise", "crop"} or ratios.max() == 0


def test_cache_verify_catches_corruption_and_missing_marker(baseline, tmp_path, capsys):
    path = tmp_path / "s.zarr"
    shutil.copytree(baseline, path)
    problems = verify_store(path).problems
    assert problems == []
    chunk = path / "feat" / "hflip" / "16" / "c.3.0.0.0"  # per-image arrays: flat keys
    chunk.write_bytes(b"\x00garbage" * 10)
    zarr.open_group(str(path), mode="r+")["done"][5] = 0
    with pytest.raises(SystemExit) as exc:
        main(["cache", "verify", str(path)])
    assert exc.value.code == 1
    cap = capsys.readouterr()
    out = " ".join((cap.out + cap.err).split())
    assert "image index 3" in out and "view hflip stride 16" in out
    assert "no completion marker" in out and "index 5" in out


def test_dry_run_projects_and_writes_nothing(data, tmp_path):
    r = precompute(*_files(data), _opts(tmp_path), dry_run=True)
    assert r["todo"] == N_IMAGES and r["projected_bytes"] > 0 and r["projected_seconds"] > 0
    assert not (tmp_path / "retina_tiny").exists()


def _main(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_cli_precompute_info_and_user_errors(data, tmp_path, capsys):
    common = ["--data", str(data), "--cache", str(tmp_path), "--img-scale", "128,96"]
    common += ["--max-images", "3", "--num-workers", "0", "--device", "cpu", "--block", "2"]
    assert _main(["precompute", "--teacher", "retina_tiny", *common, "--levels", "8,16"]) == 0
    path = tmp_path / "retina_tiny" / "train2017.zarr"
    assert (tmp_path / "retina_tiny" / "config.json").is_file()
    capsys.readouterr()
    assert _main(["cache", "info", str(path), "--json", "-"]) == 0
    info = json.loads(capsys.readouterr().out)  # the table went to stderr
    assert info["done"] == 3 and info["levels"] == [8, 16]
    assert _main(["precompute", "--teacher", "retina_tiny", *common, "--views", "orig,hflp"]) == 2
    assert "did you mean: hflip" in capsys.readouterr().err
    assert _main(["precompute", "--teacher", "retina_tiny", *common, "--levels", "4"]) == 2
    assert "not levels of retina_tiny" in capsys.readouterr().err
    assert _main(["precompute", "--teacher", "retina_tiny", *common, "--dtype", "uint8"]) == 2
    assert "dtype: store has float16, asked for uint8" in capsys.readouterr().err


def test_fsspec_url_store_equals_local(data, baseline):
    """An fsspec URL (the in-memory filesystem here; s3:// etc. where installed) works the same."""
    pytest.importorskip("fsspec")
    summary = precompute(*_files(data), _opts("memory://dfmsd-test/cache"))
    assert summary["path"] == "memory://dfmsd-test/cache/retina_tiny/train2017.zarr"
    assert_same_store(summary["path"], baseline)
    assert store_info(summary["path"])["done"] == N_IMAGES
    again = precompute(*_files(data), _opts("memory://dfmsd-test/cache"))  # resume: no work
    assert again["written"] == 0


def test_torchrun_ranks_compose_with_shards(monkeypatch):
    from dfmsd_cli.store.precompute import _rank_shard

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _rank_shard((0, 1)) == (1, 2)
    assert _rank_shard((1, 3)) == (3, 6)

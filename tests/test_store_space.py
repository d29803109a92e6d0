"""``precompute`` refuses a local store projected beyond its disk's free space, in one line
that names the least lossy smaller encoding that fits (store/space.py)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import _cli, train_files

from dfmsd_cli.data.coco import CocoDetection
from dfmsd_cli.data.geometry import Geometry
from dfmsd_cli.store import space
from dfmsd_cli.store.precompute import PrecomputeOptions
from dfmsd_cli.store.projection import projected_size

SCALE = (128, 96)
STRIDES, CHANNELS, VIEWS = [8, 16, 32, 64, 128], 64, ["orig"]  # retina_tiny


@pytest.fixture
def planned(synthetic_root):
    ds = CocoDetection(*train_files(synthetic_root), geometry=Geometry(img_scale=SCALE))
    o = PrecomputeOptions(teacher="retina_tiny", geometry=Geometry(img_scale=SCALE))
    return ds, o


def _bytes(ds, o, **enc) -> float:
    alt = dataclasses.replace(o, **enc)
    return projected_size(ds, alt, STRIDES, CHANNELS, VIEWS)["projected_bytes"]


def test_smaller_that_fits_is_the_least_lossy_that_fits(planned):
    ds, o = planned
    n = len(ds.image_ids)
    f16 = _bytes(ds, o)
    bf16 = _bytes(ds, o, dtype="bfloat16")
    kb3 = _bytes(ds, o, dtype="bfloat16", keepbits=3)
    assert kb3 < bf16 < f16
    args = (space.StorePlan(ds, o, STRIDES, CHANNELS, VIEWS),)
    # room for bfloat16: the first (least error) smaller encoding is named
    flags, need = space.smaller_that_fits(*args, n, bf16 * 1.01)
    assert flags == "--dtype bfloat16" and need == pytest.approx(bf16)
    # half the images left: half the bytes
    assert space.smaller_that_fits(*args, n // 2, bf16 * 0.51)[0] == "--dtype bfloat16"
    # room for bfloat16 keepbits 3 only (not uint8, not keepbits 5)
    got = space.smaller_that_fits(*args, n, kb3 * 1.001)
    assert got is not None and got[0].startswith("--dtype bfloat16 --keepbits 3")
    assert space.smaller_that_fits(*args, n, 1.0) is None  # nothing fits one byte
    zstd = space.StorePlan(ds, dataclasses.replace(o, codec="zstd"), STRIDES, CHANNELS, VIEWS)
    alts = space.smaller(zstd, n)
    assert alts and all(e["flags"].endswith("--codec blosc") for e in alts)


def test_check_space_passes_remote_and_roomy_stores(planned):
    ds, o = planned
    args = (space.StorePlan(ds, o, STRIDES, CHANNELS, VIEWS),)
    got = space.check_space(*args, "s3://bucket/cache/x.zarr", len(ds.image_ids))
    assert got["free_bytes"] is None and got["needed_bytes"] > 0
    assert space.check_space(*args, "cache/x.zarr", 0)["needed_bytes"] == 0


def _argv(root, cache, *more) -> list[str]:
    return ["precompute", "--teacher", "retina_tiny", "--data", str(root), "--cache",
            str(cache), "--img-scale", "128,96", "--num-workers", "0", "--device", "cpu",
            *more]  # fmt: skip


@pytest.mark.slow  # three precompute runs end to end
def test_precompute_refuses_a_store_beyond_its_disk(synthetic_root, planned, tmp_path,
                                                    monkeypatch, capsys):  # fmt: skip
    ds, o = planned
    kb3 = _bytes(ds, o, dtype="bfloat16", keepbits=3)
    monkeypatch.setattr(space, "free_bytes", lambda path: int(kb3 * 1.001))
    assert _cli(_argv(synthetic_root, tmp_path)) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    line = lines[0]
    assert "project to" in line and "(float16;" in line and "--no-space-check" in line
    assert "store less: --dtype bfloat16 --keepbits 3" in line and "--cache" in line
    assert not (tmp_path / "retina_tiny").exists()  # nothing written
    # the suggested encoding fits: it starts
    assert _cli(_argv(synthetic_root, tmp_path, "--dtype", "bfloat16", "--keepbits", "3")) == 0
    # and --no-space-check starts anyway
    more = ["--max-images", "4", "--no-space-check"]
    assert _cli(_argv(synthetic_root, tmp_path / "b", *more)) == 0


def test_dry_run_prints_the_free_space_and_smaller_encodings(synthetic_root, tmp_path, capsys):
    assert _cli(_argv(synthetic_root, tmp_path, "--dry-run", "--json", "-")) == 0
    out = capsys.readouterr()
    assert "free on its disk" in out.err and "smaller encodings" in out.err
    summary = json.loads(out.out)
    assert summary["free_bytes"] > 0
    flags = [e["flags"] for e in summary["smaller"]]
    assert flags[:2] == ["--dtype bfloat16", "--dtype uint8"]  # least error first
    errors = [e["relative_rmse"] for e in summary["smaller"]]
    assert errors == sorted(errors)
    assert all(e["bytes"] < summary["projected_bytes"] for e in summary["smaller"])
    assert not (tmp_path / "retina_tiny").exists()  # a dry run writes nothing


def test_space_watch_checks_once_after_the_first_block(monkeypatch):
    o = PrecomputeOptions(teacher="retina_tiny", block=4)
    monkeypatch.setattr(space, "free_bytes", lambda path: 1000)
    watch = space.SpaceWatch("cache/x.zarr", todo=10, o=o)
    watch.check(3, 3000)  # before a block: no check, even at 1000 B/image
    assert not watch.checked
    with pytest.raises(space.UserError) as exc:  # 4 images of 300 B: 6 left need 1.8 kB
        watch.check(4, 1200)
    msg = str(exc.value)
    assert "first 4 images took 300.0 B each (float16)" in msg and "6 left in this run" in msg
    assert "re-running resumes" in msg and "--no-space-check" in msg
    watch.check(5, 10**9)  # once only
    roomy = space.SpaceWatch("cache/y.zarr", todo=10, o=o)
    roomy.check(4, 400)  # 6 x 100 B fit in 1000 B
    assert roomy.checked
    space.SpaceWatch("s3://b/x.zarr", todo=10, o=o).check(4, 10**9)  # no free space to read


def test_a_store_whose_first_block_will_not_fit_stops_and_resumes(synthetic_root, tmp_path,
                                                                 monkeypatch, capsys):  # fmt: skip
    """The check before the run passes (plenty free); after the first block the disk is
    nearly full: one line, exit 2, the block's images kept, and the re-run resumes."""
    from dfmsd_cli.store.reader import TeacherStore
    from dfmsd_cli.store.schema import DONE_OK

    calls = []

    def free(path):
        calls.append(path)
        return 10**12 if len(calls) == 1 else 10

    monkeypatch.setattr(space, "free_bytes", free)
    argv = _argv(synthetic_root, tmp_path, "--block", "4", "--batch-size", "2")
    assert _cli(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "its first 4 images took" in lines[0] and "re-running resumes" in lines[0]
    path = tmp_path / "retina_tiny" / "train2017.zarr"
    done = TeacherStore.open(str(path)).done()
    assert 4 <= int((done == DONE_OK).sum()) < len(done)  # the first block is kept
    monkeypatch.setattr(space, "free_bytes", lambda path: 10**12)
    assert _cli(argv) == 0
    assert int((TeacherStore.open(str(path)).done() == DONE_OK).sum()) == len(done)

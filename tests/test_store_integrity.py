"""A damaged store never feeds training: crc32c on every chunk, missing chunks named, one line
from distill (exit 2), ``cache verify --repair`` recomputes exactly the damaged images, and
stores written before checksums still open."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import _cli

from dfmsd_cli.errors import UserError
from dfmsd_cli.store import schema
from dfmsd_cli.store.integrity import split_chunk_key
from dfmsd_cli.store.reader import TeacherStore

SCALE = ["--img-scale", "128,96"]
CPU = ["--num-workers", "0", "--device", "cpu"]


def _precompute(root: str, cache: Path) -> Path:
    argv = ["precompute", "--teacher", "retina_tiny", "--data", root, "--cache", str(cache),
            *SCALE, *CPU, "--batch-size", "2", "--block", "4"]  # fmt: skip
    assert _cli(argv) == 0
    return cache / "retina_tiny" / "train2017.zarr"


@pytest.fixture(scope="module")
def clean(synthetic_root, tiny_cache) -> tuple[str, Path]:
    return str(synthetic_root), tiny_cache


@pytest.fixture
def env(clean, tmp_path) -> dict:
    root, cache = clean
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    store = copy / "retina_tiny" / "train2017.zarr"
    return {"root": root, "cache": copy, "store": store, "tmp": tmp_path}


def _chunk(store: Path, array: str, index: int) -> Path:
    """The file of chunk ``index`` (first axis) of ``array``, whatever its key encoding."""
    a = zarr.open_array(str(store / array), mode="r")
    f = store / array / a.metadata.encode_chunk_key((index,) + (0,) * (a.ndim - 1))
    assert f.is_file(), f"no chunk of {array} for index {index}"
    return f


def _flip(path: Path) -> None:
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 0x10
    path.write_bytes(bytes(b))


def _distill(env: dict, capsys) -> tuple[int, str]:
    argv = [
        "distill",
        "--student",
        "retina_tiny",
        "--stages",
        "retina_tiny",
        "--method",
        "mgd",
        "--data",
        env["root"],
        "--cache",
        str(env["cache"]),
        "--out",
        str(env["tmp"] / "run"),
        *SCALE,
        *CPU,
        "--batch-size",
        "2",
        "--no-eval",
        "--epochs",
        "1",
        "--no-flip",
    ]
    code = _cli(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, "\n".join(ln for ln in err.splitlines() if ln.startswith("error:"))


def _image_id(store: Path, index: int) -> int:
    return int(zarr.open_group(str(store), mode="r")["image_ids"][index])


def test_split_chunk_key():
    assert split_chunk_key("feat/orig/8/c/3/0/0/0") == ("feat/orig/8", (3, 0, 0, 0))
    assert split_chunk_key("done/c/2") == ("done", (2,))
    assert split_chunk_key("feat/orig/8/c.3.0.0.0") == ("feat/orig/8", (3, 0, 0, 0))
    assert split_chunk_key("c.7") == ("", (7,))
    assert split_chunk_key("feat/orig/8/zarr.json") is None
    assert split_chunk_key("feat/orig/8/c.x.0") is None
    assert split_chunk_key("feat/orig/8/zarr.json") is None


def test_every_array_carries_crc32c(clean):
    _, cache = clean
    g = zarr.open_group(str(cache / "retina_tiny" / "train2017.zarr"), mode="r")
    arrays = [a for _, a in g.members(max_depth=None) if isinstance(a, zarr.Array)]
    assert len(arrays) > 10
    for a in arrays:
        codecs = [type(c).__name__ for c in a.compressors]
        assert codecs[-1] == "Crc32cCodec", (a.path, codecs)
    assert g.attrs[schema.ATTR_KEY]["schema_version"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["flip", "delete"])
def test_damaged_feature_chunk_stops_distill_with_one_line(env, fault, capsys):
    store, k = env["store"], 0  # index 5 has no object and is skipped by training
    path = _chunk(store, "feat/orig/16", k)
    _flip(path) if fault == "flip" else path.unlink()
    code, err = _distill(env, capsys)
    assert code == 2, err
    assert str(store) in err and f"image {_image_id(store, k)} " in err, err
    assert "view orig stride 16" in err and "cache verify" in err and "--repair" in err, err
    assert ("crc32c" in err) if fault == "flip" else ("missing" in err)
    assert not (env["tmp"] / "run" / "student.pth").exists()


def test_damaged_small_chunk_is_named(env):
    store = env["store"]
    _chunk(store, "det/orig/boxes", 1).unlink()  # block 1 = images 4..7
    t = TeacherStore.open(store)
    t.get(0, "orig")  # another block: fine
    with pytest.raises(
        UserError, match=r"missing at image \d+ \(index 5\) view orig \(detections\)"
    ):
        t.get(5, "orig")
    _chunk(store, "valid/8", 0).unlink()
    with pytest.raises(UserError, match="missing at the per-image arrays.*--repair"):
        TeacherStore.open(store).get(0, "orig")


@pytest.mark.slow
def test_verify_repair_recomputes_exactly_the_damaged_images(env, clean, capsys):
    store = env["store"]
    _flip(_chunk(store, "feat/orig/8", 2))
    _chunk(store, "att_s/orig/32", 9).unlink()
    code = _cli(["cache", "verify", str(store)])
    cap = capsys.readouterr()
    out = cap.out + cap.err
    assert code == 1 and "2 problem(s)" in out, out
    code = _cli(["cache", "verify", str(store), "--repair"])
    assert code == 2  # --repair needs --data
    code = _cli(["cache", "verify", str(store), "--repair", "--data", env["root"], *CPU])
    cap = capsys.readouterr()
    out = cap.out + cap.err
    assert code == 0 and "recomputing 2 damaged image(s)" in out and "OK" in out, out
    ref = zarr.open_group(str(clean[1] / "retina_tiny" / "train2017.zarr"), mode="r")
    got = zarr.open_group(str(store), mode="r")
    for name in ("feat/orig/8", "att_s/orig/32", "done", "det/orig/boxes"):
        assert np.array_equal(np.asarray(ref[name][:]), np.asarray(got[name][:])), name


def test_store_written_before_checksums_still_opens(synthetic_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(schema, "SCHEMA_VERSION", 1)
    store = _precompute(str(synthetic_root), tmp_path / "cache")
    monkeypatch.undo()
    a = zarr.open_group(str(store), mode="r")["feat/orig/8"]
    assert "Crc32cCodec" not in [type(c).__name__ for c in a.compressors]
    t = TeacherStore.open(store)
    assert not t.checksummed and t.get(3, "orig")["features"][8].numel() > 0
    code = _cli(["cache", "verify", str(store)])
    cap = capsys.readouterr()
    out = cap.out + cap.err
    assert code == 0 and "unchecksummed" in out, out


@pytest.mark.parametrize(
    "dtype,codec", [("float16", "blosc"), ("uint8", "zstd"), ("float32", "blosc")]
)
def test_fast_row_path_equals_zarr(synthetic_root, tmp_path, monkeypatch, dtype, codec):
    """store/chunks.py decodes exactly what zarr's getitem returns, for every array and view."""
    from dfmsd_cli.store import chunks

    code = _cli(["precompute", "--teacher", "retina_tiny", "--data", str(synthetic_root),
                    "--cache", str(tmp_path), *SCALE, *CPU, "--block", "4", "--dtype", dtype,
                    "--codec", codec, "--views", "orig,hflip"])  # fmt: skip
    assert code == 0
    path = tmp_path / "retina_tiny" / "train2017.zarr"
    fast = TeacherStore.open(path)
    assert all(fast._row_codec(n) is not None for n in ("feat/orig/8", "det/hflip/boxes"))
    with monkeypatch.context() as m:
        m.setattr(chunks.RowCodec, "of", classmethod(lambda cls, a: None))
        slow = TeacherStore.open(path)
        ref = [slow.get(i, v) for i in range(len(slow)) for v in ("orig", "hflip")]
    got = [fast.get(i, v) for i in range(len(fast)) for v in ("orig", "hflip")]
    transposed = 0
    for a, b in zip(ref, got, strict=True):
        for key in ("features", "att_spatial", "att_channel"):
            for s in a[key]:
                assert torch.equal(a[key][s], b[key][s]), (key, s)
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(a[key], b[key])
        assert a["area_ratio"] == b["area_ratio"] and a["valid"] == b["valid"]
        transposed += a["pad_size"][0] > a["pad_size"][1]
    assert transposed > 0  # portrait images (stored transposed) are covered


def test_local_reads_skip_zarrs_per_key_thread_hop(env, monkeypatch):
    """A local store's chunk files are read in the caller's thread (store/chunks.py): after
    the arrays are open, a sample's read never calls zarr's LocalStore.get (a worker-thread hop
    per key, which cost 2-3x the decoding on demo-sized samples)."""
    from zarr.storage import LocalStore

    from dfmsd_cli.store.chunks import _local_store
    from dfmsd_cli.store.integrity import ChunkGuard

    t = TeacherStore.open(env["store"])
    want = t.get(1, "orig")
    boxes = _chunk(env["store"], "det/orig/boxes", 0)
    local = LocalStore(str(env["store"]))
    assert _local_store(ChunkGuard(local)) is local  # the wrapper is seen through

    async def no_get(self, *a, **k):
        raise AssertionError("LocalStore.get called on the fast path")

    monkeypatch.setattr(LocalStore, "get", no_get)
    got = t.get(1, "orig")
    for s, f in want["features"].items():
        assert torch.equal(got["features"][s], f)
    boxes.unlink()  # a missing chunk is still named
    with pytest.raises(UserError, match="missing"):
        t.get(1, "orig")


@pytest.mark.slow  # a resumed precompute end to end
def test_torn_chunk_of_a_pending_image_is_replaced(env, clean, monkeypatch):
    """A new chunk is written in place (store/chunks.py ``_write_chunk``): a write killed
    half-way leaves a torn file of an image whose marker is not set. Resuming replaces it
    (through a temporary file and a rename) and the store equals an uninterrupted one."""
    from dfmsd_cli.store import chunks
    from dfmsd_cli.store.repair import reset_markers

    store = env["store"]
    torn = _chunk(store, "feat/orig/8", 5)
    other = _chunk(store, "att_s/orig/16", 5)
    t = TeacherStore.open(store)
    reset_markers(t, [5])  # as if image 5 was in flight when the process died
    torn.write_bytes(torn.read_bytes()[:7])  # torn mid-write
    other.unlink()  # never reached
    renamed: list[Path] = []
    real = chunks._write_atomic

    def atomic(path, data, guard=None):
        renamed.append(Path(path))
        return real(path, data, guard)

    monkeypatch.setattr(chunks, "_write_atomic", atomic)
    _precompute(env["root"], env["cache"])
    assert torn in renamed and other not in renamed  # existing: replaced; new: in place
    assert _chunk(store, "done", 5 // 4) in renamed  # block chunks (read on resume): always atomic
    assert not list(torn.parent.glob(".*partial"))
    ref = zarr.open_group(str(clean[1] / "retina_tiny" / "train2017.zarr"), mode="r")
    got = zarr.open_group(str(store), mode="r")
    for name in ("feat/orig/8", "att_s/orig/16", "done"):
        assert np.array_equal(np.asarray(ref[name][:]), np.asarray(got[name][:])), name


@pytest.mark.slow  # two precompute runs end to end
def test_store_in_blosc_own_blocks_reads_the_same(synthetic_root, tmp_path, monkeypatch):
    """Stores written before BLOSC_BLOCKSIZE (Blosc's own block size, 0 in the metadata) read
    exactly as new ones: same decoded features through the fast path."""
    from dfmsd_cli.store import create

    new = _precompute(str(synthetic_root), tmp_path / "new")
    monkeypatch.setattr(create, "BLOSC_BLOCKSIZE", 0)
    old = _precompute(str(synthetic_root), tmp_path / "old")
    monkeypatch.undo()
    sizes = [zarr.open_array(str(p / "feat/orig/8"), mode="r").compressors[0].blocksize
             for p in (new, old)]  # fmt: skip
    assert sizes == [create.BLOSC_BLOCKSIZE, 0]
    a, b = TeacherStore.open(new), TeacherStore.open(old)
    for i in range(len(a)):
        x, y = a.get(i, "orig"), b.get(i, "orig")
        for s in x["features"]:
            assert torch.equal(x["features"][s], y["features"][s])
            assert torch.equal(x["att_spatial"][s], y["att_spatial"][s])

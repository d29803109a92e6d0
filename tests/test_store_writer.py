"""The writer writes each small block chunk once per block (no read-modify-write per image),
keeps the rows an earlier run wrote into a partially filled block, and writes the markers last."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
import zarr
from test_store_layer import result, spec
from zarr.storage import LocalStore, WrapperStore

from dfmsd_cli.store.reader import TeacherStore
from dfmsd_cli.store.writer import StoreWriter, create_or_open


class _Counting(WrapperStore):
    """Counts writes per key and remembers their order."""

    def __init__(self, store, log=None):
        super().__init__(store)
        self.log = [] if log is None else log

    def _with_store(self, store):
        return type(self)(store, self.log)

    async def set(self, key, value):
        self.log.append(key)
        return await self._store.set(key, value)


def _writer(path, log=None) -> tuple[StoreWriter, _Counting]:
    store = _Counting(LocalStore(str(path)), log)
    return StoreWriter(zarr.open_group(store=store, mode="r+")), store


def test_each_block_chunk_is_written_once(tmp_path):
    path = tmp_path / "s.zarr"
    create_or_open(path, spec(), fix="x")  # 4 images, block 2
    w, store = _writer(path)
    w.expect(range(4))
    for i in range(4):
        w.finish(result(i), w.write_chunks(result(i)))
    counts = Counter(store.log)
    g = zarr.open_group(str(path), mode="r")
    for name in ("done", "pad_size", "det/orig/boxes", "att_c/hflip/16", "area_ratio/orig"):
        meta = g[name].metadata
        for b in (0, 1):
            key = f"{name}/" + meta.encode_chunk_key((b,) + (0,) * (len(meta.shape) - 1))
            assert counts[key] == 1, (key, counts[key])
    # the markers of a block come after its rows
    first_done = store.log.index("done/c/0")
    assert all(store.log.index(k) < first_done for k in store.log if k.startswith("pad_size/c/0"))
    t = TeacherStore.open(path)
    assert (t.done() == 1).all()
    assert torch.equal(
        t.get(1, "orig")["boxes"][:2],
        result(1)
        .views["orig"]
        .boxes.float()[torch.argsort(result(1).views["orig"].scores, descending=True, stable=True)][
            :2
        ],
    )


def test_partial_block_keeps_rows_of_an_earlier_run(tmp_path):
    path = tmp_path / "s.zarr"
    create_or_open(path, spec(), fix="x")
    first, _ = _writer(path)
    first.write(result(0))  # a run that stopped after one image of block 0
    ref = {k: v.clone() for k, v in TeacherStore.open(path).get(0, "orig")["features"].items()}
    w, _ = _writer(path)
    w.expect([1, 2, 3])
    for i in (1, 2, 3):
        w.finish(result(i), w.write_chunks(result(i)))
    t = TeacherStore.open(path)
    assert list(t.done()) == [1, 1, 1, 1]
    got = t.get(0, "orig")
    assert all(torch.equal(ref[s], got["features"][s]) for s in ref)
    assert got["size"] == result(0).size and t.get(1, "orig")["size"] == result(1).size


def test_buffered_images_stay_pending_until_flushed(tmp_path):
    """A process killed before its block is written leaves those images pending, not torn."""
    path = tmp_path / "s.zarr"
    create_or_open(path, spec(), fix="x")
    w, _ = _writer(path)
    w.expect(range(4))
    w.finish(result(2), w.write_chunks(result(2)))  # block 1 still expects image 3
    assert list(np.asarray(TeacherStore.open(path).done())) == [0, 0, 0, 0]
    w.flush()
    assert list(np.asarray(TeacherStore.open(path).done())) == [0, 0, 1, 0]


def test_bfloat16_and_keepbits_by_hand():
    from dfmsd_cli.store.quantize import from_bfloat16, to_bfloat16, to_float16

    # bfloat16 keeps float32's range: 1e6 survives (float16 would overflow), 8 significant bits
    x = torch.tensor([1.0, -3.0, 1e6, 1.0 + 2**-9, 1.0 + 3 * 2**-9])
    y = from_bfloat16(to_bfloat16(x))
    assert y[:3].tolist() == [1.0, -3.0, 999424.0]  # 1e6 = 0x4974_2400 -> 0x4974 (nearest)
    assert y[3] == 1.0 and y[4] == 1.0 + 2**-7  # ties to even, then round up
    # keepbits: k mantissa bits, round to nearest (numcodecs BitRound)
    x = torch.tensor([1.0, 1.1875, 1.3, 1.5, -1.8])
    assert to_float16(x, keepbits=2).astype("float32").tolist() == [1.0, 1.25, 1.25, 1.5, -1.75]
    assert from_bfloat16(to_bfloat16(x, keepbits=2)).tolist() == [1.0, 1.25, 1.25, 1.5, -1.75]


def test_bfloat16_store_round_trip(tmp_path):
    path = tmp_path / "b.zarr"
    w = StoreWriter(create_or_open(path, spec(dtype="bfloat16", keepbits=5), fix="x"))
    big = result(1, scale=1e5)  # beyond float16's range
    w.write(big)
    t = TeacherStore.open(path)
    assert t.meta.attrs["quantization"] == {
        "kind": "bfloat16", "note": "upper 16 bits of float32, stored as uint16", "keepbits": 5
    }  # fmt: skip
    got = t.get(1, "orig")["features"]
    for s, f in big.views["orig"].features.items():
        rel = (got[s] - f).abs() / f.abs().clamp(min=1e-30)
        assert float(rel.max()) <= 2**-6 + 1e-6  # 5 kept bits: half a unit in the 5th place


def test_float32_store_is_lossless_and_keepbits_rounds_it(tmp_path):
    """--dtype float32 stores the teacher's values exactly (and float16's overflow is no limit);
    with --keepbits k BitRound keeps k of float32's 23 mantissa bits; cache verify passes."""
    from dfmsd_cli.store.inspect import verify_store
    from dfmsd_cli.store.quantize import to_float32

    x = torch.tensor([1.0, 1.1875, 1.3, 1.5, -1.8])
    assert to_float32(x, keepbits=2).tolist() == [1.0, 1.25, 1.25, 1.5, -1.75]
    assert to_float32(x).tolist() == x.tolist()
    path = tmp_path / "f.zarr"
    w = StoreWriter(create_or_open(path, spec(dtype="float32"), fix="x"))
    big = result(1, scale=1e5)  # beyond float16's range
    w.write(big)
    t = TeacherStore.open(path)
    assert t.meta.attrs["quantization"]["kind"] == "float32"
    got = t.get(1, "orig")["features"]
    for s, f in big.views["orig"].features.items():
        assert torch.equal(got[s], f)
    for i in (0, 2, 3):
        w.write(result(i))
    assert verify_store(path).problems == []


def test_for_student_keeps_the_shared_levels(synthetic_root, tmp_path):
    from dfmsd_cli.data.geometry import Geometry
    from dfmsd_cli.store.precompute import PrecomputeOptions, precompute

    root = synthetic_root
    o = PrecomputeOptions(
        teacher="cmr_tiny", for_student="retina_tiny", cache=str(tmp_path), device="cpu",
        num_workers=0, max_images=2, geometry=Geometry(img_scale=(128, 96)), progress=False,
    )  # fmt: skip
    path = precompute(root / "annotations/instances_train2017.json", root / "train2017", o)["path"]
    assert TeacherStore.open(path).meta.strides == (8, 16, 32, 64)  # no stride-4 map


def test_unused_levels_note_names_the_share_and_the_fix():
    """A stride-4 teacher level, which no single-stage student reads, is noted with its share of
    the feature values (by hand at 64x64: 16*16 of 16*16+8*8+4*4+2*2+1*1 = 256/341)."""
    from dfmsd_cli.store.precompute import unused_levels_note

    note = unused_levels_note("cmr_tiny", [4, 8, 16, 32, 64], (64, 64))
    assert "stride 4 is 75%" in note and "--for-student" in note
    assert unused_levels_note("gfl_tiny", [8, 16, 32, 64, 128], (64, 64)) is None


def test_flat_chunk_keys_written_directly_and_old_nested_stores_still_work(tmp_path, monkeypatch):
    """A new store's per-image chunk is one file ``c.I.0.0.0`` in its array's folder (no folder
    per image), written straight to the local disk with no temporary file left behind; a store
    created with zarr's nested keys (before ``create.FLAT_KEYS``) is still written — its folders
    are made — and reads back exactly the same."""
    from dfmsd_cli.store import create

    new, old = tmp_path / "new.zarr", tmp_path / "old.zarr"
    create_or_open(new, spec(), fix="x")
    monkeypatch.setattr(create, "FLAT_KEYS", None)
    create_or_open(old, spec(), fix="x")
    monkeypatch.undo()
    for path in (new, old):
        w = StoreWriter(zarr.open_group(str(path), mode="r+"))
        w.expect(range(4))
        for i in range(4):
            w.finish(result(i), w.write_chunks(result(i)))
    s = min(spec().strides)
    assert (new / f"feat/orig/{s}/c.2.0.0.0").is_file()
    assert not (new / f"feat/orig/{s}/c").exists()
    assert (old / f"feat/orig/{s}/c/2/0/0/0").is_file()
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".partial")]
    a, b = TeacherStore.open(new), TeacherStore.open(old)
    assert list(a.done()) == list(b.done()) == [1, 1, 1, 1]
    for i in range(4):
        for v in ("orig", "hflip"):
            x, y = a.get(i, v), b.get(i, v)
            for key in ("features", "att_spatial"):
                assert all(torch.equal(x[key][k], y[key][k]) for k in x[key])


def test_pcodec_store_holds_the_same_values_as_blosc_and_zarr_reads_it(tmp_path):
    """--codec pcodec is lossless for its dtype: the fast path and zarr's own reads give the
    blosc store's values bit for bit; its chunks carry crc32c (a flipped byte is named)."""
    from dfmsd_cli.store.inspect import verify_store

    paths = {c: tmp_path / f"{c}.zarr" for c in ("blosc", "pcodec")}
    for codec, path in paths.items():
        w = StoreWriter(create_or_open(path, spec(codec=codec, dtype="bfloat16"), fix="x"))
        for i in range(4):
            w.write(result(i))
    a, b = (zarr.open_group(str(p), mode="r") for p in paths.values())
    names = [f"feat/{v}/{s}" for v in ("orig", "hflip") for s in (8, 16)] + ["att_s/orig/8"]
    for name in names:
        assert [type(c).__name__ for c in b[name].metadata.codecs] == ["PCodec", "Crc32cCodec"]
        np.testing.assert_array_equal(np.asarray(b[name][:]), np.asarray(a[name][:]))
    ta, tb = TeacherStore.open(paths["blosc"]), TeacherStore.open(paths["pcodec"])
    for i in range(4):
        for s, f in ta.get(i, "hflip")["features"].items():
            assert torch.equal(tb.get(i, "hflip")["features"][s], f)
    assert verify_store(paths["pcodec"]).problems == []
    from dfmsd_cli.store.inspect import store_info

    assert store_info(paths["pcodec"])["codec"] == "pcodec"
    assert store_info(paths["blosc"])["dtype"] == "bfloat16"
    chunk = next((paths["pcodec"] / "feat" / "orig" / "8").glob("c.1.*"))
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    assert any("feat/orig/8" in p for p in verify_store(paths["pcodec"]).problems)


def test_pcodec_refuses_uint8_and_names_a_missing_package(tmp_path, monkeypatch):
    import sys

    import pytest

    from dfmsd_cli.errors import UserError

    with pytest.raises(UserError, match="--codec pcodec does not take --dtype uint8"):
        create_or_open(tmp_path / "u.zarr", spec(codec="pcodec", dtype="uint8"), fix="x")
    monkeypatch.setitem(sys.modules, "pcodec", None)  # as if not installed
    with pytest.raises(UserError, match=r"pip install 'dfmsd\[pcodec\]'"):
        create_or_open(tmp_path / "p.zarr", spec(codec="pcodec"), fix="x")

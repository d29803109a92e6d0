"""The object-storage read path without a server: ``get_many`` (a batch in one round trip),
the bounded concurrency and the ``cache_local`` read-through copy, on fsspec's in-memory
filesystem (a URL store like s3://); and the one-line errors of ``store/remote.py``."""

from __future__ import annotations

import uuid

import pytest
import torch

from dfmsd_cli.errors import UserError
from dfmsd_cli.store import remote
from dfmsd_cli.store.dataset import StoreDataset
from dfmsd_cli.store.reader import TeacherStore

fsspec = pytest.importorskip("fsspec")


@pytest.fixture
def mem_store(tiny_cache):
    """The session's tiny local store copied to ``memory://``: (url, local path)."""
    local = tiny_cache / "retina_tiny" / "train2017.zarr"
    url = f"memory://dfmsd-{uuid.uuid4().hex[:8]}/train2017.zarr"
    fsspec.filesystem("memory").put(str(local), url[len("memory://") :], recursive=True)
    yield url, local
    fsspec.filesystem("memory").rm(url[len("memory://") :], recursive=True)


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            _same(a[k], b[k])
        elif isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_get_many_equals_get_on_local_and_url_stores(mem_store):
    url, local = mem_store
    ref = TeacherStore.open(local)
    items = [(int(i), "orig") for i in ref.complete_indices()]
    for store in (ref, TeacherStore.open(url, concurrency=3)):
        many = store.get_many(items)
        assert len(many) == len(items)
        for (i, v), got in zip(items, many, strict=True):
            _same(got, ref.get(i, v))
    ds = StoreDataset(TeacherStore.open(url))
    for got, k in zip(ds.__getitems__([0, 2, 1]), [0, 2, 1], strict=True):
        _same(got, ds[k])


def test_cache_local_keeps_final_chunks_and_heals_a_damaged_copy(mem_store, tmp_path):
    url, local = mem_store
    ref = TeacherStore.open(local)
    store = TeacherStore.open(url, cache_local=tmp_path / "lc")
    first = store.get(0, "orig")
    files = [p for p in (tmp_path / "lc").rglob("*") if p.is_file()]
    assert files, "nothing was copied to the local cache"
    # the second read comes from the copies: remove the remote chunks of image 0's features
    mem = fsspec.filesystem("memory")
    feat = [f for f in mem.find(url[len("memory://") :]) if "/feat/orig/" in f and "/c.0." in f]
    assert feat
    for f in feat:
        mem.rm(f)
    _same(TeacherStore.open(url, cache_local=tmp_path / "lc").get(0, "orig"), first)
    _same(first, ref.get(0, "orig"))
    # a damaged local copy fails its crc32c: dropped and read again from the store
    victim = next(p for p in files if "/att_s/orig/" in str(p) and "/c.0." in str(p))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    _same(TeacherStore.open(url, cache_local=tmp_path / "lc").get(0, "orig"), first)
    assert victim.read_bytes() != bytes(data)  # replaced by the good copy


def test_local_store_ignores_cache_local_and_concurrency(tiny_cache, tmp_path):
    local = tiny_cache / "retina_tiny" / "train2017.zarr"
    store = TeacherStore.open(local, concurrency=2, cache_local=tmp_path / "lc")
    assert store.concurrency is None and store.cache_local is None
    store.get(0, "orig")
    assert not (tmp_path / "lc").exists()


def test_concurrency_setting_is_checked(monkeypatch):
    monkeypatch.setenv("DFMSD_STORE_CONCURRENCY", "0")
    with pytest.raises(UserError, match="DFMSD_STORE_CONCURRENCY"):
        remote.concurrency_default()
    monkeypatch.setenv("DFMSD_STORE_CONCURRENCY", "8")
    assert remote.concurrency_default() == 8
    assert remote.storage_options("s3://b/x")["config_kwargs"]["max_pool_connections"] == 8


def test_explain_names_each_kind():
    class EndpointConnectionError(Exception):
        pass

    url = "s3://bkt/cache/t/train2017.zarr"
    assert "cannot reach" in str(remote.explain(url, EndpointConnectionError("no route")))
    assert "refused" in str(remote.explain(url, PermissionError("InvalidAccessKeyId")))
    assert "bucket 'bkt' does not exist" in str(remote.explain(url, OSError("NoSuchBucket")))
    assert remote.explain(url, ValueError("something else")) is None
    with pytest.raises(UserError, match="unknown storage protocol|needs the package"):
        remote.filesystem_class("nosuchproto://x/y")

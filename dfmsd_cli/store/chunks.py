"""The store's read fast path: fetch a sample's chunks in one round trip, decode them directly.

Every array the store writes is chunked along the image axis only (one image per chunk for the
maps, ``block`` images per chunk for the small arrays), and its codec chain is one of
``bytes → zstd|blosc [→ crc32c]``. For such an array a row ``i`` is chunk ``(i // c0, 0, …)``,
so a sample's ~40 reads are ~40 chunk keys. :func:`fetch_rows` asks the zarr store for all of
them in ONE event-loop call (``asyncio.gather`` over ``Store.get``; concurrent on object
storage) and decodes each in the caller's thread with numcodecs — the same codecs zarr uses,
without zarr's per-array indexing and per-chunk thread hops, which cost more than the decoding
itself (``dfmsd bench store``: ``read_one_sample``).

The crc32c of each chunk is checked here exactly as zarr's ``Crc32cCodec`` does (little-endian
uint32 of CRC-32C over the encoded bytes, appended). An array whose layout or codecs are not of
this form (a future codec, a hand-made store) is read through zarr's own ``getitem``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
import numcodecs
import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync as zarr_sync

from dfmsd_cli.errors import UserError


class ChecksumMismatch(ValueError):
    """Stored and computed checksum do not match (the text zarr's own codec uses)."""


@dataclass(frozen=True)
class RowCodec:
    """How to turn one chunk's bytes of a row-chunked array back into its rows."""

    path: str  # the array's path inside the group
    dtype: np.dtype
    chunk: tuple[int, ...]
    compressor: Any  # a numcodecs codec
    crc: bool
    encode_key: Any  # chunk coords -> key relative to the array

    @classmethod
    def of(cls, array: zarr.Array) -> RowCodec | None:
        """The fast path for ``array``, or None when zarr must read it."""
        meta = array.metadata
        if getattr(meta, "zarr_format", 3) != 3 or tuple(array.chunks[1:]) != array.shape[1:]:
            return None
        names = [type(c).__name__ for c in meta.codecs]
        if names and names[0] == "PCodec":  # pcodec serializes the array: no bytes codec
            if names[1:] not in ([], ["Crc32cCodec"]):
                return None
            return cls(
                path=array.path,
                dtype=np.dtype(array.dtype),
                chunk=tuple(array.chunks),
                compressor=numcodecs.get_codec(pcodec_config(meta.codecs[0])),
                crc=len(names) == 2,
                encode_key=meta.encode_chunk_key,
            )
        if len(names) not in (2, 3) or names[0] != "BytesCodec":
            return None
        if len(names) == 3 and names[2] != "Crc32cCodec":
            return None
        endian = getattr(meta.codecs[0], "endian", None)
        order = "<" if endian is None or getattr(endian, "value", endian) == "little" else ">"
        comp = meta.codecs[1]
        if names[1] == "ZstdCodec":
            compressor = numcodecs.Zstd(level=comp.level, checksum=comp.checksum)
        elif names[1] == "BloscCodec":
            shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[_name(comp.shuffle)]
            compressor = numcodecs.Blosc(
                cname=_name(comp.cname), clevel=comp.clevel, shuffle=shuffle,
                blocksize=comp.blocksize,
            )  # fmt: skip
        else:
            return None
        return cls(
            path=array.path,
            dtype=np.dtype(array.dtype).newbyteorder(order),
            chunk=tuple(array.chunks),
            compressor=compressor,
            crc=len(names) == 3,
            encode_key=meta.encode_chunk_key,
        )

    def key(self, row: int) -> str:
        coords = (row // self.chunk[0],) + (0,) * (len(self.chunk) - 1)
        return f"{self.path}/{self.encode_key(coords)}" if self.path else self.encode_key(coords)

    def encode_chunk(self, x: np.ndarray) -> bytes:
        """Bytes of one whole chunk ``x`` (shape ``chunk``), as zarr's codec chain writes them."""
        if tuple(x.shape) != self.chunk:
            raise ValueError(f"chunk of shape {tuple(x.shape)}, expected {self.chunk}")
        data = bytes(self.compressor.encode(np.ascontiguousarray(x, dtype=self.dtype)))
        if self.crc:
            data += np.uint32(google_crc32c.value(data)).astype("<u4").tobytes()
        return data

    def decode_row(self, data: bytes, row: int) -> np.ndarray:
        if self.crc:
            want = int.from_bytes(data[-4:], "little")
            data = data[:-4]
            if google_crc32c.value(data) != want:
                raise ChecksumMismatch("Stored and computed checksum do not match")
        x = np.empty(self.chunk, dtype=self.dtype)  # decoded in place: writable, no copy
        self.compressor.decode(data, out=x)
        return x[row % self.chunk[0]].astype(self.dtype.newbyteorder("="), copy=False)


def _name(x: Any) -> str:
    return str(getattr(x, "value", x))


def pcodec_available() -> bool:
    """Whether the optional ``pcodec`` package (``--codec pcodec``) is installed."""
    try:
        import pcodec  # noqa: F401  numcodecs' wrapper imports it only when it encodes
    except ImportError:
        return False
    return True


def require_pcodec(what: str) -> None:
    """A one-line UserError naming the fix when ``pcodec`` is missing; ``what`` needs it."""
    if not pcodec_available():
        raise UserError(f"{what} needs the pcodec package: pip install 'dfmsd[pcodec]'")


def pcodec_config(codec: Any) -> dict:
    """numcodecs config of zarr's PCodec wrapper (``{"id": "pcodec", "level": 8, ...}``): the
    same codec zarr calls, so the bytes are the same either way."""
    require_pcodec("reading this --codec pcodec store")
    cfg = dict(codec.to_dict().get("configuration") or {})
    cfg.pop("id", None)
    return {"id": "pcodec", **cfg}


def put_chunks(
    store: Any, chunks: list[tuple[RowCodec, int, np.ndarray]], *, pending_only: bool = False
) -> int:
    """Write whole chunks ``(codec, row, data)`` (the chunk holding ``row``) in one round trip;
    returns the bytes written.

    Each chunk is a separate key: one PUT on object storage; locally a temporary file + rename,
    so concurrent writers of other chunks are safe and no reader sees a torn chunk. With
    ``pending_only`` (every chunk belongs to images whose completion marker is not set: the
    per-image chunks) a NEW local file is written in place (:func:`_write_chunk`).
    """
    local = _local_store(store)
    if local is not None and not local.read_only:  # write the files here: no thread hops
        root = Path(local.root)
        guard = getattr(local, "guard", None)  # store.guard.GuardedLocalStore: never re-create
        write = _write_chunk if pending_only else _write_atomic
        nbytes = 0
        for c, row, x in chunks:
            data = c.encode_chunk(x)
            write(root / c.key(row), data, guard)
            nbytes += len(data)
        return nbytes
    proto = default_buffer_prototype()
    encoded = [(c.key(row), c.encode_chunk(x)) for c, row, x in chunks]
    items = [(k, proto.buffer.from_bytes(d)) for k, d in encoded]

    async def _set_all() -> None:
        await asyncio.gather(*(store.set(k, b) for k, b in items))

    zarr_sync(_set_all())
    return sum(len(d) for _, d in encoded)


def _local_store(store: Any) -> zarr.storage.LocalStore | None:
    """The zarr ``LocalStore`` under ``store`` — itself, or behind wrappers whose reads return
    the wrapped store's bytes unchanged (``transparent_reads``, e.g. the reader's
    ``integrity.ChunkGuard``: a missing chunk is None here either way) — or None."""
    while getattr(store, "transparent_reads", False):
        store = store._store
    return store if isinstance(store, zarr.storage.LocalStore) else None


def _in_folder(path: Path, create: Callable[[], Any], guard: Callable[[], None] | None) -> Any:
    """``create()`` a file beside ``path``; when its folder is missing, ``guard()`` first (a
    store deleted under its writer is never re-created), then make the folder and retry."""
    try:
        return create()
    except FileNotFoundError:
        if guard is not None:
            guard()
        path.parent.mkdir(parents=True, exist_ok=True)
        return create()


def _write_chunk(path: Path, data: bytes, guard: Callable[[], None] | None = None) -> None:
    """``data`` to a per-image chunk file: written in place when the file is new, through
    :func:`_write_atomic` when it exists.

    A new chunk belongs to an image whose completion marker is not set yet, and no reader
    reads a pending image, so a write killed half-way leaves a torn file nobody reads; the
    image stays pending, and its next write finds the file and replaces it atomically (as does
    ``cache verify --repair``, which resets the markers first). ``O_EXCL`` makes "new" exact.
    Saves the temporary file and the rename, ~0.1 ms per chunk of CPU on this machine's ext4
    (docs/store.md, "Writes")."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    try:
        fd = _in_folder(path, lambda: os.open(path, flags, 0o666), guard)
    except FileExistsError:
        _write_atomic(path, data, guard)
        return
    try:
        with open(fd, "wb", closefd=True) as f:
            f.write(data)
    except BaseException:
        path.unlink(missing_ok=True)  # ours: created by this call, never read yet
        raise


def _write_atomic(path: Path, data: bytes, guard: Callable[[], None] | None = None) -> None:
    """``data`` to ``path`` through a temporary file in the same folder and a rename, as zarr's
    ``LocalStore`` writes a chunk: a reader or a killed writer never sees a torn file.

    The folder is created only when missing (a store with nested "c/I/…" keys), after
    ``guard()`` (``GuardedLocalStore.guard``: a store deleted under its writer is never
    re-created); flat "c.I.…" keys live in the array's own folder, so a new chunk costs no
    folder at all. Measured against ``LocalStore.set`` in docs/store.md."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.partial")
    try:
        with _in_folder(path, lambda: open(tmp, "wb"), guard) as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class LocalChunkCache:
    """A read-through local copy of a remote store's FINAL chunks (``--cache-local DIR``).

    Chunk ``key`` of store ``url`` lives at ``DIR/<sha256(url)[:16]>/<key>``, written to a
    temporary file and renamed (a killed reader leaves no torn chunk). Only chunks whose every
    image is final (complete or unreadable) are kept: a chunk of a block still being written may
    change, a final one never does (``cache verify --repair`` rewrites damaged images: delete the
    folder after a repair). A cached copy that fails its crc32c is dropped and fetched again.
    """

    def __init__(self, root: str | os.PathLike, url: str):
        self.root = Path(root) / hashlib.sha256(str(url).encode()).hexdigest()[:16]

    def _file(self, key: str) -> Path:
        return self.root / key

    def get(self, key: str) -> bytes | None:
        try:
            return self._file(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def put(self, key: str, data: bytes) -> None:
        f = self._file(key)
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f".{f.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.write_bytes(data)
        os.replace(tmp, f)

    def drop(self, key: str) -> None:
        self._file(key).unlink(missing_ok=True)


def fetch_rows(
    store: Any,
    wanted: list[tuple[RowCodec, int]],
    *,
    limit: int | None = None,
    local: LocalChunkCache | None = None,
    final: Callable[[RowCodec, int], bool] | None = None,
) -> list[np.ndarray | BaseException | None]:
    """Row ``row`` of each array in ``wanted``: ndarray, None for a missing chunk, or the
    decoding exception (e.g. :class:`ChecksumMismatch`), in order. One store round trip: all
    chunk requests in flight together, at most ``limit`` at once (None: no bound). With
    ``local``, chunks for which ``final(codec, row)`` holds are read from / copied to it."""
    if local is None and not limit:
        return _fetch_plain(store, wanted)
    by_key = {codec.key(row): (codec, row) for codec, row in wanted}
    keys = list(by_key)
    cacheable = {k for k, cr in by_key.items() if final is None or final(*cr)} if local else set()
    proto = default_buffer_prototype()
    sem = asyncio.Semaphore(limit) if limit else None

    async def _get(k: str, use_local: bool = True):
        if use_local and k in cacheable:
            data = local.get(k)
            if data is not None:
                return data, True
        if sem is None:
            buf = await store.get(k, proto)
        else:
            async with sem:
                buf = await store.get(k, proto)
        return (None if buf is None else buf.to_bytes()), False

    async def _get_all(ks: list[str], use_local: bool = True) -> list:
        return await asyncio.gather(*(_get(k, use_local) for k in ks), return_exceptions=True)

    got = dict(zip(keys, zarr_sync(_get_all(keys)), strict=True))
    stale = [k for k, r in got.items() if not isinstance(r, BaseException) and r[1]
             and not _decodes(by_key[k][0], r[0])]  # fmt: skip
    if stale:  # a damaged local copy: drop it, read the store's own
        for k in stale:
            local.drop(k)
        got.update(zip(stale, zarr_sync(_get_all(stale, use_local=False)), strict=True))
    out: list[np.ndarray | BaseException | None] = []
    for codec, row in wanted:
        k = codec.key(row)
        res = got[k]
        if isinstance(res, BaseException) or res[0] is None:
            out.append(res if isinstance(res, BaseException) else None)
            continue
        data, from_local = res
        try:
            out.append(codec.decode_row(data, row))
        except Exception as exc:  # noqa: BLE001 - handed to the caller with its context
            out.append(exc)
            continue
        if k in cacheable and not from_local:
            local.put(k, data)
            got[k] = (data, True)  # once per key
    return out


def _fetch_plain(
    store: Any, wanted: list[tuple[RowCodec, int]]
) -> list[np.ndarray | BaseException | None]:
    """``fetch_rows`` without a bound or a local copy: the leanest path. A local folder's
    chunk files are read here, in the caller's thread (as ``put_chunks`` writes them): zarr's
    ``LocalStore.get`` hops to a worker thread per key, which cost more CPU than decoding a
    demo-sized sample (``dfmsd bench store``: ``read_one_sample``)."""
    keys = list(dict.fromkeys(codec.key(row) for codec, row in wanted))
    local = _local_store(store)
    if local is not None:
        got: dict[str, Any] = {k: _read_file(Path(local.root) / k) for k in keys}
    else:
        proto = default_buffer_prototype()

        async def _get_all() -> list:
            return await asyncio.gather(
                *(store.get(k, proto) for k in keys), return_exceptions=True
            )

        got = {
            k: b if b is None or isinstance(b, BaseException) else b.to_bytes()
            for k, b in zip(keys, zarr_sync(_get_all()), strict=True)
        }
    out: list[np.ndarray | BaseException | None] = []
    for codec, row in wanted:
        data = got[codec.key(row)]
        if data is None or isinstance(data, BaseException):
            out.append(data)
            continue
        try:
            out.append(codec.decode_row(data, row))
        except Exception as exc:  # noqa: BLE001 - handed to the caller with its context
            out.append(exc)
    return out


def _read_file(path: Path) -> bytes | BaseException | None:
    """A chunk file's bytes; None when it does not exist (zarr's ``get`` of a missing key)."""
    try:
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:  # handed to the caller, as zarr's gather would
        return exc


def _decodes(codec: RowCodec, data: bytes) -> bool:
    """Whether a cached chunk still passes its crc32c (no crc: it is trusted)."""
    if not codec.crc:
        return True
    return google_crc32c.value(data[:-4]) == int.from_bytes(data[-4:], "little")

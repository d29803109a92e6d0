"""How ``TeacherStore`` reads: every chunk a sample (or a batch) needs, in one round trip.

``_gather_list`` sends the row-chunked arrays through the fast path of ``store/chunks.py``
(one ``asyncio.gather`` of store GETs, decoded with numcodecs) and the rest through zarr's own
``getitem`` (one event-loop call). On object storage the requests in flight are bounded by the
store's ``concurrency``, final chunks are kept in ``cache_local``, and a known backend failure
becomes its one-line error (``store/remote.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import numpy as np
from zarr.core.sync import sync as zarr_sync

from dfmsd_cli.store import schema
from dfmsd_cli.store.chunks import LocalChunkCache, RowCodec, fetch_rows
from dfmsd_cli.store.integrity import corrupt, is_checksum_error
from dfmsd_cli.store.remote import explain, remote_errors


@contextlib.contextmanager
def _nothing():
    yield


class GatherMixin:
    """The read machinery of ``TeacherStore`` (which supplies ``path``, ``group``,
    ``_array``, ``_codecs``, ``_guard``, ``small``, ``checksummed``, ``concurrency``,
    ``cache_local`` and ``_local_cache``)."""

    def _row_codec(self, name: str) -> RowCodec | None:
        if name not in self._codecs:
            self._codecs[name] = RowCodec.of(self._array(name))
        return self._codecs[name]

    def _gather(self, reads: dict[str, tuple[Any, str]]) -> dict[str, np.ndarray]:
        """``{name: array[sel]}`` for ``reads = {name: (sel, where)}`` (see ``_gather_list``)."""
        got = self._gather_list([(n, sel, where) for n, (sel, where) in reads.items()])
        return dict(zip(reads, got, strict=True))

    def _final(self, codec: RowCodec, row: int) -> bool:
        """Whether every image of the chunk holding ``row`` is final (complete or unreadable):
        only such chunks never change and may be kept in ``cache_local``."""
        c0 = codec.chunk[0]
        start = row - row % c0
        return bool(np.all(self.small()["done"][start : start + c0] != schema.DONE_PENDING))

    def _local(self) -> LocalChunkCache | None:
        if self.cache_local is None:
            return None
        if self._local_cache is None:
            self._local_cache = LocalChunkCache(self.cache_local, self.path)
        return self._local_cache

    def _gather_list(self, reads: list[tuple[str, Any, str]]) -> list[np.ndarray]:
        """``[array[sel] for name, sel, where in reads]``, ``sel`` = a row index or
        ``(row, *slices)``, in one store round trip (``store/chunks.py``; arrays outside the fast
        path through zarr). A checksum mismatch or a missing chunk becomes a StoreCorrupt naming
        its ``where``; any other error is re-raised as it is (a known object-storage failure
        as its one-line error, ``store/remote.py``)."""
        fast, slow = [], []
        for k, (name, _, _) in enumerate(reads):
            (fast if self._row_codec(name) is not None else slow).append(k)
        out: list[Any] = [None] * len(reads)
        if fast:
            rows = [reads[k][1] if isinstance(reads[k][1], int) else reads[k][1][0] for k in fast]
            wanted = [(self._codecs[reads[k][0]], int(r)) for k, r in zip(fast, rows, strict=True)]
            if self.concurrency is None:  # a local store
                got = fetch_rows(self.group.store, wanted)
            else:
                with remote_errors(self.path):
                    got = fetch_rows(
                        self.group.store,
                        wanted,
                        limit=self.concurrency,
                        local=self._local(),
                        final=self._final,
                    )
            for k, row, res in zip(fast, rows, got, strict=True):
                name, sel, where = reads[k]
                if isinstance(res, BaseException):
                    if is_checksum_error(res):
                        raise corrupt(
                            self.path, where, f"chunk of '{name}' fails its crc32c"
                        ) from res
                    if self.concurrency:
                        err = explain(self.path, res)
                        if err is not None:
                            raise err from res
                    raise res
                if res is None:  # absent chunk: lost (v2) or all fill value (v1)
                    if self.checksummed:
                        key = self._codecs[name].key(int(row))
                        raise corrupt(self.path, where, f"chunk {key} is missing")
                    a = self._array(name)
                    res = np.zeros(a.shape[1:], dtype=a.dtype)
                out[k] = res if isinstance(sel, int) else res[tuple(sel[1:])]
        if slow:
            for k, res in zip(slow, self._gather_zarr([reads[k] for k in slow]), strict=True):
                out[k] = res
        return out

    def _gather_zarr(self, reads: list[tuple[str, Any, str]]) -> list[np.ndarray]:
        """Like ``_gather_list`` through zarr's ``getitem`` (all reads in one event-loop call)."""
        arrays = {name: self._array(name).async_array for name, _, _ in reads}
        if self._guard is not None:
            self._guard.take()

        async def _all() -> list:
            return await asyncio.gather(
                *(arrays[n].getitem(sel) for n, sel, _ in reads), return_exceptions=True
            )

        with remote_errors(self.path) if self.concurrency else _nothing():
            results = zarr_sync(_all())
        out: list[np.ndarray] = []
        for (name, _, where), res in zip(reads, results, strict=True):
            if isinstance(res, BaseException):
                if is_checksum_error(res):
                    raise corrupt(self.path, where, f"chunk of '{name}' fails its crc32c") from res
                raise res
            out.append(np.asarray(res))
        lost = self._guard.take() if self._guard is not None else []
        if self.checksummed:
            wheres = {name: where for name, _, where in reads}
            for array, coords in lost:
                where = wheres.get(array, "a read of this sample")
                raise corrupt(self.path, where, f"chunk {coords} of '{array}' is missing")
        return out

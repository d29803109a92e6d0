"""Chunk integrity on every read: crc32c checksums and missing-chunk detection.

Stores of schema version 2 carry zarr v3's ``crc32c`` codec at the end of every array's codec
pipeline (``writer.py``): zarr recomputes the checksum of each chunk it decodes and raises on a
mismatch, so a flipped bit never reaches training. They also write every chunk, zeros included
(``write_empty_chunks``), so a chunk that is absent while its image is marked complete was
lost — zarr alone would silently return the fill value for it. :class:`ChunkGuard` wraps the
zarr store and records every chunk key a read asked for and did not find; the reader turns
both faults into one :class:`StoreCorrupt` line naming the store, image, view and level and the
fix (``dfmsd cache verify --repair``).

Stores of schema version 1 (written before checksums) still open and read; ``cache verify``
says they are unchecksummed.
"""

from __future__ import annotations

import threading
from typing import Any

from zarr.storage import WrapperStore

from dfmsd_cli.errors import UserError

CHECKSUM_CODEC = "crc32c"


class StoreCorrupt(UserError):
    """A chunk of a complete image failed its checksum or is missing."""


def repair_hint(path: str) -> str:
    return (
        f"run 'dfmsd cache verify {path} --repair --data ROOT' to recompute exactly the damaged "
        "images (or reset them and re-run the same 'dfmsd precompute')"
    )


def corrupt(path: str, where: str, what: str) -> StoreCorrupt:
    return StoreCorrupt(f"store {path}: {what} at {where}: {repair_hint(path)}")


def is_checksum_error(exc: BaseException) -> bool:
    """zarr's crc32c codec raises ValueError("Stored and computed checksum do not match")."""
    return isinstance(exc, ValueError) and "checksum" in str(exc).lower()


def split_chunk_key(key: str) -> tuple[str, tuple[int, ...]] | None:
    """``"feat/orig/8/c/3/0/0/0"`` or ``"feat/orig/8/c.3.0.0.0"`` (the per-image arrays since
    ``create.FLAT_KEYS``) -> ``("feat/orig/8", (3, 0, 0, 0))``; None for metadata."""
    head, _, last = key.rpartition("/")
    if last.startswith("c."):
        array, parts = head, last[2:].split(".")
    elif key.startswith("c/"):
        array, parts = "", key[2:].split("/")
    elif "/c/" in key:
        array, rest = key.rsplit("/c/", 1)
        parts = rest.split("/")
    else:
        return None
    try:
        return array, tuple(int(x) for x in parts)
    except ValueError:
        return None


class ChunkGuard(WrapperStore):
    """A zarr store wrapper that records the chunk keys a read wanted but did not find."""

    transparent_reads = True  # get returns the wrapped store's bytes: chunks.fetch_rows may bypass

    def __init__(self, store: Any, missing: set[str] | None = None) -> None:
        super().__init__(store)
        self.missing: set[str] = set() if missing is None else missing
        self._lock = threading.Lock()

    def _with_store(self, store: Any) -> ChunkGuard:
        return type(self)(store, self.missing)

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        out = await self._store.get(key, prototype, byte_range)
        if out is None and split_chunk_key(key) is not None:
            with self._lock:
                self.missing.add(key)
        return out

    async def get_partial_values(self, prototype: Any, key_ranges: Any) -> list:
        key_ranges = list(key_ranges)
        out = await self._store.get_partial_values(prototype, key_ranges)
        for (key, _), buf in zip(key_ranges, out, strict=True):
            if buf is None and split_chunk_key(key) is not None:
                with self._lock:
                    self.missing.add(key)
        return out

    def take(self) -> list[tuple[str, tuple[int, ...]]]:
        """The (array, chunk coords) recorded since the last call, and forget them."""
        with self._lock:
            keys = list(self.missing)
            self.missing.clear()
        return [k for k in (split_chunk_key(key) for key in keys) if k is not None]

"""A local zarr store that never re-creates a store deleted under its writer.

zarr's ``LocalStore`` creates missing parent folders on every chunk write. If the store is
deleted while ``precompute`` writes it, the writer threads would re-create a partial store
with no metadata (no ``zarr.json``) that no later run can open. ``GuardedLocalStore`` checks
before every write that the store's root ``zarr.json`` still exists and otherwise stops the
run with ``StoreVanished`` (a one-line ``UserError``). A folder left without metadata (a write
already in flight when the store vanished, or an interrupted copy) is reported by
``incomplete_store_error`` as "not a dfmsd store (incomplete creation)" with the fix.
"""

from __future__ import annotations

import os
from pathlib import Path

from zarr.storage import LocalStore

from dfmsd_cli.errors import UserError


class StoreVanished(UserError):
    """The store folder (or its metadata) disappeared while this process wrote it."""


class GuardedLocalStore(LocalStore):
    """``LocalStore`` whose writes require the store root's ``zarr.json`` (see module doc)."""

    def guard(self) -> None:
        """Raise ``StoreVanished`` unless the store's root ``zarr.json`` exists (before a write:
        also ``store.chunks.put_chunks``'s direct local writes call it)."""
        if not (self.root / "zarr.json").is_file():
            raise StoreVanished(
                f"store {self.root} disappeared while precompute was writing it (deleted by "
                "another process?): nothing was re-created; run the same command again to "
                "start it anew"
            )

    async def _open(self, *, mode=None) -> None:  # never mkdir a vanished root
        self.guard()
        return await super()._open(mode=mode)

    def _ensure_open_sync(self) -> None:
        if not self._is_open:
            self.guard()
        super()._ensure_open_sync()

    async def _set(self, key: str, value, exclusive: bool = False) -> None:
        self.guard()
        await super()._set(key, value, exclusive=exclusive)

    def set_sync(self, key: str, value) -> None:
        self.guard()
        super().set_sync(key, value)


def incomplete_store_error(path: str | os.PathLike) -> UserError | None:
    """The error for a local folder that exists, is not empty, and has no ``zarr.json``."""
    p = Path(path)
    if "://" in str(path) or not p.is_dir() or (p / "zarr.json").is_file():
        return None
    if not any(p.iterdir()):
        return None
    return UserError(
        f"{p} is not a dfmsd store (incomplete creation: the folder has no zarr.json metadata, "
        f"e.g. it was deleted or copied while being written): delete it (rm -r {p}) and run "
        "precompute again"
    )

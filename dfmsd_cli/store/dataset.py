"""A torch ``Dataset`` over a teacher store's complete images (read benchmarks, tools)."""

from __future__ import annotations

import numpy as np
import torch

from dfmsd_cli.store.reader import TeacherStore


class StoreDataset(torch.utils.data.Dataset):
    """(index, view) pairs of complete images read from a store, e.g. for a read benchmark.

    Item k is image ``indices[k // len(views)]`` in view ``views[k % len(views)]``.
    """

    def __init__(self, store: TeacherStore | str, views: tuple[str, ...] = ("orig",), indices=None):
        self.store = store if isinstance(store, TeacherStore) else TeacherStore.open(store)
        self.views = tuple(views)
        self.indices = np.asarray(indices) if indices is not None else self.store.complete_indices()

    def __len__(self) -> int:
        return len(self.indices) * len(self.views)

    def __getitem__(self, k: int) -> dict:
        i = int(self.indices[k // len(self.views)])
        return self.store.get(i, self.views[k % len(self.views)])

    def __getitems__(self, ks: list[int]) -> list[dict]:
        """A DataLoader batch in one store round trip (``TeacherStore.get_many``)."""
        n = len(self.views)
        return self.store.get_many([(int(self.indices[k // n]), self.views[k % n]) for k in ks])


__all__ = ["StoreDataset"]

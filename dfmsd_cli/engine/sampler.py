"""Deterministic epoch order with a per-image view draw (MMDetection's RandomFlip(0.5), replayable).

For epoch ``e`` the image order is a permutation drawn from ``Generator(seed + e)`` and each
image draws one of the dataset's views uniformly. The same (seed, epoch) always gives the same
sequence, so a resumed run skips exactly the batches it had done, and distillation can look up
the teacher's stored features for the view it drew.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ViewSampler(Sampler[int]):
    """Yields dataset item indices ``image * num_views + view`` for one epoch.

    ``keep`` restricts to a subset of image indices (e.g. images with annotations). Under DDP
    each rank takes every ``world_size``-th item of the padded sequence, like DistributedSampler.
    """

    def __init__(
        self,
        num_images: int,
        num_views: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        keep: list[int] | None = None,
        rank: int = 0,
        world_size: int = 1,
        random_views: bool = True,
    ) -> None:
        self.images = list(range(num_images)) if keep is None else list(keep)
        self.num_views = num_views
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.random_views = random_views
        self.epoch = 0
        self.start = 0  # items of this rank to skip (resume mid-epoch)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    def order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        n = len(self.images)
        perm = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        if self.num_views > 1 and self.random_views:
            views = torch.randint(self.num_views, (n,), generator=g).tolist()
        else:
            views = [0] * n
        items = [self.images[i] * self.num_views + views[i] for i in perm]
        if self.world_size > 1:
            total = -(-len(items) // self.world_size) * self.world_size
            items = (items + items[: total - len(items)])[self.rank :: self.world_size]
        return items

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start :])

    def __len__(self) -> int:
        return max(0, -(-len(self.images) // self.world_size) - self.start)

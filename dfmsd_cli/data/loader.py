"""Resolving ``--data/--split/--ann/--images``, batch collation and DataLoader helpers."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dfmsd_cli.data.geometry import pad_batch
from dfmsd_cli.errors import UserError, suggest

_TARGET_KEYS = ("boxes", "labels", "masks")


def resolve_data(
    data: str | Path | None,
    split: str,
    ann: str | Path | None = None,
    images: str | Path | None = None,
) -> tuple[Path, Path]:
    """``--data ROOT`` -> (ROOT/annotations/instances_{split}.json, ROOT/{split}/).

    ``ann`` and ``images`` override either part. Raises a one-line ``UserError`` when the
    dataset is not given or a path does not exist (listing the splits ROOT does have).
    """
    if data is None and (ann is None or images is None):
        raise UserError(
            "no dataset given: pass --data ROOT (COCO layout) or both --ann FILE and --images DIR"
        )
    root = Path(data) if data is not None else None
    ann_file = Path(ann) if ann is not None else root / "annotations" / f"instances_{split}.json"
    image_dir = Path(images) if images is not None else root / split
    if root is not None and not root.is_dir():
        raise UserError(f"dataset root {root} not found: pass an existing folder to --data")
    if not ann_file.is_file():
        hint = ""
        if ann is None:
            splits = available_splits(root)
            hint = suggest(split, splits) or (
                f" (splits found: {', '.join(splits)})" if splits else ""
            )
        raise UserError(
            f"annotation file {ann_file} not found{hint}: pick an existing --split, "
            "or pass --ann FILE"
        )
    if not image_dir.is_dir():
        raise UserError(
            f"image folder {image_dir} not found: put the {split} images there or pass --images DIR"
        )
    return ann_file, image_dir


def available_splits(root: Path) -> list[str]:
    """Splits ``S`` for which ``root/annotations/instances_S.json`` exists."""
    ann_dir = root / "annotations"
    if not ann_dir.is_dir():
        return []
    return sorted(p.stem[len("instances_") :] for p in ann_dir.glob("instances_*.json"))


def collate(samples: Sequence[dict | None], pad_divisor: int = 32) -> dict | None:
    """Batch samples: images padded bottom/right to a multiple of ``pad_divisor``.

    Returns ``{"images": (B,3,H,W), "image_sizes": [(h,w)], "targets": [{"boxes","labels"
    [,"masks"]}], "meta": [sample minus image/boxes/labels/masks]}`` and, when the samples
    carry ``raw`` (``ds.keep_raw``), ``"raw"``: the [0,255] images padded with zeros.
    ``None`` samples (unreadable images) are dropped; a batch of only ``None`` gives ``None``.
    """
    samples = [s for s in samples if s is not None]
    if not samples:
        return None
    batch = {
        "images": pad_batch([s["image"] for s in samples], pad_divisor),
        "image_sizes": [tuple(s["size"]) for s in samples],
        "targets": [{k: s[k] for k in _TARGET_KEYS if k in s} for s in samples],
        "meta": [
            {k: v for k, v in s.items() if k not in ("image",) + _TARGET_KEYS} for s in samples
        ],
    }
    if "raw" in samples[0]:
        batch["raw"] = pad_batch([s["raw"] for s in samples], pad_divisor)
    return batch


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches drawn from one aspect group at a time (landscape / portrait), as MMDetection's
    ``GroupSampler``, so padding wastes little; sharded across ``world_size`` ranks.

    Deterministic for a (seed, epoch): call ``set_epoch`` each epoch. Every rank gets the same
    number of batches (the list is padded by repetition, like ``DistributedSampler``).
    """

    def __init__(
        self,
        flags: Sequence[int],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        self.flags = list(flags)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _all_batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        batches: list[list[int]] = []
        for flag in sorted(set(self.flags)):
            idx = [i for i, f in enumerate(self.flags) if f == flag]
            if self.shuffle:
                idx = [idx[i] for i in torch.randperm(len(idx), generator=g).tolist()]
            for b in range(0, len(idx), self.batch_size):
                chunk = idx[b : b + self.batch_size]
                if len(chunk) == self.batch_size or not self.drop_last:
                    batches.append(chunk)
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        per_rank = math.ceil(len(batches) / self.world_size) if batches else 0
        if self.world_size > 1 and batches:
            batches = (batches * self.world_size)[: per_rank * self.world_size]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._all_batches()
        return iter(batches[self.rank :: self.world_size])

    def __len__(self) -> int:
        return len(self._all_batches()[self.rank :: self.world_size])


def make_loader(
    ds: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
    group_by_aspect: bool | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    pad_divisor: int | None = None,
) -> DataLoader:
    """DataLoader over a ``CocoDetection`` with ``collate``; shuffled batches are drawn from one
    aspect group (landscape/portrait) at a time unless ``group_by_aspect=False``.

    ``rank``/``world_size`` default to ``torch.distributed``'s when initialised. The batch
    sampler is ``loader.batch_sampler`` (call ``set_epoch(e)`` on it each epoch). Workers use
    the platform's start method; the dataset is picklable, so spawn/forkserver work too.
    """
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if rank is None or world_size is None:
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank = torch.distributed.get_rank() if dist else 0
        world_size = torch.distributed.get_world_size() if dist else 1
    if group_by_aspect is None:
        group_by_aspect = shuffle  # in-order iteration (eval, precompute) keeps image order
    if group_by_aspect and hasattr(ds, "aspect_flags"):
        flags = ds.aspect_flags()
    else:
        flags = [0] * len(ds)
    sampler = GroupedBatchSampler(
        flags,
        batch_size,
        shuffle=shuffle,
        seed=seed,
        rank=rank,
        world_size=world_size,
        drop_last=drop_last,
    )
    if pad_divisor is None:
        geometry = getattr(ds, "geometry", None)
        pad_divisor = geometry.pad_divisor if geometry is not None else 32
    return DataLoader(
        ds,
        batch_sampler=sampler,
        collate_fn=partial(collate, pad_divisor=pad_divisor),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )

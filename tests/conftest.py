"""Shared fixtures. Tests run on the CPU with generated data and tiny models; no network, no
``../shared``. Threads are limited so parallel test processes don't oversubscribe the CPU."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A small synthetic COCO root (12 train + 3 val images, 64-160 px, seed 0), made once per
    test session: ``ROOT/annotations/instances_{train2017,val2017}.json``, ``ROOT/{split}/``."""
    from dfmsd_cli.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("synthetic") / "data"
    return make_synthetic(root, images=12, seed=0, min_size=64, max_size=160)

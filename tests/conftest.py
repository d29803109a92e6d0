"""Shared fixtures. Tests run on the CPU with generated data and tiny models; no network, no
``../shared``. Threads are limited so parallel test processes don't oversubscribe the CPU."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


def small_synthetic(tmp_path_factory, images: int):
    """``images`` synthetic training images, 64-128 px, seed 1 (the precompute tests' data);
    import it (``from conftest import small_synthetic, train_files``)."""
    from dfmsd_cli.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("syn")
    return make_synthetic(root / "d", images=images, seed=1, min_size=64, max_size=128)


def train_files(root):
    """(annotation file, image folder) of ``root``'s train2017 split."""
    return root / "annotations" / "instances_train2017.json", root / "train2017"


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A small synthetic COCO root (12 train + 3 val images, 64-160 px, seed 0), made once per
    test session: ``ROOT/annotations/instances_{train2017,val2017}.json``, ``ROOT/{split}/``."""
    from dfmsd_cli.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("synthetic") / "data"
    return make_synthetic(root, images=12, seed=0, min_size=64, max_size=160)


def _cli(argv: list[str]) -> int:
    """Exit code of ``dfmsd ARGV`` run in this process (0 when it returns normally); tests
    import it (``from conftest import _cli``)."""
    from dfmsd_cli.cli import main

    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@pytest.fixture(scope="session")
def tiny_cache(synthetic_root, tmp_path_factory):
    """``CACHE`` holding ``retina_tiny/train2017.zarr`` of ``synthetic_root`` (128x96, block 4),
    made once per session. Read it as it is; copy it before damaging it."""
    cache = tmp_path_factory.mktemp("tiny_cache") / "cache"
    argv = ["precompute", "--teacher", "retina_tiny", "--data", str(synthetic_root), "--cache",
            str(cache), "--img-scale", "128,96", "--batch-size", "2", "--num-workers", "0",
            "--device", "cpu", "--block", "4"]  # fmt: skip
    assert _cli(argv) == 0
    return cache


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a free 127.0.0.1 port with bucket ``dfmsd``, a user's key and
    authentication on (``tests/s3server.py``); skips when moto or s3fs is not installed."""
    from s3server import available, start

    reason = available()
    if reason is not None:
        pytest.skip(reason)
    server, s3 = start()
    yield s3
    server.stop()

"""Operational faults of the store, from the CLI: a full or read-only disk, a store deleted
while precompute writes it or while distill reads it, a folder without metadata, and two
writers on one store. Each ends in one line and exit 2; what was written is kept and the
same command resumes."""

from __future__ import annotations

import errno
import functools
import multiprocessing as mp
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
import zarr.storage._local as zlocal

from dfmsd_cli.cli import main
from dfmsd_cli.data.synthetic import make_synthetic
from dfmsd_cli.store import chunks

N = 6
TEACHER = "retina_tiny"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    return make_synthetic(root / "d", images=N, seed=3, min_size=64, max_size=96)


def _args(data: Path, cache: Path, *extra: str) -> list[str]:
    return [
        "precompute", "--teacher", TEACHER, "--data", str(data), "--cache", str(cache),
        "--img-scale", "96,64", "--num-workers", "0", "--device", "cpu", "--block", "1",
        "--batch-size", "1", "--views", "orig", *extra,
    ]  # fmt: skip


def _main(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "nothing on stderr"
    assert err[-1].startswith("error: "), err
    assert not any("Traceback" in line for line in err)
    return err[-1]


def _store(cache: Path) -> Path:
    return cache / TEACHER / "train2017.zarr"


def _done(cache: Path) -> np.ndarray:
    return np.asarray(zarr.open_group(str(_store(cache)), mode="r")["done"][:])


def _fail_puts_from(monkeypatch, image: int, err: OSError) -> None:
    """Make local writes — zarr's and the writer's direct chunk writes (store/chunks.py) —
    raise ``err`` for the chunks of images >= ``image`` (block=1: chunk keys ``.../c/{index}/...``
    or ``.../c.{index}.0...``), and for every write when ``image`` is 0."""
    real, real_new, real_atomic = zlocal._put, chunks._write_chunk, chunks._write_atomic

    def hit(path) -> bool:
        parts = Path(path).parts
        if image == 0:
            return True
        if "c" in parts:
            return int(parts[parts.index("c") + 1]) >= image
        name = parts[-1]
        return name.startswith("c.") and int(name.split(".")[1]) >= image

    def put(path, value, exclusive=False):
        if hit(path):
            raise err
        return real(path, value, exclusive=exclusive)

    def direct(real_direct):
        def write(path, data, guard=None):
            if hit(path):
                raise err
            return real_direct(path, data, guard)

        return write

    monkeypatch.setattr(zlocal, "_put", put)
    monkeypatch.setattr(chunks, "_write_chunk", direct(real_new))
    monkeypatch.setattr(chunks, "_write_atomic", direct(real_atomic))


def test_full_disk_is_one_line_with_free_space_then_resumes(data, tmp_path, monkeypatch, capsys):
    # the disk fills while image 3 is written; write() raises ENOSPC naming no file
    _fail_puts_from(monkeypatch, 3, OSError(errno.ENOSPC, "No space left on device"))
    assert _main(_args(data, tmp_path)) == 2
    line = _one_line(capsys)
    assert "no space left" in line and str(_store(tmp_path)) in line and " free" in line
    assert "run the same command again" in line
    done = _done(tmp_path)
    assert done[3:].sum() == 0 and done.sum() < N  # stopped at the fault; rows kept
    monkeypatch.undo()  # space freed
    assert _main(_args(data, tmp_path)) == 0
    assert _done(tmp_path).tolist() == [1] * N
    assert not list(_store(tmp_path).parent.glob(".*lock*"))  # released


@pytest.mark.parametrize(
    "code,words",
    [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied")],
)
def test_read_only_cache_is_one_line(data, tmp_path, monkeypatch, capsys, code, words):
    target = str(tmp_path / "somewhere")
    _fail_puts_from(monkeypatch, 0, OSError(code, os.strerror(code), target))
    assert _main(_args(data, tmp_path)) == 2
    line = _one_line(capsys)
    assert words in line and target in line and "free)" in line and "--cache" in line


def test_store_deleted_under_precompute_is_not_recreated(data, tmp_path, monkeypatch, capsys):
    """The writer threads must not re-create a partial store without metadata."""
    import dfmsd_cli.store.precompute as pre

    real, calls = pre.run_batch, [0]

    def run_batch(*a, **k):
        calls[0] += 1
        if calls[0] == 3:  # two images written and finished: delete the store under the run
            deadline = time.time() + 30
            while _done(tmp_path).sum() < 2 and time.time() < deadline:
                time.sleep(0.01)
            shutil.rmtree(_store(tmp_path))
        return real(*a, **k)

    monkeypatch.setattr(pre, "run_batch", run_batch)
    assert _main(_args(data, tmp_path)) == 2
    assert "disappeared while precompute was writing it" in _one_line(capsys)
    assert not _store(tmp_path).exists()  # never re-created
    monkeypatch.undo()
    assert _main(_args(data, tmp_path)) == 0  # the same command starts it anew
    assert _done(tmp_path).tolist() == [1] * N


def test_folder_without_metadata_is_an_incomplete_store(data, tmp_path, capsys):
    leftover = _store(tmp_path) / "feat" / "orig" / "8"
    leftover.mkdir(parents=True)
    (leftover / "c").write_bytes(b"x")
    assert _main(_args(data, tmp_path)) == 2
    line = _one_line(capsys)
    assert "not a dfmsd store (incomplete creation" in line and "rm -r" in line
    assert (leftover / "c").is_file()  # not touched
    assert _main(["cache", "info", str(_store(tmp_path))]) == 2
    assert "incomplete creation" in _one_line(capsys)


# ---------------------------------------------------------------------------------- distill


@pytest.fixture(scope="module")
def store_cache(data, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("cache")
    assert _main(_args(data, cache, "--views", "orig,hflip")) == 0
    return cache


def _distill(data: Path, cache: Path, out: Path, *extra: str) -> list[str]:
    return [
        "distill", "--student", "retina_tiny", "--method", "mgd", "--stages", TEACHER,
        "--data", str(data), "--cache", str(cache), "--out", str(out), "--epochs", "2",
        "--num-workers", "0", "--device", "cpu", "--warmup-iters", "1", "--no-eval",
        "--batch-size", "1", "--save-interval", "1", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("how", ["deleted", "emptied"])
def test_store_deleted_while_distill_reads(data, store_cache, tmp_path, monkeypatch, capsys, how):
    import dfmsd_cli.distill.task as eng

    cache = tmp_path / "cache"
    shutil.copytree(store_cache, cache)
    store = _store(cache)
    real, calls = eng.train_step, [0]

    def step(*a, **k):
        calls[0] += 1
        if calls[0] == 2:
            if how == "deleted":
                shutil.rmtree(store)
            else:
                for child in store.iterdir():
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        return real(*a, **k)

    monkeypatch.setattr(eng, "train_step", step)
    out = tmp_path / "run"
    assert _main(_distill(data, cache, out)) == 2
    line = _one_line(capsys)
    assert str(store) in line and "deleted while in use" in line and "precompute" in line
    assert (out / "last.pth").is_file() and (out / "config.json").is_file()  # kept


# ---------------------------------------------------------------------------------- locks


def _child(data: Path, cache: Path, delay: float) -> None:
    """``dfmsd precompute`` in a forked child whose batches each take ``delay`` s longer (the
    ``on_batch`` hook injected here), so that it holds its lock while the test looks."""
    from dfmsd_cli.store import precompute as pre

    pre.precompute = functools.partial(pre.precompute, on_batch=lambda: time.sleep(delay))
    main(_args(data, cache))


def test_second_writer_names_the_holder_and_a_killed_holder_is_taken_over(data, tmp_path, capsys):
    p = mp.get_context("fork").Process(target=_child, args=(data, tmp_path, 0.5))
    p.start()
    try:
        deadline = time.time() + 300  # a wait limit, not a timing check: slow under load
        while time.time() < deadline and not list(_store(tmp_path).parent.glob(".*.lock-*")):
            time.sleep(0.02)
        assert _main(_args(data, tmp_path)) == 2
        line = _one_line(capsys)
        assert f"pid {p.pid} on host" in line and "--shard" in line
    finally:
        os.kill(p.pid, signal.SIGKILL)  # leaves its lock file behind
        p.join()
    assert list(_store(tmp_path).parent.glob(".*.lock-*"))  # stale now
    assert _main(_args(data, tmp_path)) == 0  # the dead holder's lock is taken over
    assert _done(tmp_path).tolist() == [1] * N

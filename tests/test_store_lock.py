"""The advisory writer lock of a store: per image range, holder named, stale locks taken over;
and the one-line messages of operating-system faults."""

from __future__ import annotations

import errno
import json
import socket
import subprocess
import sys

import pytest

from dfmsd_cli.errors import UserError, io_path, os_error_line
from dfmsd_cli.store.lock import store_lock


def _locks(store):
    return sorted(p.name for p in store.parent.glob(f".{store.name}.lock-*"))


def test_distinct_ranges_side_by_side_same_range_refused(tmp_path):
    store = tmp_path / "t" / "train2017.zarr"
    with store_lock(store, 0, 64, "0/2"), store_lock(store, 64, 128, "1/2"):
        assert _locks(store) == [".train2017.zarr.lock-0-64", ".train2017.zarr.lock-64-128"]
        with pytest.raises(UserError) as info, store_lock(store, 0, 64, "0/2"):
            pass
        msg = str(info.value)
        assert f"on host {socket.gethostname()}" in msg and "shard 0/2" in msg
        with pytest.raises(UserError, match="being written by"), store_lock(store, 32, 96, "?"):
            pass  # an overlapping range of another shard layout is refused too
    assert _locks(store) == []  # released on exit


def _write_lock(store, start, stop, **holder):
    store.parent.mkdir(parents=True, exist_ok=True)
    path = store.parent / f".{store.name}.lock-{start}-{stop}"
    path.write_text(json.dumps({"shard": "0/1", "time": 0, **holder}))
    return path


def test_dead_holder_on_this_host_is_taken_over(tmp_path):
    store = tmp_path / "t" / "s.zarr"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    _write_lock(store, 0, 10, host=socket.gethostname(), pid=int(dead.stdout))
    with store_lock(store, 0, 10, "0/1") as mine:
        assert json.loads(mine.read_text())["pid"] != int(dead.stdout)


def test_holder_on_another_host_is_not_guessed_dead(tmp_path):
    store = tmp_path / "t" / "s.zarr"
    path = _write_lock(store, 0, 10, host="elsewhere.example", pid=1)
    with pytest.raises(UserError) as info, store_lock(store, 5, 6, "0/1"):
        pass
    assert "pid 1 on host elsewhere.example" in str(info.value) and str(path) in str(info.value)
    assert path.is_file()  # left alone


@pytest.mark.parametrize(
    "code,words",
    [
        (errno.ENOSPC, "no space left on the device of /x/store.zarr ("),
        (errno.EROFS, "/x/store.zarr is on a read-only file system"),
        (errno.EACCES, "permission denied on /x/store.zarr"),
        (errno.ENOENT, "/x/store.zarr does not exist"),
        (errno.EIO, "on /x/store.zarr (errno 5)"),
    ],
)
def test_os_error_line_names_problem_path_and_fix(code, words):
    with pytest.raises(OSError) as info, io_path("/x/store.zarr"):
        raise OSError(code, "message")  # like write() on a full disk: no file name
    line = os_error_line(info.value)
    assert words in line and "\n" not in line and ("--cache" in line or "again" in line)


class _FullDisk:
    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int):
        raise OSError(errno.ENOSPC, "No space left on device", "/x/run/last.pth")


def test_os_error_from_a_dataloader_worker_keeps_errno_and_path():
    from torch.utils.data import DataLoader

    batches = iter(DataLoader(_FullDisk(), num_workers=1))
    try:
        with pytest.raises(OSError) as info:
            next(batches)
    finally:  # now: left to the garbage collector, the worker's shutdown waits 5 s
        batches._shutdown_workers()
    assert info.value.errno is None  # what PyTorch re-raises in the main process
    line = os_error_line(info.value)
    assert line.startswith("no space left on the device of /x/run/last.pth (")
    assert line.endswith("(raised in a DataLoader worker)") and "\n" not in line

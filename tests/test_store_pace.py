"""What held precompute's teacher back: image loading or the store's writer threads."""

from __future__ import annotations

import json
import time

import pytest
from conftest import _cli, small_synthetic

from dfmsd_cli.store.precompute import PrecomputeOptions, pace_note
from dfmsd_cli.store.writer import StoreWriter


def _summary(loop: float, data: float, writer: float) -> dict:
    return {"loop_s": loop, "data_s": data, "writer_wait_s": writer}


def test_pace_note_names_the_larger_wait_above_a_fifth_of_the_loop():
    o = PrecomputeOptions(teacher="retina_tiny", writer_threads=3, num_workers=1)
    assert pace_note(_summary(10.0, 1.9, 1.9), o) is None  # both under 20 %
    note = pace_note(_summary(10.0, 2.5, 4.0), o)
    assert note.startswith("note: the store's writer threads")
    assert "4.0 s of the 10.0 s loop (40%)" in note and "--writer-threads (now 3)" in note
    note = pace_note(_summary(10.0, 6.0, 4.0), o)
    assert note.startswith("note: loading images") and "--num-workers (now 1)" in note
    assert pace_note(_summary(0.0, 0.0, 0.0), o) is None  # nothing was computed


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return small_synthetic(tmp_path_factory, 6)


def test_slow_writer_is_measured_and_named_by_the_cli(data, tmp_path, monkeypatch, capsys):
    """Every image's chunks take 0.15 s to write with one writer thread, against a teacher that
    takes milliseconds: the main process waits for the writer most of the loop."""
    write = StoreWriter.write_chunks

    def slow(self, r):
        time.sleep(0.15)
        return write(self, r)

    monkeypatch.setattr(StoreWriter, "write_chunks", slow)
    args = ["precompute", "--teacher", "retina_tiny", "--data", str(data), "--cache",
            str(tmp_path), "--img-scale", "128,96", "--num-workers", "0", "--device", "cpu",
            "--block", "2", "--writer-threads", "1", "--json", "-"]  # fmt: skip
    assert _cli(args) == 0
    out = capsys.readouterr()
    summary = json.loads(out.out)
    assert summary["written"] == 6
    assert summary["writer_wait_s"] > summary["data_s"]
    assert summary["writer_wait_s"] > 0.5 * summary["loop_s"]  # 0.9 s of sleeps, ms of teacher
    err = " ".join(out.err.split())  # the console wraps long lines
    assert "waiting for the writer" in err
    assert "--writer-threads (now 1)" in err

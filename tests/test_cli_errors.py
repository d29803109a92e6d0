"""User errors stay one line, also when raised inside a DataLoader worker process."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from dfmsd_cli import cli
from dfmsd_cli.errors import UserError, one_line

MSG = "the enhanced input differs from the one the teacher saw: precompute the view again"


class _Failing(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> torch.Tensor:
        raise UserError(MSG)


def _worker_error() -> BaseException:
    batches = iter(DataLoader(_Failing(), num_workers=1))
    try:
        with pytest.raises(UserError) as info:
            next(batches)
    finally:  # now: left to the garbage collector, the worker's shutdown waits 5 s
        batches._shutdown_workers()
    return info.value


def test_worker_error_is_reduced_to_the_original_line():
    exc = _worker_error()
    assert "Original Traceback" in str(exc)  # what PyTorch re-raises in the main process
    assert one_line(exc) == MSG + " (raised in a DataLoader worker)"
    assert one_line(UserError(MSG)) == MSG


def test_main_prints_one_line_and_exits_2(monkeypatch, capsys):
    exc = _worker_error()

    def app(*a, **k):
        raise exc

    monkeypatch.setattr(cli, "app", app)
    with pytest.raises(SystemExit) as info:
        cli.main(["distill"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: the enhanced input differs")

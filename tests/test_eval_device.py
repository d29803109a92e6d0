"""resolve_device: auto/cpu/cuda[:i], and a one-line user error when CUDA is absent."""

from __future__ import annotations

import pytest
import torch

from dfmsd_cli.errors import UserError
from dfmsd_cli.utils.device import resolve_device


def test_cpu_and_auto(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(UserError, match="cuda:0..cuda:1"):
        resolve_device("cuda:2")


def test_cuda_absent_is_user_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="CUDA is not available.*--device cpu"):
        resolve_device("cuda")
    with pytest.raises(UserError, match="invalid device"):
        resolve_device("tpu")

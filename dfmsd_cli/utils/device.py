"""``--device auto|cpu|cuda[:i]`` -> ``torch.device``, with a user error when CUDA is absent."""

from __future__ import annotations

import torch

from dfmsd_cli.errors import UserError


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """Map a device option to a ``torch.device``.

    ``auto`` (or None) picks ``cuda`` when available, else ``cpu``. ``cuda`` / ``cuda:i`` must
    exist: asking for a GPU on a machine without one is a user mistake, not a silent fallback.
    """
    if isinstance(name, torch.device):
        name = str(name)
    text = (name or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        index_text = text[5:] if text.startswith("cuda:") else ""
        if index_text and not index_text.isdigit():
            raise UserError(f"invalid device '{name}': use auto, cpu, cuda or cuda:N")
        if not torch.cuda.is_available():
            raise UserError(
                f"device '{name}' asked for but CUDA is not available on this machine: "
                "use --device cpu (or auto)"
            )
        count = torch.cuda.device_count()
        if index_text and int(index_text) >= count:
            raise UserError(
                f"device '{name}' does not exist ({count} CUDA device(s)): "
                f"use cuda:0..cuda:{count - 1}"
            )
        return torch.device(text)
    raise UserError(f"invalid device '{name}': use auto, cpu, cuda or cuda:N")

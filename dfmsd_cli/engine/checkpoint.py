"""Training-state checkpoints: model, optimizer, AMP scaler, position and RNG states.

Written atomically (temporary file + rename), so a run killed at any moment keeps its last
good checkpoint; ``--resume`` restores the exact position (epoch, step in epoch, iteration)
and the RNG streams, which makes a resumed CPU run bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dfmsd_cli.errors import UserError
from dfmsd_cli.utils.io import atomic_torch_save


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(path: Path, payload: dict[str, Any]) -> None:
    """Save ``payload`` plus the current RNG states, atomically."""
    atomic_torch_save({**payload, "rng": rng_state()}, path)


def load_state(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path} to resume from: drop --resume to start anew")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated or foreign file
        raise UserError(
            f"cannot read checkpoint {path} ({type(exc).__name__}): "
            "remove it and start with --overwrite"
        ) from exc


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP."""
    return model.module if hasattr(model, "module") else model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

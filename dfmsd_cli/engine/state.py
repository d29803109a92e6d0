"""Run state (``last.pth``): model, optimizer, AMP scaler, position and RNG states.

(Model weight files are ``models/checkpoint.py``.)

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
from dfmsd_cli.utils.safe_load import load_pth


def rng_state() -> dict[str, Any]:
    """Every RNG stream as plain tensors, ints and tuples, so it loads with weights_only=True."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),  # (version, tuple of ints, None)
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuples(state["python"]))
    n = state["numpy"]
    keys = np.asarray(n["keys"].numpy(), dtype=np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(x: Any) -> Any:
    """``random.setstate`` wants tuples; keep them tuples after any container round trip."""
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_state(path: Path, payload: dict[str, Any]) -> None:
    """Save ``payload`` plus the current RNG states, atomically."""
    atomic_torch_save({**payload, "rng": rng_state()}, path)


def load_state(path: Path) -> dict[str, Any]:
    """Read a run state with ``weights_only=True``; a foreign or hostile file is refused."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path} to resume from: drop --resume to start anew")
    return load_pth(path, what="run state", fix="remove it and start with --overwrite")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

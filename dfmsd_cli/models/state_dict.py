"""State dicts into models: the detector inside a DDP wrapper, and strict loading whose key or
shape mismatch is a one-line UserError (used by weight files and torchvision's weights)."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from dfmsd_cli.errors import UserError

_SHOW = 3  # keys listed per category in mismatch messages


def unwrap(model: nn.Module) -> nn.Module:
    """The detector inside a DDP / DataParallel wrapper."""
    return getattr(model, "module", model)


def _short(keys: list[str]) -> str:
    head = ", ".join(keys[:_SHOW])
    return head + (f", ... (+{len(keys) - _SHOW})" if len(keys) > _SHOW else "")


def load_state_strict(
    model: nn.Module,
    state: Mapping[str, Tensor],
    source: str,
    target: str | None = None,
    hint: str | None = None,
) -> None:
    """``model.load_state_dict(state)`` with a one-line UserError on any key/shape mismatch.

    ``target`` names the receiving model in the message (default: its name and class count).
    """
    m = unwrap(model)
    if target is None:
        target = f"{m.name} with {m.num_classes} classes"
    own = m.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_short(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_short(unexpected)})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (file vs model: {_short(shapes)})")
        fix = hint or (
            "pass weights of the same model and class count (or convert them with 'dfmsd convert')"
        )
        raise UserError(f"{source} does not fit {target}: {'; '.join(parts)}: {fix}")
    m.load_state_dict(dict(state), strict=True)

"""Learning-rate schedule of MMDetection's 1x/2x configs: linear warm-up, then step decay.

``lr(it, ep) = base_lr * w(it) * gamma ** #{s in steps : ep >= s}`` with the linear warm-up
factor ``w(it) = ratio + (1 - ratio) * it / warmup_iters`` for ``it < warmup_iters``, else 1
(MMDetection ``LinearLR(start_factor=0.001, end=500 iters)`` + ``MultiStepLR([8, 11])`` for 12
epochs). Stateless: a resumed run recomputes the same value from (iteration, epoch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dfmsd_cli.errors import UserError


def default_steps(epochs: int) -> tuple[int, ...]:
    """Decay epochs scaled from MMDetection's 1x (8, 11 of 12) and 2x (16, 22 of 24)."""
    if epochs <= 1:
        return ()
    steps = sorted({max(1, round(epochs * 8 / 12)), max(1, round(epochs * 11 / 12))})
    return tuple(s for s in steps if s < epochs)


@dataclass(frozen=True)
class StepSchedule:
    base_lr: float
    epochs: int
    steps: tuple[int, ...] = field(default=())
    gamma: float = 0.1
    warmup_iters: int = 500
    warmup_ratio: float = 0.001

    def __post_init__(self) -> None:
        if self.base_lr <= 0:
            raise UserError(f"--lr must be positive, got {self.base_lr}")
        if self.epochs < 1:
            raise UserError(f"--epochs must be at least 1, got {self.epochs}")

    @classmethod
    def mmdet(
        cls,
        base_lr: float,
        epochs: int,
        steps: tuple[int, ...] | None = None,
        warmup_iters: int = 500,
    ) -> StepSchedule:
        return cls(
            base_lr,
            epochs,
            tuple(steps) if steps else default_steps(epochs),
            warmup_iters=warmup_iters,
        )

    def lr(self, iteration: int, epoch: int) -> float:
        """Learning rate at global ``iteration`` (0-based) within ``epoch`` (0-based)."""
        decay = self.gamma ** sum(epoch >= s for s in self.steps)
        if self.warmup_iters > 0 and iteration < self.warmup_iters:
            w = self.warmup_ratio + (1 - self.warmup_ratio) * iteration / self.warmup_iters
        else:
            w = 1.0
        return self.base_lr * decay * w

    def apply(self, optimizer: torch.optim.Optimizer, iteration: int, epoch: int) -> float:
        lr = self.lr(iteration, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        return lr


def build_sgd(params, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4):
    """SGD as in MMDetection's detection configs (momentum 0.9, weight decay 1e-4)."""
    return torch.optim.SGD(
        [p for p in params if p.requires_grad], lr=lr, momentum=momentum, weight_decay=weight_decay
    )

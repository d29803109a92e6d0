"""DFMSD's adversarial view: an input perturbation against the teacher's own detection loss.

Paper (Zhang et al., arXiv 2407.13147, §3.4): "Following [63, 64], adversarial examples are
introduced for further mining inconsistent knowledge within the teacher model, which is
conducive to improving the semantic perception capability of the student network [65, 66]" —
no method, budget or loss is given. Our choice (docs/method.md): the fast gradient sign method
(FGSM, Goodfellow et al. ICLR 2015) for ``steps = 1`` and projected gradient descent with sign
steps (PGD, Madry et al. ICLR 2018) for ``steps > 1``, maximising the teacher's detection loss
on the ground truth, on the resized unnormalised image ``x`` (3, h, w) in [0, 255]:

    δ_0 = 0,   δ_{k+1} = clip_{[-ε, ε]}(δ_k + a · sign(∇_x L_det(T(norm(clip_{[0,255]}(x + δ_k))))))
    x_adv = clip_{[0, 255]}(x + δ_K)

with ε and the step ``a`` integers in pixel units (FGSM: a = ε; PGD: a = max(1, ceil(2.5 ε / K)),
Madry et al.'s ratio), so every δ is an integer in [−ε, ε] and is stored exactly as int8
(ε ≤ 127). Replay (:func:`replay`) adds the stored δ to the same ``x`` and clips: bit-identical
to the input the teacher saw, checked against a stored checksum (SHA-256 of the float32 bytes,
as the ME view). The perturbation needs the teacher's gradient, so it cannot be regenerated
without the teacher — hence stored.

The teacher computes its loss in training mode (the head's target assignment needs it) with
every normalisation and dropout-like layer kept in evaluation mode (frozen statistics, no
random drop); the random parts of target assignment (two-stage samplers) draw from a per-image
seed, so the attack is reproducible.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from dfmsd_cli.data.enhance import image_seed, input_checksum
from dfmsd_cli.data.geometry import Geometry, normalize, pad_batch
from dfmsd_cli.errors import UserError

_EVAL_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.Dropout, nn.Dropout2d, nn.Dropout1d)


@dataclass(frozen=True)
class AdvConfig:
    """Budget ``eps`` (pixel units on [0, 255]) and ``steps`` (1: FGSM, > 1: PGD)."""

    eps: int = 4
    steps: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.eps, int) and 1 <= self.eps <= 127):
            raise UserError(
                f"--adv-eps must be an integer number of grey levels in 1..127 (stored exactly "
                f"as int8), got {self.eps}"
            )
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise UserError(f"--adv-steps must be >= 1 (1: FGSM), got {self.steps}")

    @property
    def step_size(self) -> int:
        """FGSM: ε; PGD: ceil(2.5 ε / steps) (Madry et al. 2018), at least 1 grey level."""
        if self.steps == 1:
            return self.eps
        return max(1, math.ceil(2.5 * self.eps / self.steps))

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "step_size": self.step_size,
            "method": "fgsm" if self.steps == 1 else "pgd",
            "loss": "teacher detection loss on the ground truth",
        }


def loss_mode(model: nn.Module) -> nn.Module:
    """Training mode for the detector's loss, evaluation mode for norms and dropout-like layers."""
    model.train()
    for m in model.modules():
        if isinstance(m, _EVAL_LAYERS) or type(m).__name__ in ("DropPath", "StochasticDepth"):
            m.eval()
    return model


def teacher_loss(
    model: nn.Module, raw: Tensor, target: dict[str, Tensor], geometry: Geometry
) -> Tensor:
    """Σ of the detector's training losses on one (3, h, w) [0, 255] image and its targets."""
    x = pad_batch([normalize(raw, geometry)], geometry.pad_divisor)
    out = model(x, [tuple(raw.shape[-2:])], [target])
    return sum(v.float() for v in out.losses.values())


def attack(
    model: nn.Module,
    raw: Tensor,
    target: dict[str, Tensor],
    geometry: Geometry,
    cfg: AdvConfig,
    image_id: int,
) -> Tensor:
    """The int8 perturbation δ (3, h, w) of one image (FGSM / sign-PGD, module docstring).

    ``raw`` is on the teacher's device; the model's mode is restored to eval on return.
    """
    a, eps = cfg.step_size, cfg.eps
    delta = torch.zeros_like(raw)
    loss_mode(model)
    try:
        for _ in range(cfg.steps):
            torch.manual_seed(image_seed(cfg.seed, image_id))  # samplers: same draws each step
            x = (raw + delta).clamp(0, 255).requires_grad_(True)
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(teacher_loss(model, x, target, geometry), x)
            delta = (delta + a * grad.sign()).clamp(-eps, eps)
    finally:
        model.eval()
    return delta.to(torch.int8).cpu()


def replay(raw: Tensor, delta: Tensor) -> Tensor:
    """x_adv = clip(x + δ, 0, 255) on the CPU in float32 (bit-identical to precompute)."""
    x = raw.detach().to("cpu", torch.float32)
    return (x + delta.to("cpu", torch.float32)).clamp_(0, 255)


def regenerate(raw: Tensor, delta: Tensor, checksum: int | None, verify: bool = True) -> Tensor:
    """Replay the stored δ; with ``verify`` compare the input with the stored checksum."""
    x = replay(raw, delta)
    if verify and checksum is not None and input_checksum(x) != int(checksum):
        raise UserError(
            "the adversarial input differs from the one the teacher saw at precompute time: use "
            "the same data, geometry and dfmsd/torch versions, or precompute the 'adv' view again"
        )
    return x

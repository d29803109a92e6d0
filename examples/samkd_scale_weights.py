"""Measure SFD's per-scale losses, its cost against DFM, and where learnable scale weights go.

Fixed random tensors (not a detector): a 64-channel 2×50×68 level, the second image letterboxed
(valid 40×55). Prints L^g per grid with and without ``pool``, forward + backward time per level
(DFM, SFD, SFD with pool; one thread), and the softmax scale weights ω after SGD steps on
α·L_SFD (α = 5e-5, lr 0.01, momentum 0.9, pool on). docs/method.md (SAMKD) quotes the output.

Usage: python examples/samkd_scale_weights.py [STEPS]
"""

from __future__ import annotations

import sys
import time

import torch

from dfmsd_cli.distill.losses import DualMaskingLevel, SFDLevel


def main(steps: int = 300) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    b, c, h, w = 2, 64, 50, 68
    s = torch.randn(b, c, h, w)
    t = torch.randn(b, c, h, w).abs() * torch.rand(1, 1, h, w) * 3
    valid = torch.ones(b, h, w, dtype=torch.bool)
    valid[1, 40:, :] = False
    valid[1, :, 55:] = False
    for pool in (False, True):
        with torch.no_grad():
            losses = SFDLevel(c, c, pool=pool).scale_losses(s, t, valid)
        print(f"pool={pool}: L^g for grids 1, 2, 4 =", [round(float(x)) for x in losses])
    for name, mod in (
        ("dfm", DualMaskingLevel(c, c)),
        ("sfd", SFDLevel(c, c)),
        ("sfd pool", SFDLevel(c, c, pool=True)),
    ):
        x = s.clone().requires_grad_()
        mod(x, t, valid).backward()  # warm-up
        t0 = time.perf_counter()
        for _ in range(5):
            mod(x, t, valid).backward()
        print(f"{name}: forward+backward {(time.perf_counter() - t0) / 5 * 1000:.0f} ms")
    level = SFDLevel(c, c, scale_weights="learnable", pool=True)
    opt = torch.optim.SGD(level.parameters(), lr=0.01, momentum=0.9)
    for i in range(steps + 1):
        loss = 5e-5 * level(s, t, valid)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i % 100 == 0:
            omega = [round(float(x), 3) for x in level.scale_weights().detach()]
            print(f"step {i}: omega = {omega}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 300)

"""The one attention-statistics function: by hand, and equal to the bit to what the store wrote."""

from __future__ import annotations

import pytest
import torch

from dfmsd_cli.distill.losses import common
from dfmsd_cli.store.statistics import raw_statistics, teacher_statistics


def test_raw_statistics_by_hand():
    f = torch.tensor([[[[1.0, -3.0], [0.0, 2.0]], [[-2.0, 5.0], [4.0, -6.0]]]])  # (1, 2, 2, 2)
    spatial, channel = raw_statistics(f)
    # spatial: mean over the 2 channels of |F| per cell
    assert torch.equal(spatial, torch.tensor([[[1.5, 4.0], [2.0, 4.0]]]))
    # channel: mean over the 4 cells of |F| per channel: (1+3+0+2)/4, (2+5+4+6)/4
    assert torch.equal(channel, torch.tensor([[1.5, 4.25]]))
    valid = torch.tensor([[[True, False], [True, False]]])  # left column only
    spatial, channel = raw_statistics(f, valid)
    assert torch.equal(spatial, torch.tensor([[[1.5, 0.0], [2.0, 0.0]]]))
    assert torch.equal(channel, torch.tensor([[0.5, 3.0]]))  # (1+0)/2, (2+4)/2


@pytest.mark.parametrize("shape", [(256, 25, 38), (3, 1, 7), (17, 13, 4), (64, 100, 67)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_equal_to_the_bit_to_the_stores_former_formula(shape, dtype):
    """Before there was one function, the writer computed ``|F|.mean(0)`` and
    ``|F|.mean((1, 2))`` of each (C, h, w) map: the stored att_s/att_c must not change."""
    f = (torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape))) * 7).to(dtype)
    a = f.float().abs()
    spatial, channel = raw_statistics(f[None])
    assert torch.equal(spatial[0], a.mean(dim=0))
    assert torch.equal(channel[0], a.mean(dim=(1, 2)))


def test_losses_use_the_same_function():
    assert common.raw_statistics is raw_statistics


def test_gradient_reaches_the_feature():
    f = torch.randn(2, 3, 4, 5, requires_grad=True)
    spatial, channel = raw_statistics(f, torch.rand(2, 4, 5) > 0.3)
    (spatial.sum() + channel.sum()).backward()
    assert f.grad is not None and bool(f.grad.abs().sum() > 0)


def test_teacher_statistics_of_a_batch_equal_each_images_own_to_the_bit():
    """precompute computes them once per teacher batch (store/teacher_pass.py); the writer
    computed them per image before: the stored att_s/att_c must not change."""
    f = torch.randn(3, 64, 13, 21, generator=torch.Generator().manual_seed(0)) * 5
    f[1, 7, 2, 3] = -70000.0
    spatial, channel, peak = teacher_statistics(f)
    for b in range(3):
        sp, ch = raw_statistics(f[b][None])
        assert torch.equal(spatial[b], sp[0]) and torch.equal(channel[b], ch[0])
    assert torch.equal(peak, f.abs().flatten(1).amax(dim=1)) and float(peak[1]) == 70000.0
    f[0, 0, 0, 0], f[2, 1, 1, 1] = float("nan"), float("-inf")
    peak = teacher_statistics(f)[2]
    assert peak[0].isnan() and peak[2] == float("inf") and peak[1] == 70000.0

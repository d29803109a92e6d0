"""DDP over the distillation module (student + per-stage losses): two CPU processes (gloo) give
the average of the two per-process gradients, random masks included."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

LEVELS = (8, 16, 32, 64, 128)


def _setup(seed: int):
    from dfmsd_cli.distill.methods import build_stage_losses, method_config
    from dfmsd_cli.distill.model import DistillModel
    from dfmsd_cli.models import build_model

    torch.manual_seed(0)
    student = build_model("retina_tiny", num_classes=3)
    cfg = method_config("dfmsd", "retina_tiny")
    losses = build_stage_losses(cfg, list(LEVELS), student.out_channels, 32, with_me=True)
    return DistillModel(student, losses, cfg).train()


def _batch(rank: int) -> tuple:
    g = torch.Generator().manual_seed(100 + rank)
    images = torch.randn(2, 3, 64, 96, generator=g)
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]) + rank, "labels": torch.tensor([1 + b])}
        for b in range(2)
    ]
    from dfmsd_cli.store.batch import TeacherBatch, TeacherView

    view = TeacherView({}, {}, {}, {})
    for s in LEVELS:
        h, w = -(-64 // s), -(-96 // s)
        f = torch.randn(2, 32, h, w, generator=g)
        view.features[s] = f
        view.valid[s] = torch.ones(2, h, w, dtype=torch.bool)
        view.att_spatial[s] = f.abs().mean(1)
        view.att_channel[s] = f.abs().mean((2, 3))
    teacher = TeacherBatch({"main": view, "me": view}, {"me": images.flip(-1)})
    return images, [(64, 96), (60, 90)], targets, teacher


def _grads(model, rank: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(1000 + rank)  # each process draws its own masks
    images, sizes, targets, teacher = _batch(rank)
    losses = model(images, sizes, targets, teacher)
    sum(losses.values()).backward()
    return {n: p.grad.clone() for n, p in _named(model) if p.grad is not None}


def _named(model):
    return getattr(model, "module", model).named_parameters()


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    ddp = torch.nn.parallel.DistributedDataParallel(_setup(0), find_unused_parameters=True)
    grads = _grads(ddp, rank)
    if rank == 0:
        torch.save(grads, out)
    dist.destroy_process_group()


@pytest.mark.slow  # spawns two interpreters
def test_ddp_two_processes_average_gradients(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(tmp_path / "ddp.pt")
    mp.start_processes(_worker, args=(port, out), nprocs=2, start_method="spawn", join=True)
    ddp = torch.load(out)
    per_rank = [_grads(_setup(0), r) for r in (0, 1)]
    assert ddp.keys() == per_rank[0].keys()
    assert any(k.startswith("losses.") for k in ddp)  # generation blocks are synchronised too
    for k, g in ddp.items():
        expected = (per_rank[0][k] + per_rank[1][k]) / 2
        assert torch.allclose(g, expected, rtol=1e-4, atol=1e-6), k
    assert any(not torch.allclose(per_rank[0][k], per_rank[1][k]) for k in ddp)

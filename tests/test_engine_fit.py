"""``engine.fit`` with a toy task (a linear model, ten samples): the non-finite rule, the
max-steps stop and bit-exact resume, the save interval, the evaluation hook, the clock."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from dfmsd_cli.engine import fit as fit_mod
from dfmsd_cli.engine.distributed import DistInfo
from dfmsd_cli.engine.fit import FitOptions, Task, fit
from dfmsd_cli.engine.progress import MetricsLog
from dfmsd_cli.engine.sampler import ViewSampler
from dfmsd_cli.engine.state import load_state, seed_everything
from dfmsd_cli.errors import UserError

N = 10  # samples; batch 2 -> 5 steps per epoch


class Toy(Task):
    """y = w·x + b by MSE, with input noise from the global RNG (so resume must restore it)."""

    tag = label = "toy"
    weight_flags = "--toy-weight"

    def __init__(self, nan_at: int | None = None) -> None:
        self.nan_at = nan_at  # 0-based iteration whose loss is NaN
        self.evaluated = 0

    def build(self, device, dist) -> None:
        seed_everything(0)
        self.model = nn.Linear(3, 1)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(N, 3, generator=g)
        self.dataset = [{"x": x[i], "y": x[i].sum(0, keepdim=True)} for i in range(N)]
        self.sampler = ViewSampler(N, 1, shuffle=True, seed=3)
        self.collate_fn = lambda items: {k: torch.stack([s[k] for s in items]) for k in items[0]}

    def restore(self, state) -> None:
        self.model.load_state_dict(state["state_dict"])

    def step(self, model, batch, ctx):
        x = batch["x"] + 0.1 * torch.randn_like(batch["x"])
        loss = nn.functional.mse_loss(model(x), batch["y"])
        if ctx.iteration == self.nan_at:
            loss = loss * float("nan")
        if torch.isfinite(loss):
            ctx.scaler.scale(loss).backward()
        return {"loss_toy": float(loss.detach()), "loss": float(loss.detach())}, loss

    def payload(self, done: bool):
        return {"kind": "toy", "state_dict": self.model.state_dict(), "done": done}

    def log_fields(self):
        return {"task": "toy"}

    def evaluate(self):
        self.evaluated += 1
        return {"mse": 0.5}


def _run(out, task=None, state=None, clock=None, **kw):
    task = task or Toy()
    opts = FitOptions(out=out, epochs=2, batch_size=2, lr=0.05, warmup_iters=2, **kw)
    extra = {"clock": clock} if clock else {}
    out.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(out / "metrics.jsonl")
    summary = fit(
        task, opts, device=torch.device("cpu"), dist=DistInfo(), log=log, state=state, **extra
    )
    return task, summary


def _resume(out, **kw):
    return _run(out, state=load_state(out / "last.pth"), **kw)


def test_non_finite_loss_names_place_parts_checkpoint_and_fix(tmp_path):
    with pytest.raises(UserError) as err:
        _run(tmp_path / "a", Toy(nan_at=2))
    msg = str(err.value)
    assert msg.startswith("toy: loss became nan at epoch 1 step 3 (parts: toy=nan loss=nan)")
    assert "no checkpoint was written yet" in msg
    assert "lower --lr or the loss weights (--toy-weight) or set --grad-clip" in msg
    assert msg.endswith("then --resume (or start anew with --overwrite)")
    assert not (tmp_path / "a" / "last.pth").exists()
    # with a checkpoint every step, the last good one is named and left as it was
    out = tmp_path / "b"
    with pytest.raises(UserError, match=r"the last good checkpoint .*last\.pth is kept"):
        _run(out, Toy(nan_at=6), save_interval=1)
    state = load_state(out / "last.pth")
    assert (state["epoch"], state["step"], state["iteration"]) == (1, 1, 6)


@pytest.mark.parametrize("stop", [3, 5, 7])  # mid-epoch 1, at the epoch end, mid-epoch 2
def test_max_steps_stop_then_resume_equals_uninterrupted(tmp_path, stop):
    full, s_full = _run(tmp_path / "full")
    assert s_full["complete"] and not s_full["stopped"] and s_full["iterations"] == 10
    part, first = _run(tmp_path / "part", max_steps=stop)
    assert first["stopped"] and not first["complete"] and first["iterations"] == stop
    assert part.evaluated == 0 and "val" not in first  # evaluation only after the last epoch
    state = load_state(tmp_path / "part" / "last.pth")
    expected = (stop // 5, stop % 5, stop)  # an epoch-end stop is an ordinary epoch end
    assert (state["epoch"], state["step"], state["iteration"]) == expected
    resumed, second = _resume(tmp_path / "part")
    assert second["complete"] and second["steps_this_run"] == 10 - stop
    assert resumed.evaluated == 1 and second["val"] == {"mse": 0.5}
    a = load_state(tmp_path / "full" / "last.pth")
    b = load_state(tmp_path / "part" / "last.pth")
    assert a["done"] and b["done"] and (b["epoch"], b["iteration"]) == (2, 10)
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    for k, v in a["optimizer"]["state"].items():
        assert torch.equal(v["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


def test_save_interval_epoch_and_final_checkpoints(tmp_path, monkeypatch):
    saved: list[tuple] = []
    real = fit_mod.save_state

    def record(path, payload):
        saved.append((payload["epoch"], payload["step"], payload["iteration"], payload["done"]))
        real(path, payload)

    monkeypatch.setattr(fit_mod, "save_state", record)
    _run(tmp_path / "run", save_interval=2)
    assert saved == [
        (0, 2, 2, False),
        (0, 4, 4, False),
        (1, 0, 5, False),  # epoch end
        (1, 1, 6, False),
        (1, 3, 8, False),
        (1, 5, 10, False),
        (2, 0, 10, True),  # the final checkpoint replaces the last epoch's
    ]


def test_metrics_log_and_injected_clock(tmp_path):
    ticks = iter(range(10**6))
    _, s = _run(tmp_path / "run", clock=lambda: float(next(ticks)))
    # every clock reading is a tick: the data wait and the optimizer step each span one
    assert s["split_seconds_per_step"] == {"data": 1.0, "optimizer": 1.0}
    assert s["seconds"] == int(s["seconds"]) > 0
    records = [
        json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().split("\n") if x
    ]
    train = [r for r in records if r["phase"] == "train"]
    assert [r["iteration"] for r in train] == [5, 10]  # every 10th iteration and epoch ends
    assert all(r["task"] == "toy" and "loss_toy" in r for r in train)
    assert records[-1] == {**records[-1], "phase": "val", "task": "toy", "epoch": 2, "mse": 0.5}

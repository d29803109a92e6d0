"""Engine pieces without data or models: schedule, sampler, run folders, config files."""

from __future__ import annotations

import json

import pytest
import torch

from dfmsd_cli.engine.rundir import prepare_run_dir, write_config
from dfmsd_cli.engine.sampler import ViewSampler
from dfmsd_cli.engine.schedule import StepSchedule, default_steps
from dfmsd_cli.errors import UserError


def test_default_steps_match_mmdet_1x_and_2x():
    assert default_steps(12) == (8, 11)
    assert default_steps(24) == (16, 22)
    assert default_steps(1) == ()


def test_schedule_warmup_and_decay_values():
    s = StepSchedule(base_lr=0.02, epochs=12, steps=(8, 11), warmup_iters=500, warmup_ratio=0.001)
    assert s.lr(0, 0) == pytest.approx(0.02 * 0.001)
    # half-way through warm-up: ratio + (1 - ratio) * 0.5
    assert s.lr(250, 0) == pytest.approx(0.02 * (0.001 + 0.999 * 0.5))
    assert s.lr(500, 0) == pytest.approx(0.02)
    assert s.lr(10_000, 7) == pytest.approx(0.02)
    assert s.lr(10_000, 8) == pytest.approx(0.002)
    assert s.lr(10_000, 11) == pytest.approx(0.0002)


def test_schedule_applies_to_optimizer():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    s = StepSchedule(base_lr=0.1, epochs=2, steps=(1,), warmup_iters=0)
    assert s.apply(opt, 0, 1) == pytest.approx(0.01)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)


def test_schedule_rejects_bad_values():
    with pytest.raises(UserError, match="--lr"):
        StepSchedule(base_lr=0, epochs=1)


def test_sampler_is_deterministic_and_draws_views():
    a = ViewSampler(10, num_views=2, seed=3)
    b = ViewSampler(10, num_views=2, seed=3)
    a.set_epoch(4)
    b.set_epoch(4)
    order = a.order()
    assert order == b.order()
    assert sorted(i // 2 for i in order) == list(range(10))  # every image once per epoch
    assert {i % 2 for i in order} == {0, 1}  # both views drawn
    b.set_epoch(5)
    assert b.order() != order


def test_sampler_resume_skips_done_items():
    s = ViewSampler(9, seed=1)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start=4)
    assert list(s) == full[4:]
    assert len(s) == 5


def test_sampler_ranks_partition_the_epoch():
    ranks = [ViewSampler(7, seed=0, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.set_epoch(0)
    items = ranks[0].order() + ranks[1].order()
    assert len(ranks[0].order()) == len(ranks[1].order()) == 4
    assert set(items) == set(range(7))


def test_resume_without_run_state_warns_in_one_line(tmp_path, capsys):
    """MMEngine's resume=True: no checkpoint in the folder -> a new run (here: said loudly)."""
    out = tmp_path / "new"
    assert prepare_run_dir(out, "train", {"model": "a"}, resume=True, overwrite=False) is False
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: --resume:") and "no last.pth" in err
    assert prepare_run_dir(out, "train", {"model": "a"}, resume=False, overwrite=False) is False
    assert capsys.readouterr().err == ""  # no warning without --resume


def test_run_dir_accepts_the_same_folder_named_two_ways(tmp_path, monkeypatch):
    out, data = tmp_path / "run", tmp_path / "data"
    data.mkdir()
    prepare_run_dir(out, "train", {"data": str(data)}, resume=False, overwrite=False)
    write_config(out, {"data": str(data)}, "train")
    monkeypatch.chdir(tmp_path)
    assert prepare_run_dir(out, "train", {"data": "data"}, resume=True, overwrite=False) is False
    (tmp_path / "other").mkdir()
    with pytest.raises(UserError, match="data="):
        prepare_run_dir(out, "train", {"data": "other"}, resume=True, overwrite=False)


def test_run_dir_refuses_a_different_run(tmp_path):
    out = tmp_path / "run"
    assert prepare_run_dir(out, "train", {"model": "a"}, resume=False, overwrite=False) is False
    write_config(out, {"model": "a"}, "train")
    with pytest.raises(UserError, match="--resume"):
        prepare_run_dir(out, "train", {"model": "a"}, resume=False, overwrite=False)
    with pytest.raises(UserError, match="model='a'"):
        prepare_run_dir(out, "train", {"model": "b"}, resume=True, overwrite=False)
    with pytest.raises(UserError, match="'train' run"):
        prepare_run_dir(out, "distill", {"model": "a"}, resume=True, overwrite=False)
    # same run, no checkpoint yet: resumable folder but nothing to load
    assert prepare_run_dir(out, "train", {"model": "a"}, resume=True, overwrite=False) is False
    (out / "last.pth").write_bytes(b"x")
    assert prepare_run_dir(out, "train", {"model": "a"}, resume=True, overwrite=False) is True
    assert prepare_run_dir(out, "train", {"model": "b"}, resume=False, overwrite=True) is False
    assert list(out.iterdir()) == []


def test_write_config_is_json(tmp_path):
    path = write_config(tmp_path, {"a": (1, 2), "p": tmp_path}, "train")
    data = json.loads(path.read_text())
    assert data == {"command": "train", "options": {"a": [1, 2], "p": str(tmp_path)}}

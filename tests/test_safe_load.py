"""No ``.pth`` file can run code: every entry point that reads weights or a run state refuses a
hostile pickle with one line (exit 2) and never runs its payload; ``--trust-checkpoint`` is an
explicit, warned opt-in; what dfmsd writes itself loads with ``weights_only=True``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import _cli

from dfmsd_cli.cli import main
from dfmsd_cli.errors import UserError
from dfmsd_cli.utils.safe_load import load_pth, set_trust

SCALE = ["--img-scale", "128,96"]
FAST = ["--batch-size", "2", "--num-workers", "0", "--device", "cpu", "--no-eval"]


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: the file exists iff the payload ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _hostile(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {"w": torch.zeros(2)}, "meta": _Payload(marker)}, path)
    return path


@pytest.fixture(autouse=True)
def _untrusted():
    set_trust(False)
    yield
    set_trust(False)


def _exit(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and the one ``error:`` line (progress/info output also goes to stderr)."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    return int(info.value.code or 0), "\n".join(lines)


def _run(argv: list[str]) -> None:
    assert _cli(argv) == 0, f"{argv} failed"


@pytest.fixture(scope="module")
def env(synthetic_root, tiny_cache, tmp_path_factory) -> dict:
    """The session's tiny retina_tiny store, a finished train run and a finished distill run."""
    tmp = tmp_path_factory.mktemp("safe")
    root = str(synthetic_root)
    cache = tiny_cache
    train_out = tmp / "train"
    _run(
        [
            "train",
            "--model",
            "retina_tiny",
            "--data",
            root,
            "--out",
            str(train_out),
            *SCALE,
            *FAST,
            "--epochs",
            "1",
            "--max-steps",
            "1",
        ]
    )
    distill_out = tmp / "distill"
    _run(
        [
            "distill",
            "--student",
            "retina_tiny",
            "--stages",
            "retina_tiny",
            "--method",
            "mgd",
            "--data",
            root,
            "--cache",
            str(cache),
            "--out",
            str(distill_out),
            *SCALE,
            *FAST,
            "--epochs",
            "1",
            "--max-steps",
            "1",
        ]
    )
    store = cache / "retina_tiny" / "train2017.zarr"
    return {
        "root": root,
        "cache": cache,
        "store": store,
        "train": train_out,
        "distill": distill_out,
    }


def _entry_points(env: dict, w: str, tmp: Path) -> dict[str, list[str]]:
    root, cache = env["root"], str(env["cache"])
    return {
        "eval CKPT": ["eval", w, "--data", root, *SCALE, "--device", "cpu"],
        "eval --weights": [
            "eval",
            "--model",
            "retina_tiny",
            "--weights",
            w,
            "--data",
            root,
            *SCALE,
            "--device",
            "cpu",
        ],
        "train --weights": [
            "train",
            "--model",
            "retina_tiny",
            "--weights",
            w,
            "--data",
            root,
            "--out",
            str(tmp / "t"),
            *SCALE,
            *FAST,
            "--max-steps",
            "1",
        ],
        "precompute --weights": [
            "precompute",
            "--teacher",
            "retina_tiny",
            "--weights",
            w,
            "--data",
            root,
            "--cache",
            str(tmp / "c"),
            *SCALE,
            "--num-workers",
            "0",
            "--device",
            "cpu",
        ],
        "distill --weights": [
            "distill",
            "--student",
            "retina_tiny",
            "--stages",
            "retina_tiny",
            "--method",
            "mgd",
            "--weights",
            w,
            "--data",
            root,
            "--cache",
            cache,
            "--out",
            str(tmp / "d"),
            *SCALE,
            *FAST,
            "--max-steps",
            "1",
        ],
        "distill --teacher-weights": [
            "distill",
            "--student",
            "retina_tiny",
            "--stages",
            "retina_tiny",
            "--method",
            "mgd",
            "--online",
            "--teacher-weights",
            w,
            "--data",
            root,
            "--out",
            str(tmp / "o"),
            *SCALE,
            *FAST,
            "--max-steps",
            "1",
        ],
        "cache verify --weights": ["cache", "verify", str(env["store"]), "--weights", w],
    }


@pytest.mark.slow
def test_every_entry_point_refuses_a_hostile_pickle(env, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    w = str(_hostile(tmp_path / "hostile.pth", marker))
    for name, argv in _entry_points(env, w, tmp_path).items():
        code, err = _exit(argv, capsys)
        assert code == 2, f"{name}: exit {code}: {err}"
        assert len(err.splitlines()) == 1 and "refused" in err, f"{name}: {err}"
        assert "--trust-checkpoint" in err and "convert mmdet" in err, name
        assert not marker.exists(), f"{name} ran the payload"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["train", "distill"])
def test_resume_refuses_a_replaced_run_state(env, kind, tmp_path, capsys):
    import shutil

    marker = tmp_path / "PWNED"
    out = tmp_path / kind
    shutil.copytree(env[kind], out)
    _hostile(out / "last.pth", marker)
    root = env["root"]
    if kind == "train":
        argv = [
            "train",
            "--model",
            "retina_tiny",
            "--data",
            root,
            "--out",
            str(out),
            *SCALE,
            *FAST,
            "--epochs",
            "1",
            "--resume",
        ]
    else:
        argv = [
            "distill",
            "--student",
            "retina_tiny",
            "--stages",
            "retina_tiny",
            "--method",
            "mgd",
            "--data",
            root,
            "--cache",
            str(env["cache"]),
            "--out",
            str(out),
            *SCALE,
            *FAST,
            "--epochs",
            "1",
            "--resume",
        ]
    code, err = _exit(argv, capsys)
    assert code == 2 and "refused" in err and len(err.splitlines()) == 1, err
    assert not marker.exists()


@pytest.mark.slow
def test_own_files_load_with_weights_only(env):
    """Checkpoints, run states (RNG streams included) and students are plain containers."""
    files = [*env["train"].glob("*.pth"), *env["distill"].glob("*.pth")]
    assert any(f.name == "last.pth" for f in files) and len(files) >= 3
    for f in files:
        torch.load(f, map_location="cpu", weights_only=True)  # raises if anything is not plain


def test_hostile_pickle_refused_in_process(tmp_path):
    marker = tmp_path / "PWNED"
    path = _hostile(tmp_path / "h.pth", marker)
    with pytest.raises(UserError, match="refused.*io.open"):
        load_pth(path)
    assert not marker.exists()


def test_trust_is_explicit_and_warned(tmp_path, capsys):
    """A numpy scalar in the metadata (as MMEngine writes) loads only with the opt-in."""
    path = tmp_path / "np.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}, "meta": {"epoch": np.int64(3)}}, path)
    with pytest.raises(UserError, match="--trust-checkpoint"):
        load_pth(path)
    set_trust(True)
    assert os.environ.get("DFMSD_TRUST_CHECKPOINT") == "1"  # inherited by worker processes
    obj = load_pth(path)
    assert int(obj["meta"]["epoch"]) == 3 and torch.equal(obj["state_dict"]["w"], torch.ones(1))
    assert "warning: --trust-checkpoint" in capsys.readouterr().err


def test_truncated_file_is_one_line(tmp_path):
    path = tmp_path / "t.pth"
    torch.save({"w": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError, match="cannot read run state .*start with --overwrite"):
        load_pth(path, what="run state", fix="remove it and start with --overwrite")


def test_trust_flag_is_accepted_anywhere(monkeypatch):
    import dfmsd_cli.cli as cli

    seen = {}

    def app(args, prog_name):
        from dfmsd_cli.utils.safe_load import trusted

        seen["args"], seen["trust"] = args, trusted()

    monkeypatch.setattr(cli, "app", app)
    cli.main(["eval", "x.pth", "--trust-checkpoint"])
    assert seen == {"args": ["eval", "x.pth"], "trust": True}


def test_convert_mmdet_keeps_tensors_and_never_runs_the_payload(tmp_path):
    """MMEngine pickles objects into ``meta``: conversion maps every foreign global to an inert
    stand-in under weights_only=True, so a payload there is dropped, not run."""
    from dfmsd_cli.models.convert.mmdet import load_mmdet_checkpoint

    marker = tmp_path / "PWNED"
    path = tmp_path / "mm.pth"
    sd = {"backbone.conv1.weight": torch.ones(2, 3, 1, 1)}
    torch.save({"state_dict": sd, "meta": {"hook": _Payload(marker), "epoch": np.int64(12)}}, path)
    state, meta = load_mmdet_checkpoint(path)
    assert torch.equal(state["backbone.conv1.weight"], sd["backbone.conv1.weight"])
    assert set(meta) == {"hook", "epoch"} and not marker.exists()

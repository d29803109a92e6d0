"""Run folders are locked for a run's lifetime: a second train/distill into the same --out is
refused (exit 2, one line naming the holder), a lock left by a killed run is taken over."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import _cli

from dfmsd_cli.engine.rundir import LOCK_FILE, prepare_run_dir, run_lock, write_config
from dfmsd_cli.errors import UserError
from dfmsd_cli.utils.lock import holder_record


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    return int(done.stdout)


def test_a_second_holder_is_refused_and_the_lock_released(tmp_path):
    out = tmp_path / "run"
    with run_lock(out) as path:
        assert path == out / LOCK_FILE and json.loads(path.read_text())["pid"] > 0
        with pytest.raises(UserError) as info, run_lock(out):
            pass
        msg = str(info.value)
        assert f"run folder {out} is in use by pid" in msg and "another --out" in msg
        assert str(path) in msg and "\n" not in msg
        assert path.is_file()  # the refused attempt left the holder's lock alone
    assert not (out / LOCK_FILE).exists()


def test_a_dead_holders_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stale = {**holder_record(), "pid": _dead_pid()}
    (out / LOCK_FILE).write_text(json.dumps(stale))
    with run_lock(out) as path:
        assert json.loads(path.read_text())["pid"] != stale["pid"]


def test_an_unreadable_lock_is_respected_while_fresh(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text("")  # its creator is writing it right now
    with pytest.raises(UserError, match="in use by another process"), run_lock(out):
        pass


def test_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        run_lock(tmp_path / "f")


def test_overwrite_keeps_the_lock_of_the_run_that_overwrites(tmp_path):
    out = tmp_path / "run"
    with run_lock(out):
        write_config(out, {"model": "a"}, "train")
        (out / "sub").mkdir()
        prepare_run_dir(out, "train", {"model": "a"}, resume=False, overwrite=True)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]


@pytest.mark.parametrize("command", ["train", "distill"])
def test_cli_refuses_an_out_in_use(command, synthetic_root, tiny_cache, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    # a live holder: this very test process, as another dfmsd run would record itself
    (out / LOCK_FILE).write_text(json.dumps(holder_record()))
    common = ["--data", str(synthetic_root), "--out", str(out), "--img-scale", "128,96",
              "--num-workers", "0", "--device", "cpu", "--no-eval", "--max-steps", "1"]  # fmt: skip
    if command == "train":
        argv = ["train", "--model", "retina_tiny", *common]
    else:
        argv = ["distill", "--student", "retina_tiny", "--stages", "retina_tiny", "--cache",
                str(tiny_cache), *common]  # fmt: skip
    assert _cli(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is in use by pid" in errors[0] and "Traceback" not in err
    assert sorted(p.name for p in Path(out).iterdir()) == [LOCK_FILE]  # nothing written

"""Parse-time checks of count/size options, and the CLI boundary: one line and exit 2 for
operating-system faults (traceback with --debug), --resume without state, --max-steps."""

from __future__ import annotations

import pytest

from dfmsd_cli.cli import app, checks, main


def _main(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@pytest.mark.parametrize(
    "argv,flag",
    [
        ("train -m T --out {out} --batch-size 0", "--batch-size"),
        ("train -m T --out {out} --epochs 0", "--epochs"),
        ("train -m T --out {out} --num-workers -1", "--num-workers"),
        ("train -m T --out {out} --steps 8,0", "--steps"),
        ("train -m T --out {out} --img-scale 0,800", "--img-scale"),
        ("distill -s T --out {out} --epochs 12,0", "--epochs"),
        ("distill -s T --out {out} --max-steps 0", "--max-steps"),
        ("precompute -t T --cache {tmp} --topk 0", "--topk"),
        ("precompute -t T --cache {tmp} --block 0", "--block"),
        ("precompute -t T --cache {tmp} --levels 8,x", "--levels"),
        ("precompute -t T --cache {tmp} --max-images 0", "--max-images"),
        ("eval --model T --batch-size 0", "--batch-size"),
        ("make-data synthetic --out {tmp}/d --num-images 0", "--num-images"),
        ("demo --out {tmp}/demo --num-images 0", "--num-images"),
        ("bench distill --data {tmp} --num-steps 0", "--num-steps"),
        ("train -m T --out {out} --lr -1", "--lr"),
        ("distill -s T --out {out} --alpha -2", "--alpha"),
        ("precompute -t T --cache {tmp} --score-thr 1.5", "--score-thr"),
    ],
)
def test_bad_count_is_one_line_exit_2_before_any_work(argv, flag, tmp_path, capsys):
    sub = {"{out}": str(tmp_path / "r"), "{tmp}": str(tmp_path), "T": "retina_tiny"}
    argv = [sub.get(a, a).replace("{tmp}", str(tmp_path)) for a in argv.split()]
    assert _main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"error: {flag} must be"), err
    assert list(tmp_path.iterdir()) == []  # nothing was written


def test_config_file_values_pass_the_same_check(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[train]\nbatch-size = 0\n")
    argv = ["train", "-m", "retina_tiny", "--out", str(tmp_path / "r"), "--config", str(cfg)]
    assert _main(argv) == 2
    assert "--batch-size must be at least 1" in capsys.readouterr().err


def test_every_integer_option_is_classified():
    """A new int option must be declared a count (with its minimum) or explicitly not one;
    a distillation method's own option is checked by its registered ``check`` instead."""
    from dfmsd_cli.distill.methods import all_options

    by_method = {n for n, o in all_options().items() if o.check is not None}
    unclassified = sorted(
        f"{cmd} --{name}"
        for cmd, name, base, _ in checks.iter_options(app)
        if base is int
        and name not in checks.COUNTS
        and name not in checks.NOT_COUNTS
        and name not in by_method
    )
    assert unclassified == []
    floats = sorted(
        f"{cmd} --{name}"
        for cmd, name, base, _ in checks.iter_options(app)
        if base is float
        and name not in checks.FLOATS
        and name not in checks.FLOATS_CHECKED_ELSEWHERE
        and name not in by_method
    )
    assert floats == []
    attached = [
        (cmd, name)
        for cmd, name, base, opt in checks.iter_options(app)
        if opt.callback is None
        and (
            (name in checks.COUNTS and base in (int, str))
            or (name in checks.FLOATS and base is float)
        )
    ]
    assert attached == []


def test_check_count_accepts_valid_values():
    checks.check_count("--epochs", "12,12", 1, "epochs")
    checks.check_count("--num-workers", 0, 0, "workers")
    checks.check_count("--max-steps", None, 1, "steps")
    with pytest.raises(Exception, match="--epochs is empty"):
        checks.check_count("--epochs", ",", 1, "epochs")


def test_resume_without_state_warns_and_max_steps_writes_student(synthetic_root, tmp_path, capsys):
    """From the CLI: --resume into a new folder says so in one line and starts anew (like
    MMEngine's resume=True); a run stopped by --max-steps still writes student.pth."""
    out = tmp_path / "run"
    argv = [
        "distill", "--student", "retina_tiny", "--method", "none", "--data", str(synthetic_root),
        "--out", str(out), "--epochs", "2", "--max-steps", "1", "--num-workers", "0",
        "--device", "cpu", "--img-scale", "96,64", "--no-eval", "--resume",
    ]  # fmt: skip
    assert _main(argv) == 0
    err = capsys.readouterr().err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning: --resume")]
    assert len(warnings) == 1 and str(out) in warnings[0] and "starting a new run" in warnings[0]
    assert (out / "student.pth").is_file() and (out / "last.pth").is_file()


def test_debug_shows_the_traceback_of_an_os_error(monkeypatch, tmp_path):
    import errno

    import dfmsd_cli.cli as cli
    from dfmsd_cli.cli.app import STATE

    def app(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path))

    monkeypatch.setattr(cli, "app", app)
    monkeypatch.setitem(STATE, "debug", False)
    with pytest.raises(SystemExit):
        cli.main(["train"])
    with pytest.raises(OSError):
        cli.main(["train", "--debug"])


def test_full_disk_in_the_run_folder_keeps_last_checkpoint_and_resumes(
    synthetic_root, tmp_path, monkeypatch, capsys
):
    """ENOSPC while train writes its run folder: one line naming the file and the free space;
    the previous last.pth stays intact (atomic writes) and --resume finishes the run."""
    import errno
    import os

    import torch

    out = tmp_path / "run"
    argv = [
        "train", "-m", "retina_tiny", "--data", str(synthetic_root), "--out", str(out),
        "--epochs", "1", "--max-steps", "3", "--save-interval", "1", "--num-workers", "0",
        "--device", "cpu", "--img-scale", "96,64", "--no-eval", "--batch-size", "4",
    ]  # fmt: skip
    real, calls = os.fsync, [0]

    def fsync(fd):
        calls[0] += 1
        if calls[0] >= 3:  # config.json and the step-1 last.pth are written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert _main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no space left on the device of ") and "free)" in err[-1]
    assert str(out / "last.pth") in err[-1] and "Traceback" not in "".join(err)
    state = torch.load(out / "last.pth", map_location="cpu", weights_only=True)
    assert state["iteration"] == 1  # the last good checkpoint is intact
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # no partial file left
    monkeypatch.undo()
    assert _main([*argv, "--resume"]) == 0
    assert torch.load(out / "last.pth", map_location="cpu", weights_only=True)["iteration"] == 3

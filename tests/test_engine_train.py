"""``dfmsd train`` end to end on generated data: runs, writes, resumes exactly, refuses mixing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from dfmsd_cli.cli import main
from dfmsd_cli.engine.train import TrainOptions, train

SMALL = dict(img_scale=(128, 96), batch_size=2, num_workers=0, warmup_iters=2, lr=0.005)


def _opts(root, out, **kw) -> TrainOptions:
    return TrainOptions(
        **{
            "model": "retina_tiny",
            "data": root,
            "out": out,
            "epochs": 2,
            "evaluate": False,
            **SMALL,
            **kw,
        }
    )


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_train_writes_run_files_and_evaluates(synthetic_root, tmp_path):
    out = tmp_path / "run"
    summary = train(_opts(synthetic_root, out, epochs=1, evaluate=True))
    assert {"config.json", "last.pth", "model.pth", "metrics.jsonl"} <= {
        p.name for p in out.iterdir()
    }
    assert summary["epochs_done"] == 1
    assert "mAP" in json.dumps(summary["val"])
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["phase"] == "val"
    assert all(r["loss"] > 0 for r in records if r["phase"] == "train")
    config = json.loads((out / "config.json").read_text())
    assert config["command"] == "train" and config["options"]["model"] == "retina_tiny"


@pytest.mark.parametrize(
    "model", ["retina_tiny", pytest.param("frcnn_tiny", marks=pytest.mark.slow)]
)  # the two-stage run end to end in the slow tier: the fast tier keeps the one-stage one
def test_resume_mid_epoch_is_bit_exact(synthetic_root, tmp_path, model):
    full = tmp_path / "full"
    train(_opts(synthetic_root, full, model=model))
    part = tmp_path / "part"
    first = train(_opts(synthetic_root, part, model=model, max_steps=3))  # stops mid-epoch 1
    assert first["iterations"] == 3
    state = torch.load(part / "last.pth", map_location="cpu", weights_only=True)
    assert (state["epoch"], state["step"], state["iteration"]) == (0, 3, 3)
    second = train(_opts(synthetic_root, part, model=model, resume=True))
    assert second["iterations"] == first["iterations"] + second["steps_this_run"]
    a, b = _weights(full / "last.pth"), _weights(part / "last.pth")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    opt_a = torch.load(full / "last.pth", weights_only=True)["optimizer"]["state"]
    opt_b = torch.load(part / "last.pth", weights_only=True)["optimizer"]["state"]
    for k in opt_a:
        assert torch.equal(opt_a[k]["momentum_buffer"], opt_b[k]["momentum_buffer"])


@pytest.mark.slow  # a separate interpreter, killed and resumed
def test_killed_process_resumes(synthetic_root, tmp_path):
    """SIGKILL a real training process after its first checkpoint, then resume it."""
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "dfmsd_cli",
        "train",
        "--model",
        "retina_tiny",
        "--data",
        str(synthetic_root),
        "--out",
        str(out),
        "--epochs",
        "3",
        "--img-scale",
        "128,96",
        "--batch-size",
        "2",
        "--num-workers",
        "0",
        "--save-interval",
        "1",
        "--no-eval",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "last.pth").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    state = torch.load(out / "last.pth", map_location="cpu", weights_only=True)  # never torn
    done = state["iteration"]
    assert done >= 1
    rc = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True)
    assert rc.returncode == 0, rc.stderr
    final = torch.load(out / "last.pth", map_location="cpu", weights_only=True)
    assert final["epoch"] == 3 and final["iteration"] > done


def test_refuses_an_occupied_output_folder(synthetic_root, tmp_path, capsys):
    out = tmp_path / "run"
    train(_opts(synthetic_root, out, max_steps=1))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["train", "--model", "fcos_tiny", "--data", str(synthetic_root), "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume" in err[0] and "--overwrite" in err[0]
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "train",
                "--model",
                "fcos_tiny",
                "--data",
                str(synthetic_root),
                "--out",
                str(out),
                "--resume",
            ]
        )
    assert exc.value.code == 2
    assert "different run" in capsys.readouterr().err


def test_unknown_model_suggests(synthetic_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "train",
                "--model",
                "retina_tiniy",
                "--data",
                str(synthetic_root),
                "--out",
                str(tmp_path / "r"),
            ]
        )
    assert exc.value.code == 2
    assert "retina_tiny" in capsys.readouterr().err


def test_config_toml_supplies_defaults(synthetic_root, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        "[train]\nepochs = 1\nmax-steps = 1\nimg-scale = [128, 96]\nno-eval = true\n"
        "num-workers = 0\n"
    )
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "train",
                "--config",
                str(cfg),
                "--model",
                "retina_tiny",
                "--data",
                str(synthetic_root),
                "--out",
                str(out),
                "--epochs",
                "2",
            ]
        )
    assert exc.value.code in (0, None)
    opts = json.loads((out / "config.json").read_text())["options"]
    assert opts["epochs"] == 2 and opts["max_steps"] == 1 and opts["img_scale"] == [128, 96]

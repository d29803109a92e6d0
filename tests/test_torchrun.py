"""`torchrun` end to end through the CLI: two CPU processes (gloo) train and distill, rank 0
alone writes the run folder, and each rank takes half of every epoch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # two interpreters per test, torchrun end to end


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cmd = [  # torchrun, as a module of this interpreter
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "-m",
        "dfmsd_cli",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _iterations(run: Path) -> list[int]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["iteration"] for r in rows if r.get("phase") == "train"]


COMMON = "--epochs 1 --batch-size 2 --img-scale 128,96 --warmup-iters 2 --num-workers 0 "
COMMON += "--device cpu --no-eval"
WORLD = 2


def test_train_under_torchrun(synthetic_root, tmp_path):
    out = tmp_path / "run"
    args = f"train --model retina_tiny --data {synthetic_root} --out {out} {COMMON}"
    _torchrun(args.split(), tmp_path)
    assert (out / "model.pth").is_file() and (out / "config.json").is_file()
    # 12 images, one view each per epoch, split over 2 ranks, batch 2: 3 steps (6 alone)
    assert max(_iterations(out)) == 12 // WORLD // 2


def test_distill_under_torchrun(synthetic_root, tmp_path):
    from dfmsd_cli.data.geometry import Geometry
    from dfmsd_cli.store.precompute import PrecomputeOptions, precompute

    ann = synthetic_root / "annotations" / "instances_train2017.json"
    cache = tmp_path / "cache"
    opts = PrecomputeOptions(
        teacher="fcos_tiny",
        cache=str(cache),
        views=["orig", "hflip"],
        geometry=Geometry(img_scale=(128, 96)),
        num_workers=0,
        device="cpu",
        seed=1,
        max_images=8,
        progress=False,
    )
    precompute(ann, synthetic_root / "train2017", opts)
    out = tmp_path / "kd"
    args = "distill --student retina_tiny --stages fcos_tiny --method dfmsd --no-sal "
    args += f"--data {synthetic_root} --cache {cache} --out {out} {COMMON}"
    _torchrun(args.split(), tmp_path)
    assert (out / "student.pth").is_file()
    assert max(_iterations(out)) == 8 // 2 // 2  # the 8 stored images, 2 ranks, batch 2

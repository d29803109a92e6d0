"""dfmsd bench at tiny sizes: each command produces its JSON with the expected keys (no timing
thresholds), and an isolated measurement reports its own process's memory."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dfmsd_cli.bench.distill import bench_distill
from dfmsd_cli.bench.isolate import run_isolated
from dfmsd_cli.cli import app
from dfmsd_cli.errors import UserError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from dfmsd_cli.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("bench")
    return make_synthetic(root / "data", images=6, seed=0, val_images=1, min_size=64, max_size=96)


@pytest.mark.slow  # two fresh interpreters
def test_run_isolated_reports_child_memory_and_errors():
    big = run_isolated("numpy:ones", {"shape": (64, 1024, 1024), "dtype": "uint8"})
    assert big["result"].nbytes == 64 * 2**20
    assert big["peak_rss_mb"] >= big["base_rss_mb"] + 60  # the 64 MiB array is counted
    with pytest.raises(UserError, match="weights file"):
        run_isolated("dfmsd_cli.models.checkpoint:read_checkpoint", {"path": "/nonexistent.pth"})


@pytest.mark.slow  # a whole bench distill run
def test_bench_distill_keys(data, tmp_path):
    r = bench_distill(
        data,
        student="retina_tiny",
        teachers=("fcos_tiny", "gfl_tiny"),
        images=4,
        steps=2,
        img_scale=(96, 64),
        batch_size=2,
        isolate=False,
        work_dir=tmp_path,
        clock="cpu",
        log=lambda *a: None,
    )
    assert r["clock"] == "cpu"
    assert set(r["runs"]) == {"student", "store", "online"}
    for run in r["runs"].values():
        assert run["seconds_per_step"] > 0 and run["steps"] >= 2
        assert run["peak_rss_mb"] > 0
    assert r["runs"]["store"]["stage"] == 2  # the last stage (with ME) is the one measured
    assert set(r["ratios"]) >= {
        "store_step_over_student_step",
        "online_step_over_store_step",
        "store_peak_rss_over_student",
    }
    assert all(v is not None and v > 0 for v in r["ratios"].values())
    with pytest.raises(UserError, match="--num-steps"):
        bench_distill(data, steps=1, log=lambda *a: None)
    with pytest.raises(UserError, match="--clock"):
        bench_distill(data, clock="gpu", log=lambda *a: None)


def test_bench_precompute_cli_json(data, tmp_path):
    out = tmp_path / "pre.json"
    res = CliRunner().invoke(
        app,
        [
            "bench",
            "precompute",
            "--data",
            str(data),
            "--teacher",
            "retina_tiny",
            "--num-images",
            "3",
            "--img-scale",
            "96,64",
            "--num-workers",
            "0",
            "--in-process",
            "--work-dir",
            str(tmp_path / "w"),
            "--json",
            str(out),
            "--repeats",
            "2",
        ],  # fmt: skip
    )
    assert res.exit_code == 0, res.output
    printed = json.loads(out.read_text())
    assert "precompute" in res.stdout  # --json PATH: the tables are still printed
    for dt in ("float16", "uint8", "float16-pcodec"):
        p = printed["precompute"][dt]
        assert p["ratio"] > 0 and p["bytes_per_image"] > 0 and p["teacher_only_s"] > 0
        # --repeats 2: both rounds listed, the median reported
        runs = p["ratio_cpu_runs"]
        assert len(runs) == 2 and len(p["ratio_runs"]) == 2
        assert p["ratio_cpu"] == pytest.approx(sum(runs) / 2)
        assert p["writer_cpu_s"] > 0 and len(p["writer_cpu_s_runs"]) == 2
    assert "over 2 rounds" in res.stdout  # the table of the ratios' ranges
    assert "images/s per writer thread" in res.stdout
    assert printed["memory"]["peak_rss_mb"] > 0
    assert printed["images"] == 3

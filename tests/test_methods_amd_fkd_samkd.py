"""``amd``, ``fkd`` and ``samkd`` as registered methods: defaults per student family, their
options as ``dfmsd distill`` flags (generated from the registry) with its checks, and a 2-step
run of each from the CLI on the session's tiny store."""

from __future__ import annotations

import json
import math

import pytest
from conftest import _cli

from dfmsd_cli.distill.losses import AMD_DEFAULTS, FKD_DEFAULTS
from dfmsd_cli.distill.methods import get_method, list_methods, method_config
from dfmsd_cli.errors import UserError


def test_registered_with_their_stage_loss():
    for name, stage_loss in (("amd", "amd"), ("fkd", "fkd"), ("samkd", "sfd")):
        assert name in list_methods()
        spec = get_method(name)
        assert spec.stage_loss == stage_loss and spec.store is not None and not spec.sal


@pytest.mark.parametrize(("student", "family"), [("retina_tiny", "one_stage"),
                                                 ("frcnn_tiny", "two_stage")])  # fmt: skip
def test_defaults_by_family(student, family):
    amd = method_config("amd", student)
    assert (amd.family, amd.alpha) == (family, AMD_DEFAULTS[family]["alpha"])
    assert amd.loss_kwargs == {"lam": AMD_DEFAULTS[family]["lam"], "tau": 0.5, "rule": "sample"}
    fkd = method_config("fkd", student)
    assert fkd.alpha == 1.0 and fkd.loss_kwargs == FKD_DEFAULTS[family]
    samkd = method_config("samkd", student)
    assert samkd.alpha == 5e-5 and samkd.loss_kwargs["grids"] == [1, 2, 4]
    assert samkd.loss_kwargs["pool"] is False and "SLD" in samkd.notes[0]


def test_two_stage_defaults_differ():
    one, two = method_config("amd", "retina_tiny"), method_config("amd", "frcnn_tiny")
    assert (one.alpha, one.loss_kwargs["lam"]) == (2e-5, 0.65)
    assert (two.alpha, two.loss_kwargs["lam"]) == (5e-7, 0.45)
    f1, f2 = method_config("fkd", "retina_tiny"), method_config("fkd", "frcnn_tiny")
    assert f1.loss_kwargs["channel_mask"] and not f2.loss_kwargs["channel_mask"]
    assert (f1.loss_kwargs["temperature"], f2.loss_kwargs["temperature"]) == (0.1, 0.5)


def test_options_map_to_loss_kwargs():
    amd = method_config("amd", "retina_tiny", lambda_s=0.3, tau=1.0, mask_rule="top")
    assert amd.loss_kwargs == {"lam": 0.3, "tau": 1.0, "rule": "top"}
    sam = method_config("samkd", "retina_tiny", samkd_grids="1, 2", samkd_pool=True, lambda_c=0.25)
    assert sam.loss_kwargs["grids"] == [1, 2] and sam.loss_kwargs["pool"] is True
    assert sam.loss_kwargs["lambda_c"] == 0.25


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("amd", {"samkd_grids": "1,2"}, "--samkd-grids sets the SFD window grids of samkd, not of "
         "'amd': drop it"),
        ("fkd", {"samkd_pool": True}, "--samkd-pool is part of --method samkd only"),
        ("fkd", {"lambda_s": 0.5}, "--lambda-s sets .* not of 'fkd'"),
        ("amd", {"lambda_c": 0.5}, "--lambda-c sets .* not of 'amd'"),
        ("amd", {"lambda_s": 1.5}, "--lambda-s must be in"),
        ("samkd", {"samkd_grids": "0,2"}, "--samkd-grids must be positive"),
        ("samkd", {"samkd_grids": "2,2"}, "lists a grid twice"),
        ("samkd", {"samkd_grids": "2,3", "samkd_pool": True}, "--samkd-pool needs every grid"),
    ],
)  # fmt: skip
def test_option_errors(method, options, message):
    with pytest.raises(UserError, match=message):
        method_config(method, "retina_tiny", **options)
    assert method_config("fkd", "retina_tiny", samkd_pool=False).name == "fkd"  # already off


def test_method_options_are_distill_flags():
    from typer.testing import CliRunner

    from dfmsd_cli.cli import app

    help_text = CliRunner().invoke(app, ["distill", "--help"], env={"COLUMNS": "200"}).output
    assert "--samkd-grids" in help_text and "--samkd-pool" in help_text


def test_foreign_option_on_the_cli_is_a_one_line_error(tmp_path, capsys):
    argv = ["distill", "--student", "retina_tiny", "--out", str(tmp_path / "x"), "--method",
            "amd", "--stages", "retina_tiny", "--samkd-grids", "1,2"]  # fmt: skip
    assert _cli(argv) == 2
    err = capsys.readouterr().err
    assert "--samkd-grids sets the SFD window grids of samkd, not of 'amd': drop it" in err
    assert "Traceback" not in err


def _run(tiny_cache, synthetic_root, out, method, student="retina_tiny", *extra):
    argv = ["distill", "--student", student, "--stages", "retina_tiny", "--method", method,
            "--data", str(synthetic_root), "--cache", str(tiny_cache), "--out", str(out),
            "--epochs", "1", "--batch-size", "2", "--warmup-iters", "2", "--num-workers", "0",
            "--device", "cpu", "--no-eval", "--max-steps", "2", "--img-scale", "128,96",
            *extra]  # fmt: skip
    assert _cli(argv) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    kd = [r["loss_kd"] for r in rows if r.get("phase") == "train"]
    assert kd and all(math.isfinite(v) for v in kd)
    return json.loads((out / "config.json").read_text())["options"]["resolved"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["amd", "fkd", "samkd"])
def test_two_steps_from_the_cli(method, tiny_cache, synthetic_root, tmp_path):
    resolved = _run(tiny_cache, synthetic_root, tmp_path / method, method)
    assert resolved == method_config(method, "retina_tiny").to_dict() | {"notes": resolved["notes"]}


@pytest.mark.slow
def test_samkd_flags_reach_the_run_and_the_note_is_printed(
    tiny_cache, synthetic_root, tmp_path, capsys
):
    resolved = _run(tiny_cache, synthetic_root, tmp_path / "s", "samkd", "retina_tiny",
                    "--samkd-grids", "1,2", "--samkd-pool", "--lambda-s", "0.5")  # fmt: skip
    assert resolved["loss_kwargs"]["grids"] == [1, 2] and resolved["loss_kwargs"]["pool"] is True
    assert resolved["loss_kwargs"]["lambda_s"] == 0.5 and "SLD" in resolved["notes"][0]
    printed = " ".join(capsys.readouterr().err.split())  # the console wraps long lines
    assert "note: SAMKD runs SFD alone: SLD" in printed


@pytest.mark.slow
@pytest.mark.parametrize("method", ["amd", "fkd"])
def test_two_stage_student_records_its_family_defaults(
    method, tiny_cache, synthetic_root, tmp_path
):
    resolved = _run(tiny_cache, synthetic_root, tmp_path / method, method, "frcnn_tiny")
    assert resolved["family"] == "two_stage"
    assert resolved == method_config(method, "frcnn_tiny").to_dict() | {"notes": []}

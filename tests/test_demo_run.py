"""The demo end to end at a tiny size: results.json with both rows, the PNG, the CLI wrapper,
and the shipped-teacher packing (float16, strict load). The margin itself is not asserted."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from dfmsd_cli.demo import DemoConfig, run_demo
from dfmsd_cli.demo.teachers import pack_teacher
from dfmsd_cli.errors import UserError
from dfmsd_cli.models import build_model
from dfmsd_cli.models.checkpoint import load_weights, save_checkpoint

TEACHERS = ("fcos_tiny", "gfl_tiny")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """Random-init teachers packed exactly as examples/demo_teachers/ ships them."""
    d = tmp_path_factory.mktemp("teachers")
    for k, name in enumerate(TEACHERS):
        torch.manual_seed(k)
        src = save_checkpoint(d / f"{name}_full.pth", build_model(name, num_classes=5))
        pack_teacher(src, d / f"{name}.pth")
    return d


def test_pack_teacher_is_float16_and_loads_strictly(teacher_dir):
    packed = torch.load(teacher_dir / "fcos_tiny.pth", weights_only=True)
    assert all(
        v.dtype == torch.float16 for v in packed["state_dict"].values() if v.is_floating_point()
    )
    full = torch.load(teacher_dir / "fcos_tiny_full.pth", weights_only=True)
    model = build_model("fcos_tiny", num_classes=5)
    load_weights(model, str(teacher_dir / "fcos_tiny.pth"))
    for k, v in model.state_dict().items():
        assert v.dtype == full["state_dict"][k].dtype
        torch.testing.assert_close(v, full["state_dict"][k].half().to(v.dtype))
    with pytest.raises(UserError):  # strict: another architecture's weights do not load
        load_weights(build_model("gfl_tiny", num_classes=5), str(teacher_dir / "fcos_tiny.pth"))


@pytest.mark.slow  # the whole demo: teachers, baseline, precompute, two stages, eval
def test_demo_quick_writes_results_and_png(tmp_path, teacher_dir):
    out = tmp_path / "demo"
    cfg = DemoConfig.quick(out, seed=1, teacher_dir=teacher_dir, train_teachers=False)
    results = run_demo(cfg)
    saved = json.loads((out / "results.json").read_text())
    assert saved["metrics"].keys() >= {"baseline", "DFMSD", "teacher fcos_tiny", "teacher gfl_tiny"}
    for row in ("baseline", "DFMSD"):
        assert set(saved["metrics"][row]["bbox"]) >= {"mAP", "APs", "APm", "APl", "mAR"}
    assert saved["teacher_weights"]["gfl_tiny"].endswith("gfl_tiny.pth")
    assert [s["stage"] for s in saved["distill"]["stages"]] == [1, 2]
    assert set(saved["phases"]) >= {"data", "teachers", "baseline", "precompute", "distill"}
    assert saved["stores"]["gfl_tiny"]["views"] == ["orig", "hflip", "me"]
    assert saved["stores"]["fcos_tiny"]["views"] == ["orig", "hflip"]
    assert saved["stores"]["gfl_tiny"]["bytes"] > 0
    assert results["margin_mAP"] == pytest.approx(
        saved["metrics"]["DFMSD"]["bbox"]["mAP"] - saved["metrics"]["baseline"]["bbox"]["mAP"]
    )
    png = Image.open(out / "demo.png")
    assert png.format == "PNG" and png.size == (1400, 480)
    att = Image.open(out / "attention.png")  # 5 levels x (A_s + 3 rules + channel strip)
    assert att.format == "PNG" and att.size == (5 * 240, 5 * 200)
    assert saved["attention_png"] == str(out / "attention.png")
    # same epochs: the baseline ran as many optimizer steps as both stages together
    stage_steps = sum(s["iterations"] for s in saved["distill"]["stages"])
    assert saved["baseline_run"]["iterations"] == stage_steps

    with pytest.raises(UserError, match="--overwrite"):
        run_demo(cfg)


def test_demo_refuses_foreign_folder_and_bad_options(tmp_path):
    (tmp_path / "x.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        run_demo(DemoConfig.quick(tmp_path))
    with pytest.raises(UserError, match="two teachers"):
        run_demo(DemoConfig.quick(tmp_path / "a", teachers=("fcos_tiny",), epochs=(1,)))
    with pytest.raises(UserError, match="student must differ"):
        run_demo(DemoConfig.quick(tmp_path / "b", student="fcos_tiny"))
    assert (tmp_path / "x.txt").read_text() == "mine"

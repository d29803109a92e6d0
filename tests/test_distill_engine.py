"""Stage-wise distillation end to end on generated data: two stages with ME from the CLI,
bit-exact resume, no teacher ever constructed, baselines, and the pre-training store checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dfmsd_cli.data.geometry import Geometry
from dfmsd_cli.distill.run import DistillOptions, distill
from dfmsd_cli.errors import UserError

GEOM = Geometry(img_scale=(128, 96))
STUDENT = "retina_tiny"
TEACHERS = ("fcos_tiny", "retina_tiny")  # weaker, stronger (the stronger holds the ME view)


@pytest.fixture(scope="module")
def env(synthetic_root, tmp_path_factory) -> dict:
    """The shared synthetic root and two teacher stores over its first 4 training images
    (orig+hflip; the second also 'me'): distill trains on the images the stores cover."""
    from dfmsd_cli.store.precompute import PrecomputeOptions, precompute

    data = synthetic_root
    ann, imgs = data / "annotations" / "instances_train2017.json", data / "train2017"
    cache = tmp_path_factory.mktemp("distill") / "cache"
    for teacher, enhance_from in ((TEACHERS[0], None), (TEACHERS[1], TEACHERS[0])):
        opts = PrecomputeOptions(
            teacher=teacher,
            cache=str(cache),
            views=["orig", "hflip"],
            enhance_from=enhance_from,
            geometry=GEOM,
            num_workers=0,
            device="cpu",
            seed=1,
            max_images=4,
            progress=False,
        )
        precompute(ann, imgs, opts)
    return {"data": data, "cache": cache}


def _opts(env, out: Path, **kw) -> DistillOptions:
    base = dict(
        student=STUDENT,
        out=out,
        stages=TEACHERS,
        data=env["data"],
        cache=str(env["cache"]),
        epochs=(1, 1),
        batch_size=2,
        warmup_iters=2,
        num_workers=0,
        device="cpu",
        evaluate=False,
    )
    base.update(kw)
    return DistillOptions(**base)


@pytest.fixture
def built_models(monkeypatch) -> list[str]:
    """Record every model the code under test constructs (the no-teacher guard)."""
    from dfmsd_cli.models.registry import ModelSpec

    names: list[str] = []
    original = ModelSpec.build

    def build(self, num_classes, **options):
        names.append(self.name)
        return original(self, num_classes, **options)

    monkeypatch.setattr(ModelSpec, "build", build)
    return names


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_two_stage_me_run_from_cli_builds_no_teacher(env, tmp_path, built_models):
    from dfmsd_cli.cli import app
    from dfmsd_cli.models import build_model

    out = tmp_path / "run"
    args = [
        "distill", "--student", STUDENT, "--stages", ",".join(TEACHERS),
        "--data", str(env["data"]), "--cache", str(env["cache"]), "--epochs", "1,1",
        "--out", str(out), "--num-workers", "0", "--device", "cpu", "--warmup-iters", "2",
        "--img-scale", "128,96",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    # the hard rule: only the student was ever constructed (teachers live in the stores)
    assert built_models == [STUDENT]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["phase"] == "train"]
    stage1 = [r for r in train if r["stage"] == 1]
    stage2 = [r for r in train if r["stage"] == 2]
    assert stage1 and stage2
    assert all("loss_kd" in r and "loss_sfa" in r for r in train)
    assert all("loss_me" not in r for r in stage1) and all("loss_me" in r for r in stage2)
    assert all(math.isfinite(r["loss"]) for r in train)
    assert {r["stage"] for r in records if r["phase"] == "val"} == {1, 2}  # eval after stages
    for name in ("stage1_fcos_tiny.pth", "stage2_retina_tiny.pth", "student.pth", "config.json"):
        assert (out / name).is_file()
    # student.pth: only the student; loads as a dfmsd checkpoint and as a plain state dict
    ckpt = torch.load(out / "student.pth", map_location="cpu", weights_only=True)
    assert ckpt["model"] == STUDENT and "optimizer" not in ckpt
    fresh = build_model(STUDENT, num_classes=ckpt["num_classes"])
    fresh.load_state_dict(ckpt["state_dict"], strict=True)
    assert all(not k.startswith(("losses.", "student.")) for k in ckpt["state_dict"])
    # stage 2 started from stage 1's weights and changed them
    s1, s2 = _state(out / "stage1_fcos_tiny.pth"), _state(out / "student.pth")
    assert any(not torch.equal(s1[k], s2[k]) for k in s1)


def _assert_stopped_student(run: Path) -> None:
    """student.pth of a run stopped by --max-steps: the weights of its last.pth, marked."""
    ckpt = torch.load(run / "student.pth", map_location="cpu", weights_only=True)
    assert ckpt["distill"]["stopped"] is True and "optimizer" not in ckpt
    last = _state(run / "last.pth")
    assert all(torch.equal(ckpt["state_dict"][k], last[k]) for k in last)


def test_resume_is_bit_exact(env, tmp_path):
    full = distill(_opts(env, tmp_path / "full", epochs=(2, 1)))
    assert [s["iterations"] for s in full["stages"]] == [4, 2]
    part = tmp_path / "part"
    first = distill(_opts(env, part, epochs=(2, 1), max_steps=3))  # stops mid-epoch 2
    assert first["stages"][0]["stopped"]
    _assert_stopped_student(part)  # --max-steps writes the student it stopped at
    second = distill(_opts(env, part, epochs=(2, 1), max_steps=1, resume=True))
    assert second["stages"][0]["complete"] and len(second["stages"]) == 1  # at the stage end
    assert (part / "stage1_fcos_tiny.pth").is_file()
    _assert_stopped_student(part)
    distill(_opts(env, part, epochs=(2, 1), max_steps=1, resume=True))  # mid stage 2
    _assert_stopped_student(part)
    distill(_opts(env, part, epochs=(2, 1), resume=True))
    a, b = _state(tmp_path / "full" / "student.pth"), _state(part / "student.pth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_killed_during_its_final_evaluation_evaluates_on_resume(env, tmp_path):
    """The last stage's final checkpoint is written before its evaluation: a kill there left a
    resumed run with no metrics at all (seen in the benchmark). Now the resume evaluates."""
    out = tmp_path / "run"
    full = distill(_opts(env, out, evaluate=True))
    evals = {s["teacher"]: s["val"] for s in full["stages"]}
    last_eval = out / "eval_stage2_retina_tiny_val2017.json"
    assert last_eval.is_file() and (out / "eval_stage1_fcos_tiny_val2017.json").is_file()
    for name in (last_eval.name, "student.pth", "summary.json"):  # as if killed in eval
        (out / name).unlink()
    again = distill(_opts(env, out, evaluate=True, resume=True))
    stages = again["stages"]
    assert [s["teacher"] for s in stages] == list(TEACHERS)
    assert all(s.get("finished_before_resume") for s in stages)
    assert [s["iterations"] for s in stages] == [s["iterations"] for s in full["stages"]]
    assert stages[0]["val"]["bbox"] == evals[TEACHERS[0]]["bbox"]  # read back from its file
    assert stages[1]["val"]["bbox"] == evals[TEACHERS[1]]["bbox"]  # evaluated again
    assert last_eval.is_file() and (out / "student.pth").is_file()
    written = json.loads((out / "summary.json").read_text())
    assert written["stages"][1]["val"]["bbox"] == evals[TEACHERS[1]]["bbox"]
    from dfmsd_cli.cli.distill_cmd import _print_summary

    _print_summary(again)  # the CLI's table of such a summary (once a KeyError)


@pytest.mark.parametrize("method", ["none", "mgd", "pkd", "fgd", "dmkd"])
def test_baselines_run_on_the_same_engine(env, tmp_path, method, built_models):
    summary = distill(
        _opts(env, tmp_path / method, method=method, max_steps=2, img_scale=(128, 96))
    )
    assert len(summary["stages"]) == 1 and summary["stages"][0]["iterations"] == 2
    assert built_models == [STUDENT]
    if method != "none":
        assert summary["stages"][0]["teacher"] == TEACHERS[-1]  # one stage, strongest teacher
    log = (tmp_path / method / "metrics.jsonl").read_text()
    assert ("loss_kd" in log) == (method != "none")
    written = json.loads((tmp_path / method / "summary.json").read_text())  # by distill()
    assert written["stages"][0]["iterations"] == 2


NO_SAL_SFA_ME = {"sal": False, "sfa": False, "me": False}


def test_ablation_flags_shape_the_run(env, tmp_path):
    s = distill(_opts(env, tmp_path / "nosal", max_steps=1, method_options=NO_SAL_SFA_ME))
    assert [st["teacher"] for st in s["stages"]] == [TEACHERS[-1]]
    log = (tmp_path / "nosal" / "metrics.jsonl").read_text()
    assert "loss_kd" in log and "loss_sfa" not in log and "loss_me" not in log


def test_nan_loss_stops_with_clear_message(env, tmp_path):
    with pytest.raises(UserError, match="loss became nan .*no checkpoint was written yet"):
        distill(_opts(env, tmp_path / "nan", method_options={"alpha": float("nan")}))
    # a good first stage, then a NaN in the second: stage 1's checkpoint is kept
    out = tmp_path / "nan2"
    distill(_opts(env, out, epochs=(1, 1), max_steps=2))  # exactly stage 1
    before = (out / "last.pth").read_bytes()
    with pytest.raises(UserError, match="last good checkpoint .* is kept"):
        distill(_opts(env, out, epochs=(1, 1), method_options={"beta": float("inf")}, resume=True))
    assert (out / "last.pth").read_bytes() == before


def test_store_mismatch_is_an_error_before_training(env, tmp_path):
    data = env["data"]
    with pytest.raises(UserError, match="does not match"):  # another geometry than the stores'
        distill(_opts(env, tmp_path / "g", img_scale=(160, 128)))
    with pytest.raises(UserError, match="does not match"):  # another annotation file
        distill(
            _opts(
                env,
                tmp_path / "a",
                ann=data / "annotations" / "instances_val2017.json",
                images=data / "val2017",
            )
        )
    with pytest.raises(UserError, match="no teacher store"):
        distill(_opts(env, tmp_path / "m", stages=("frcnn_tiny",), epochs=(1,)))
    with pytest.raises(UserError, match="--epochs has 3 values"):
        distill(_opts(env, tmp_path / "e", epochs=(1, 1, 1)))
    assert not (tmp_path / "g" / "metrics.jsonl").exists()


def test_store_without_student_levels_is_an_error(env):
    from dfmsd_cli.data.coco import CocoDetection
    from dfmsd_cli.distill.stages import StagePlan, open_stage_store
    from dfmsd_cli.utils.io import sha256_file

    ann = env["data"] / "annotations" / "instances_train2017.json"
    coco = CocoDetection(ann, env["data"] / "train2017", geometry=GEOM)
    kw = dict(
        geometry=GEOM,
        ann_sha256=sha256_file(ann),
        image_ids=coco.image_ids,
        train_images=list(range(len(coco.image_ids))),
    )
    plan = StagePlan(0, TEACHERS[0], 1, me=False)
    ok = open_stage_store(plan, env["cache"], "train2017", student_strides=(4, 8), **kw)
    assert ok.levels == [8] and ok.views == ("orig", "hflip") and not ok.me
    with pytest.raises(UserError, match="no shared stride"):  # a P2-only student
        open_stage_store(plan, env["cache"], "train2017", student_strides=(4,), **kw)
    notes = []
    me_plan = StagePlan(0, TEACHERS[0], 1, me=True)  # the weaker store has no 'me' view
    ss = open_stage_store(
        me_plan, env["cache"], "train2017", student_strides=(8,), warn=notes.append, **kw
    )
    assert not ss.me and any("no 'me'" in n for n in notes)


def test_online_teachers_match_the_store(env):
    """--online computes what the store holds: same features (float16 rounding) for batches
    of one image, both views, and the identical ME input and features."""
    from dfmsd_cli.data.coco import CocoDetection
    from dfmsd_cli.data.enhance import EnhanceConfig
    from dfmsd_cli.distill.dataset import DistillDataset, collate_distill
    from dfmsd_cli.distill.online import OnlineTeacher, load_online_teacher
    from dfmsd_cli.store.reader import TeacherStore

    data = env["data"]
    coco = CocoDetection(
        data / "annotations" / "instances_train2017.json",
        data / "train2017",
        geometry=GEOM,
        views=("orig", "hflip"),
    )
    store = TeacherStore.open(env["cache"] / TEACHERS[1] / "train2017.zarr")
    rows = {i: r for r, i in enumerate(store.meta.image_ids)}
    levels = (8, 32, 128)
    index = [rows.get(i, -1) for i in coco.image_ids]  # the store covers the first 4 images
    stored = DistillDataset(coco, store, index, levels, me=True)
    plain = DistillDataset(coco, None, keep_raw=True)
    weak = load_online_teacher(TEACHERS[0], coco.num_classes, None, 1, "cpu")  # fixture seed
    strong = load_online_teacher(TEACHERS[1], coco.num_classes, None, 1, "cpu")
    online = OnlineTeacher(strong, list(levels), GEOM, weak, EnhanceConfig())
    for k in (0, 1):  # image 0, orig and hflip views
        a = collate_distill([stored[k]])
        b = online(collate_distill([plain[k]]), a["images"])
        assert torch.equal(a["teacher"].inputs["me"], b.inputs["me"])
        for key in ("main", "me"):
            va, vb = a["teacher"].views[key], b.views[key]
            for s in levels:
                fa, fb = va.features[s], vb.features[s]
                assert torch.equal(va.valid[s], vb.valid[s])
                assert (fa - fb).abs().max() <= 1e-3 * fa.abs().max() + 1e-3


def test_online_run(env, tmp_path, built_models):
    kw = dict(online=True, batch_size=4, max_steps=4, img_scale=(128, 96))  # 12 images: 3 + 1
    s = distill(_opts(env, tmp_path / "on", **kw))
    # the student, stage 1's teacher, stage 2's teacher and (for online ME) the weaker one
    assert built_models == [STUDENT, TEACHERS[0], TEACHERS[1], TEACHERS[0]]
    assert [st["teacher"] for st in s["stages"]] == [TEACHERS[0], TEACHERS[1]]
    records = [
        json.loads(x) for x in (tmp_path / "on" / "metrics.jsonl").read_text().split("\n") if x
    ]
    assert "loss_kd" in records[0] and "loss_me" in records[-1]


def test_step_split_is_inside_the_steady_step(env, tmp_path):
    """The split (data wait, forward/backward per pass, optimizer) covers disjoint parts of the
    steady steps, so it sums to at most steady_seconds_per_step (an identity, not a timing
    threshold); the ME stage times its ME pass separately."""
    s = distill(_opts(env, tmp_path / "split", epochs=(1, 1)))
    for stage in s["stages"]:
        split = stage["split_seconds_per_step"]
        assert {"data", "optimizer"} <= set(split) and all(v >= 0 for v in split.values())
        assert sum(split.values()) <= stage["steady_seconds_per_step"] + 1e-4
    last = s["stages"][-1]["split_seconds_per_step"]
    assert {"fwd_main", "bwd_main", "fwd_me", "bwd_me"} <= set(last), last

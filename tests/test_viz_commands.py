"""``dfmsd viz``: every command writes a non-empty figure of the expected pixel size on tiny
fixtures (generated data, tiny models, a tiny store), and bad input fails with one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import _cli
from PIL import Image

from dfmsd_cli.cli import main
from dfmsd_cli.data.geometry import Geometry
from dfmsd_cli.errors import UserError
from dfmsd_cli.viz import viz_compare, viz_detections, viz_features, viz_masks, viz_run, viz_store
from dfmsd_cli.viz.common import DPI

GEOM = Geometry(img_scale=(128, 96))
WEAK, STRONG = "fcos_tiny", "retina_tiny"
LEVELS = [8, 16, 32]


@pytest.fixture(scope="module")
def env(synthetic_root, tmp_path_factory) -> dict:
    """Two stores over the first 4 training images and 3 of the 5 levels (the stronger with the
    me view), a student checkpoint and a one-epoch (3-step) training run."""
    from dfmsd_cli.models import build_model
    from dfmsd_cli.models.checkpoint import save_checkpoint
    from dfmsd_cli.store.precompute import PrecomputeOptions, precompute

    data = synthetic_root
    ann, imgs = data / "annotations" / "instances_train2017.json", data / "train2017"
    tmp = tmp_path_factory.mktemp("viz")
    cache = tmp / "cache"
    for teacher, enhance_from in ((WEAK, None), (STRONG, WEAK)):
        precompute(
            ann,
            imgs,
            PrecomputeOptions(
                teacher=teacher,
                cache=str(cache),
                views=["orig", "hflip"],
                enhance_from=enhance_from,
                geometry=GEOM,
                num_workers=0,
                device="cpu",
                seed=1,
                max_images=4,
                levels=LEVELS,  # fewer panels per figure: a faster fast tier
                progress=False,
            ),
        )
    torch.manual_seed(0)
    student = build_model("retina_tiny", num_classes=3)
    ckpt = save_checkpoint(tmp / "student" / "model.pth", student, geometry=GEOM)
    run = tmp / "run"
    with pytest.raises(SystemExit) as exc:
        main(["train", "--model", "retina_tiny", "--data", str(data), "--out", str(run),
              "--img-scale", "128,96", "--epochs", "1", "--batch-size", "4", "--no-eval",
              "--num-workers", "0", "--device", "cpu", "--warmup-iters", "2"])  # fmt: skip
    assert exc.value.code in (0, None)
    return {
        "data": data,
        "store": cache / STRONG / "train2017.zarr",
        "weak": cache / WEAK / "train2017.zarr",
        "ckpt": ckpt,
        "run": run,
        "tmp": tmp,
    }


def _png(path: Path, size: tuple[float, float]) -> None:
    """A non-empty PNG of ``size`` inches at the figures' DPI, with more than one colour."""
    assert path.suffix == ".png" and path.stat().st_size > 1000
    img = Image.open(path)
    assert img.format == "PNG"
    assert img.size == (round(size[0] * DPI), round(size[1] * DPI))
    assert len(np.unique(np.asarray(img.convert("L")))) > 10


@pytest.mark.slow  # three figures end to end; test_store_written_by_an_earlier_schema draws one
def test_store_figure_every_view(env, tmp_path):
    from dfmsd_cli.store.reader import TeacherStore

    store = TeacherStore.open(env["store"])
    levels = len(store.meta.strides)
    image_id = store.meta.image_ids[1]
    for view in store.meta.views:  # orig, hflip, me
        p = viz_store(env["store"], tmp_path / view, image=image_id, view=view, data=env["data"])
        _png(p, ((1 + levels) * 2.6, 2 * 2.2))
    # no --data: attention on a grey canvas; --levels restricts the panels; svg output
    p = viz_store(env["store"], tmp_path / "x.png", index=0, levels=[8, 16])
    _png(p, (3 * 2.6, 2 * 2.2))
    assert viz_store(env["store"], tmp_path / "x", index=0, fmt="svg").suffix == ".svg"
    _png(viz_store(env["store"], tmp_path / "d.png", index=0, dpi=50), ((1 + levels) * 1.3, 2.2))


def test_store_errors_are_one_line(env, tmp_path):
    with pytest.raises(UserError, match="image id 999999 is not in store"):
        viz_store(env["store"], tmp_path / "a.png", image=999999)
    with pytest.raises(UserError, match="--index 50 is out of range"):
        viz_store(env["store"], tmp_path / "a.png", index=50)
    with pytest.raises(UserError, match="view 'me' is not in store"):
        viz_store(env["weak"], tmp_path / "a.png", index=0, view="me")
    with pytest.raises(UserError, match="view 'adv' is not in store"):
        viz_store(env["store"], tmp_path / "a.png", index=0, view="adv")
    with pytest.raises(UserError, match="--levels"):
        viz_store(env["store"], tmp_path / "a.png", index=0, levels=[4])
    with pytest.raises(UserError, match="--format"):
        viz_store(env["store"], tmp_path / "a.png", index=0, fmt="jpg")


def test_masks_figure_per_method(env, tmp_path):
    from dfmsd_cli.store.reader import TeacherStore

    levels = len(TeacherStore.open(env["store"]).meta.strides)
    # dfm: A_s + the three rules, then the channel strip
    p = viz_masks(env["store"], tmp_path / "dfmsd.png", method="dfmsd", index=0, data=env["data"])
    _png(p, (5 * 2.4, levels * 2.0))
    p = viz_masks(env["store"], tmp_path / "fgd.png", method="fgd", index=1, data=env["data"])
    _png(p, (4 * 2.4, levels * 2.0))
    for method in ("mgd", "pkd"):  # spatial only, no channel strip
        p = viz_masks(env["store"], tmp_path / f"{method}.png", method=method, index=0)
        _png(p, (1 * 2.4, levels * 2.0))
    with pytest.raises(UserError, match="unknown method 'dfmds'"):
        viz_masks(env["store"], tmp_path / "x.png", method="dfmds", index=0)
    with pytest.raises(UserError, match="applies no feature mask"):
        viz_masks(env["store"], tmp_path / "x.png", method="none", index=0)


def test_masks_are_the_losses_masks(env):
    """The drawn dfm masks are dual_masks' output for the same generator state."""
    from dfmsd_cli.distill.losses import dual_masks
    from dfmsd_cli.store.reader import TeacherStore
    from dfmsd_cli.viz.masks_fig import method_masks

    rec = TeacherStore.open(env["store"]).get(0, "orig")
    panels = method_masks(rec, "dmkd", seed=5, levels=[8])
    g = torch.Generator().manual_seed(5)
    sp = rec["att_spatial"][8][None]
    v = torch.ones_like(sp, dtype=torch.bool)
    for p, rule in zip(panels[8][1:], ("sample", "top", "random"), strict=True):
        m_s, m_c = dual_masks(sp, rec["att_channel"][8][None], v, 0.65, 0.5, 0.5, rule, g)
        assert p.label == rule
        np.testing.assert_array_equal(p.spatial, m_s[0].numpy())
        np.testing.assert_array_equal(p.channel, m_c[0].numpy())
    assert panels[8][2].spatial.sum() == round(0.65 * v.sum().item())


def test_features_figure_two_students(env, tmp_path):
    from dfmsd_cli.store.reader import TeacherStore

    levels = len(TeacherStore.open(env["store"]).meta.strides)
    ckpts = [env["ckpt"], env["run"] / "model.pth"]
    p = viz_features(ckpts, env["store"], tmp_path / "f.png", index=2, data=env["data"])
    _png(p, ((2 + 3 * 2 + 2) * 2.0, levels * 1.8))
    with pytest.raises(UserError, match="pass --data"):
        viz_features(ckpts, env["store"], tmp_path / "f.png", index=2)


def test_run_figure(env, tmp_path):
    from dfmsd_cli.viz.run_curves import read_run

    real = read_run(env["run"])  # the detector's own terms are components too
    assert {"loss", "classification", "bbox_regression"} <= set(real.losses)
    assert "lr" not in real.losses and "iteration" not in real.losses
    _png(viz_run([env["run"]], tmp_path / "r.png", log_y=True), (2 * 5.0, 3.6))
    # a distill-style log with two stages and evaluations, overlaid with the real run
    fake = tmp_path / "dist"
    fake.mkdir()
    rows = [
        {"phase": "train", "stage": st, "iteration": i, "lr": 0.01, "loss": 2.0 / i,
         "loss_cls": 1.0 / i, "loss_kd": 0.1}  # fmt: skip
        for st in (1, 2)
        for i in (1, 2, 3)
    ] + [{"phase": "val", "stage": 1, "bbox": {"mAP": 0.1, "APs": -1.0}}, {"phase": "val",
          "stage": 2, "mAP": 0.2}]  # fmt: skip
    (fake / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n{truncated")

    log = read_run(fake)
    assert log.boundaries == [3.0] and log.losses["loss"][-1] == (6.0, 2.0 / 3)
    assert [e[0] for e in log.evals] == ["stage 1", "stage 2"]
    _png(viz_run([env["run"], fake], tmp_path / "r2.png"), (3 * 5.0, 3.6))
    with pytest.raises(UserError, match="no metrics.jsonl"):
        viz_run([tmp_path], tmp_path / "bad.png")


def test_compare_figure(tmp_path):
    root = tmp_path / "compare"
    for method, maps in (("none", (0.05, 0.07)), ("dfmsd", (0.10, 0.12)), ("mine", (0.2,))):
        for seed, m in enumerate(maps):
            run = root / method / f"s{seed}"
            run.mkdir(parents=True)
            (run / "student.pth").write_bytes(b"")
            cols = {"mAP": m, "APs": -1.0, "APm": m, "APl": m, "mAR": 2 * m}
            (run / "eval_stage1_val2017.json").write_text(json.dumps({"bbox": cols}))
    (root / "pkd" / "s0").mkdir(parents=True)  # unfinished: left out
    from dfmsd_cli.viz.compare_bars import read_compare, summarize

    rows = read_compare(root)
    assert list(rows) == ["none", "dfmsd", "mine"]
    mean, sd = summarize(rows["none"], "mAP")
    assert mean == pytest.approx(6.0) and sd == pytest.approx(np.std([5, 7], ddof=1))
    assert np.isnan(summarize(rows["none"], "APs")[0])
    _png(viz_compare(root, tmp_path / "c.png"), (1.3 * 5 * 3 / 3, 4.0))  # 3 methods
    with pytest.raises(UserError, match="no finished run"):
        viz_compare(tmp_path / "compare" / "pkd", tmp_path / "x.png")


def test_detections_figure(env, tmp_path):
    ckpts = [env["ckpt"], env["run"] / "model.pth"]
    p = viz_detections(ckpts, tmp_path / "d.png", data=env["data"], split="val2017", index=0,
                       score_thr=0.0)  # fmt: skip
    _png(p, (2 * 4.2, 3.4))
    with pytest.raises(UserError, match="image id 424242 is not in"):
        viz_detections(ckpts, tmp_path / "d.png", data=env["data"], image=424242)


def test_cli_one_line_errors(env, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["viz", "store", str(env["weak"]), "--index", "0", "--view", "me"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: view 'me' is not in store") and "\n" not in err
    out = tmp_path / "m.pdf"
    with pytest.raises(SystemExit) as exc:
        main(["viz", "masks", str(env["store"]), "--index", "0", "--method", "mgd", "-f", str(out)])
    assert exc.value.code in (0, None) and out.read_bytes().startswith(b"%PDF")


def test_chart_helpers_draw_the_values():
    """Bar heights are the values (NaN leaves a gap); loss lines are the logged points."""
    from dfmsd_cli.viz.common import new_figure
    from dfmsd_cli.viz.compare_bars import bar_axes
    from dfmsd_cli.viz.run_curves import RunLog, detection_loss, loss_axes

    fig, axes = new_figure(2, 1)
    bar_axes(
        axes[0, 0], ["mAP", "APs"], {"a": [(1.0, 0.5), (float("nan"), 0)], "b": [(3.0, 0)] * 2}
    )
    heights = [p.get_height() for p in axes[0, 0].patches]
    assert heights[0] == 1.0 and np.isnan(heights[1]) and heights[2:] == [3.0, 3.0]
    log = RunLog("r", losses={"loss": [(1, 3.0), (2, 2.0)], "loss_kd": [(1, 0.5), (2, 0.25)]})
    assert detection_loss(log) == [(1, 2.5), (2, 1.75)]
    loss_axes(axes[0, 1], [log], log_y=True, keys=("loss",))
    (line,) = axes[0, 1].get_lines()
    np.testing.assert_array_equal(line.get_ydata(), [3.0, 2.0])
    assert axes[0, 1].get_yscale() == "log"


def test_store_written_by_an_earlier_schema(synthetic_root, tmp_path, monkeypatch):
    """A schema-1 store (before chunk checksums) draws like a current one."""
    from dfmsd_cli.store import schema
    from dfmsd_cli.store.precompute import PrecomputeOptions, precompute
    from dfmsd_cli.store.reader import TeacherStore

    monkeypatch.setattr(schema, "SCHEMA_VERSION", 1)
    summary = precompute(
        synthetic_root / "annotations" / "instances_train2017.json",
        synthetic_root / "train2017",
        PrecomputeOptions(teacher="retina_tiny", cache=str(tmp_path / "c"), geometry=GEOM,
                          num_workers=0, device="cpu", max_images=2, levels=LEVELS,
                          progress=False),
    )  # fmt: skip
    monkeypatch.undo()
    store = TeacherStore.open(summary["path"])
    assert not store.checksummed
    levels = len(store.meta.strides)
    p = viz_store(summary["path"], tmp_path / "s.png", index=1, data=synthetic_root)
    _png(p, ((1 + levels) * 2.6, 2 * 2.2))
    p = viz_masks(summary["path"], tmp_path / "m.png", method="dmkd", index=1)
    _png(p, (5 * 2.4, levels * 2.0))


def _results(rows_het, rows_hom=None):
    def pair(rows):
        out = {"none": {"label": "student alone", "n": 3}}
        for name, (mean, std, better, sig) in rows.items():
            d = {"mean": mean, "std": std, "n": 3, "better": better, "significant": sig}
            out[name] = {"label": name, "n": 3, "delta": {"mAP": d, "APs": None}}
        return {"title": "a pair", "rows": out}

    pairs = {"het": pair(rows_het)}
    if rows_hom is not None:
        pairs["hom"] = pair(rows_hom)
    return {"columns": ["mAP", "APs"], "pairs": pairs}


def test_compare_paired_delta_figure(tmp_path):
    from dfmsd_cli.viz.paired_delta import delta_rows

    res = _results({"dfmsd": (2.0, 1.0, 3, True), "fgd": (-1.5, 2.0, 1, False)},
                   {"dfmsd": (0.5, 0.0, 3, False)})  # fmt: skip
    assert [r[0] for r in delta_rows(res["pairs"]["het"], "mAP")] == ["dfmsd", "fgd"]
    assert delta_rows(res["pairs"]["het"], "APs") == []  # no paired Δ of APs: no bar
    path = tmp_path / "results.json"
    path.write_text(json.dumps(res))
    _png(viz_compare(path, tmp_path / "d.png"), (2 * 5.2, 0.9 + 0.32 * 2))
    _png(viz_compare(tmp_path, tmp_path / "d2.png"), (2 * 5.2, 0.9 + 0.32 * 2))  # its folder
    with pytest.raises(UserError, match="--metric ARx is not in the results"):
        viz_compare(path, tmp_path / "x.png", metric="ARx")
    with pytest.raises(UserError, match="no row with a paired difference"):
        viz_compare(path, tmp_path / "x.png", metric="APs")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UserError, match="is not JSON"):
        viz_compare(tmp_path / "bad.json", tmp_path / "x.png")


def test_cli_viz_compare_results(tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_results({"dfmsd": (2.0, 1.0, 3, True)})))
    assert _cli(["viz", "compare", str(path), "--figure", str(tmp_path / "f.png")]) == 0
    _png(tmp_path / "f.png", (5.2, 0.9 + 0.32))
    assert _cli(["viz", "compare", str(tmp_path / "none.json"), "--figure", "x.png"]) == 2
    assert "does not exist" in capsys.readouterr().err

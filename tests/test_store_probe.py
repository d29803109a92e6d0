"""``precompute --dry-run`` measures the store's encodings on the teacher's own features
(store/probe.py): its stored/raw is what the store writes, its --pca energy kept is the share
computed by hand, and the dry run's projection and smaller encodings use them."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import _cli, train_files

from dfmsd_cli.data.coco import CocoDetection
from dfmsd_cli.data.geometry import Geometry
from dfmsd_cli.models.checkpoint import load_teacher
from dfmsd_cli.store import precompute as precompute_mod
from dfmsd_cli.store.precompute import PrecomputeOptions, precompute
from dfmsd_cli.store.probe import Candidate, probe_encodings

SCALE = (128, 96)


class TwoDirections(torch.nn.Module):
    """A stand-in teacher (4 channels, stride 8) whose every channel vector is
    x = 3·a·e1 + 1·b·e2, with a = (−1)^(row+col) and b = (−1)^row: zero mean on every even map,
    variances 9 and 1 along e1 and e2. One component keeps 9/10 of the energy, two keep all."""

    strides = [8]
    out_channels = 4
    logit_anchors = None
    num_classes = 1

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def forward(self, x, sizes=None):
        h, w = -(-x.shape[-2] // 8), -(-x.shape[-1] // 8)
        r = torch.arange(h)[:, None].expand(h, w)
        c = torch.arange(w)[None, :].expand(h, w)
        a, b = (-1.0) ** (r + c), (-1.0) ** r
        f = torch.zeros(x.shape[0], 4, h, w)
        f[:, 0], f[:, 1] = 3 * a, b
        return SimpleNamespace(features={8: f * self.scale})


def _ds(root) -> CocoDetection:
    return CocoDetection(*train_files(root), geometry=Geometry(img_scale=SCALE), train=False)


def test_pca_energy_kept_is_the_hand_computed_share(synthetic_root):
    cands = [Candidate("k1", "float32", pca=1), Candidate("k2", "float32", pca=2),
             Candidate("f32", "float32")]  # fmt: skip
    got = probe_encodings(TwoDirections(), _ds(synthetic_root), [0, 1, 2, 3], [8], cands)
    assert (got["images"], got["fit_images"], got["held_out_images"]) == (4, 2, 2)
    k1, k2, f32 = got["encodings"]
    assert k1["energy_kept"]["8"] == pytest.approx(0.9, abs=1e-6)
    assert k1["energy_kept_fit"]["8"] == pytest.approx(0.9, abs=1e-6)
    assert k1["relative_rmse"] == pytest.approx(0.1**0.5, abs=1e-6)  # sqrt(1 - 0.9)
    assert k2["energy_kept"]["8"] == pytest.approx(1.0, abs=1e-6)
    assert k2["relative_rmse"] < 1e-6 and f32["relative_rmse"] == 0.0
    assert f32["energy_kept"] is None and all(r["error"] is None for r in got["encodings"])


def test_a_value_float16_cannot_hold_is_an_error_row_and_a_note(synthetic_root, tmp_path,
                                                                 monkeypatch):  # fmt: skip
    cands = [Candidate("float16", "float16"), Candidate("--dtype bfloat16", "bfloat16")]
    got = probe_encodings(TwoDirections(scale=1e5), _ds(synthetic_root), [0, 1], [8], cands)
    f16, bf16 = got["encodings"]
    assert "float16" in f16["error"] and f16["stored_raw"] is None
    assert bf16["error"] is None and bf16["relative_rmse"] < 4e-3  # bfloat16: 8 bits
    # the dry run says so before any store exists, and projects with the r50 constants
    monkeypatch.setattr(precompute_mod, "load_teacher", lambda *a, **k: TwoDirections(1e5))
    notes: list[str] = []
    o = PrecomputeOptions(teacher="retina_tiny", geometry=Geometry(img_scale=SCALE),
                          cache=str(tmp_path), num_workers=0, probe_images=2)  # fmt: skip
    r = precompute(*train_files(synthetic_root), o, dry_run=True, warn=notes.append)
    assert any("the real run would stop" in n and "float16" in n for n in notes), notes
    assert "relative_rmse" not in r and r["probe"]["encodings"][0]["error"]
    assert not (tmp_path / "retina_tiny").exists()


def _chunk_bytes(store: Path, stride: int) -> tuple[int, int]:
    files = [f for f in (store / "feat" / "orig" / str(stride)).rglob("*") if f.is_file()
             and f.name != "zarr.json"]  # fmt: skip
    return sum(f.stat().st_size for f in files), len(files)


@pytest.mark.parametrize("dtype", ["float16", "uint8"])
def test_probe_ratio_is_what_the_store_writes(synthetic_root, tmp_path, dtype):
    """One image per teacher pass on both sides (batch 1: the same kernels), so the probe's
    compressed bytes are the store's chunk files less their 4-byte crc32c (uint8: plus the
    probe's per-channel scales, which the store keeps in ``qparams``)."""
    n = 4
    o = PrecomputeOptions(teacher="retina_tiny", geometry=Geometry(img_scale=SCALE),
                          cache=str(tmp_path), num_workers=0, batch_size=1, max_images=n,
                          dtype=dtype, progress=False)  # fmt: skip
    r = precompute(*train_files(synthetic_root), o)
    ds = _ds(synthetic_root)
    model = load_teacher("retina_tiny", ds.num_classes, None, 0).eval()
    strides = list(model.strides)
    got = probe_encodings(model, ds, list(range(n)), strides, [Candidate("x", dtype)])
    row = got["encodings"][0]
    stored = raw = 0
    for s in strides:
        b, files = _chunk_bytes(Path(r["path"]), s)
        assert files == n
        stored += b - 4 * files
    for i in range(n):
        info = ds.image_info(i)
        w, h = ds.geometry.padded_size(info["width"], info["height"])
        raw += sum(64 * -(-h // s) * -(-w // s) for s in strides)  # one byte or two per value
    item = 2 if dtype == "float16" else 1
    side = 0 if dtype == "float16" else n * len(strides) * 64 * 2 * 4  # (C, 2) float32 scales
    assert row["stored_raw"] == pytest.approx((stored + side) / (raw * item), rel=1e-12)


def test_dry_run_projects_with_the_teachers_own_figures(synthetic_root, tmp_path, capsys):
    argv = ["precompute", "--teacher", "retina_tiny", "--data", str(synthetic_root), "--cache",
            str(tmp_path), "--img-scale", "128,96", "--num-workers", "0", "--device", "cpu",
            "--dry-run", "--json", "-"]  # fmt: skip
    assert _cli([*argv, "--probe-images", "4"]) == 0
    out = capsys.readouterr()
    s = json.loads(out.out)
    assert "this teacher, 4 images" in out.err and "this teacher's first 4 images" in out.err
    mine = s["probe"]["encodings"][0]
    assert (s["probe"]["images"], mine["flags"]) == (4, "float16")
    assert s["expected_compression"] == mine["stored_raw"]
    assert s["relative_rmse"] == mine["relative_rmse"] < 1e-3
    assert s["smaller"] and all(e["measured"] for e in s["smaller"])
    errors = [e["relative_rmse"] for e in s["smaller"]]
    assert errors == sorted(errors)  # least error first, on this teacher
    assert any(e["energy_kept"] for e in s["smaller"])  # the --pca rows: this teacher's energy
    # --probe-images 0: the retina_r50 constants, as before
    assert _cli([*argv, "--probe-images", "0"]) == 0
    s0 = json.loads(capsys.readouterr().out)
    assert s0["probe"] is None and not any(e["measured"] for e in s0["smaller"])
    assert s0["expected_compression"] != s["expected_compression"]
    assert not (tmp_path / "retina_tiny").exists()

"""``--weights FILE --reinit-heads``: a pretrained trunk (backbone + FPN) with fresh heads."""

from __future__ import annotations

import pytest
import torch
from conftest import _cli

from dfmsd_cli.errors import UserError
from dfmsd_cli.models import build_model
from dfmsd_cli.models.checkpoint import load_weights, save_checkpoint
from dfmsd_cli.models.trunk import load_trunk, pack_trunk

# lr 1e-20: one optimizer step moves no weight by more than ~1e-18 (SGD moves by lr * ...)
FROZEN = ["--epochs", "1", "--max-steps", "1", "--lr", "1e-20", "--img-scale", "128,96",
          "--batch-size", "2", "--num-workers", "0", "--device", "cpu", "--no-eval"]  # fmt: skip


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _split(state):
    trunk = {k: v for k, v in state.items() if k.startswith("backbone.")}
    heads = {k: v for k, v in state.items() if not k.startswith("backbone.")}
    return trunk, heads


@pytest.fixture(scope="module")
def trunk_file(tmp_path_factory):
    """A retina_tiny trunk from a checkpoint whose weights are all perturbed (seed 7)."""
    d = tmp_path_factory.mktemp("trunk")
    torch.manual_seed(7)
    model = build_model("retina_tiny", num_classes=5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    save_checkpoint(d / "full.pth", model)
    pack_trunk(d / "full.pth", d / "trunk.pth")
    return d / "trunk.pth", d / "full.pth"


def test_pack_trunk_keeps_backbone_and_fpn_in_float16(trunk_file):
    trunk, full = trunk_file
    packed, whole = _state(trunk), _state(full)
    assert set(packed) == {k for k in whole if k.startswith("backbone.")}
    assert any(k.startswith("backbone.fpn.") for k in packed)
    assert any(k.startswith("backbone.body.") for k in packed)
    assert all(v.dtype == torch.float16 for v in packed.values() if v.is_floating_point())
    assert torch.load(trunk, weights_only=True)["kind"] == "trunk"


def test_load_trunk_loads_backbone_keeps_heads(trunk_file):
    trunk, _ = trunk_file
    torch.manual_seed(3)
    model = build_model("retina_tiny", num_classes=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    info = load_trunk(model, trunk)
    after = model.state_dict()
    packed = _state(trunk)
    assert info["loaded"] == len(packed) and info["kept"] == len(after) - len(packed)
    for k, v in after.items():
        if k in packed:
            assert torch.equal(v, packed[k].to(v.dtype)), k
            assert v.dtype == before[k].dtype
        else:
            assert torch.equal(v, before[k]), k  # the head as built
    assert not all(torch.equal(after[k], before[k]) for k in packed)


def test_trunk_without_reinit_heads_says_how(trunk_file):
    trunk, _ = trunk_file
    model = build_model("retina_tiny", num_classes=5)
    with pytest.raises(UserError, match="--reinit-heads"):
        load_weights(model, trunk)


def test_trunk_of_another_backbone_is_refused(trunk_file):
    trunk, _ = trunk_file
    model = build_model("retina_r18", num_classes=5)
    with pytest.raises(UserError, match="trunk .backbone \\+ FPN. of retina_r18"):
        load_trunk(model, trunk)


@pytest.mark.parametrize("command", ["train", "distill"])
def test_reinit_heads_is_the_seeds_fresh_head(command, trunk_file, synthetic_root, tmp_path):
    """Same seed: identical heads (the from-scratch run's heads); other seed: other heads; the
    trunk is the file's in every run."""
    trunk, _ = trunk_file
    model_flag = ["--model", "retina_tiny"]
    if command == "distill":
        model_flag = ["--student", "retina_tiny", "--method", "none"]
    out_name = "model.pth" if command == "train" else "student.pth"

    def run(name, seed, *extra):
        out = tmp_path / name
        argv = [command, *model_flag, "--data", str(synthetic_root), "--out", str(out),
                "--seed", str(seed), *FROZEN, *extra]  # fmt: skip
        assert _cli(argv) == 0
        return _split(_state(out / out_name))

    packed = _state(trunk)
    t0, h0 = run("a", 0, "--weights", str(trunk), "--reinit-heads")
    t0b, h0b = run("b", 0, "--weights", str(trunk), "--reinit-heads")
    t1, h1 = run("c", 1, "--weights", str(trunk), "--reinit-heads")
    _, h_scratch = run("d", 0)

    def same(a, b):
        return torch.allclose(a.float(), b.float(), rtol=0, atol=1e-12)

    for t in (t0, t0b, t1):
        assert all(same(t[k], packed[k]) for k in packed)
    assert all(same(h0[k], h0b[k]) and same(h0[k], h_scratch[k]) for k in h0)
    assert not all(same(h0[k], h1[k]) for k in h0)


def test_cli_trunk_without_flag_exits_2(trunk_file, synthetic_root, tmp_path, capsys):
    trunk, _ = trunk_file
    argv = ["train", "--model", "retina_tiny", "--data", str(synthetic_root), "--out",
            str(tmp_path / "r"), "--weights", str(trunk), *FROZEN]  # fmt: skip
    assert _cli(argv) == 2
    err = capsys.readouterr().err
    assert "--reinit-heads" in err and "Traceback" not in err

"""Options defined once: a dataclass field gives the typer flag, the ``--config`` key and the
``config.json`` record; shared groups compose; one meaning per flag name across commands."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from dfmsd_cli.cli import app, checks
from dfmsd_cli.cli.options import command
from dfmsd_cli.utils.options import (
    DataOptions,
    DeviceOptions,
    JsonOptions,
    flag_of,
    opt,
    option_fields,
    record,
    reuse,
)


@dataclass(kw_only=True)
class ToyOptions(DataOptions, DeviceOptions, JsonOptions):
    name: str = opt(help="A required name.", short="-N")
    num_images: int = opt(3, "How many.")
    split: str = reuse(DataOptions, "split", default="val2017")
    keep: bool = opt(True, "Keep it.", flag="--keep/--drop")
    tags: list[str] = opt([], "Tags (repeatable).", repeatable=True)
    where: Path = opt(Path("a.txt"), "A file.", deprecated=("--old-where",))


def _toy_app(seen: list):
    toy = typer.Typer()

    @command(toy, "toy", ToyOptions)
    def toy_cmd(o: ToyOptions) -> None:
        """A toy command."""
        seen.append(o)

    @toy.command("other")
    def other() -> None:  # a second command keeps typer in sub-command mode
        pass

    checks.install(toy)
    return toy


def test_fields_become_flags_with_defaults_and_types(tmp_path):
    seen: list = []
    argv = ["toy", "-N", "x", "--num-images", "5", "--drop", "--tags", "a", "--tags", "b"]
    res = CliRunner().invoke(_toy_app(seen), [*argv, "--data", str(tmp_path)])
    assert res.exit_code == 0, res.output
    (o,) = seen
    assert isinstance(o, ToyOptions)
    assert (o.name, o.num_images, o.keep, o.tags, o.data) == ("x", 5, False, ["a", "b"], tmp_path)
    assert (o.split, o.device, o.num_workers, o.json) == (
        "val2017",
        "auto",
        2,
        None,
    )  # group defaults
    assert record(o)["data"] == str(tmp_path) and json.dumps(record(o))  # config.json-ready


def test_required_field_and_count_check_apply():
    res = CliRunner().invoke(_toy_app([]), ["toy"])
    assert res.exit_code == 2 and "--name" in res.output
    res = CliRunner().invoke(_toy_app([]), ["toy", "-N", "x", "--num-images", "0"])
    assert "--num-images must be at least 1" in str(res.exception)


def test_config_keys_are_the_field_names(tmp_path):
    seen: list = []
    cfg = tmp_path / "c.toml"
    cfg.write_text('[toy]\nname = "from-file"\nnum-images = 7\ntags = ["t"]\n')
    res = CliRunner().invoke(_toy_app(seen), ["toy", "--config", str(cfg), "--num-images", "8"])
    assert res.exit_code == 0, res.output
    assert (seen[0].name, seen[0].num_images) == ("from-file", 8)  # the flag overrides the file
    assert seen[0].tags == ["t"]  # a TOML list feeds a repeatable option
    cfg.write_text("[toy]\nold_where = 'x'\n")  # a deprecated spelling is no config key
    res = CliRunner().invoke(_toy_app([]), ["toy", "--config", str(cfg)])
    assert "unknown option 'old_where'" in str(res.exception)


def test_deprecated_spelling_warns_and_feeds_the_field():
    seen: list = []
    res = CliRunner().invoke(_toy_app(seen), ["toy", "-N", "x", "--old-where", "b.txt"])
    assert res.exit_code == 0, res.output
    assert seen[0].where == Path("b.txt")
    assert "--old-where is deprecated: use --where" in res.stderr
    help_text = CliRunner().invoke(_toy_app([]), ["toy", "--help"]).output
    assert "--old-where" not in help_text and "--where" in help_text


def test_reuse_keeps_the_flag_and_changes_the_default():
    split = {f.name: f for f, _ in option_fields(ToyOptions)}["split"]
    assert split.default == "val2017" and flag_of(split) == "--split"
    assert split.metadata["help"] == dataclasses.fields(DataOptions)[1].metadata["help"]
    names = [f.name for f, _ in option_fields(ToyOptions)]
    assert names[:2] == ["name", "num_images"]  # the command's own options first


def _flags(app_: typer.Typer):
    """(command, flag, parameter type) of every option of every command."""
    for cmd, name, base, info in checks.iter_options(app_):
        if not name.startswith("deprecated__"):
            decls = [d for d in (info.param_decls or ()) if d.startswith("--")]
            yield cmd, (decls[0] if decls else "--" + name.replace("_", "-")).split("/")[0], base


CONVERTED = ("precompute", "eval", "bench", "demo", "cache", "viz", "make-data", "check-data",
             "models", "convert", "train", "distill")  # fmt: skip
# Kept as they were (docs/options.md): --epochs is one int for train and a per-stage comma
# list for distill/demo (one value per stage; train has one stage).
TWO_TYPES = {"--epochs": {int, str}}


def test_one_meaning_per_flag_name():
    """--images is a folder, --out a folder, --json a file path, in every converted command;
    counts of images are --num-images."""
    types: dict[str, set] = {}
    for cmd, flag, base in _flags(app):
        if cmd.split()[0] in CONVERTED:
            types.setdefault(flag, set()).add(base)
    assert types["--images"] == {Path} and types["--json"] == {Path} and types["--out"] == {Path}
    assert types["--num-images"] == {int} and types["--data"] == {Path}
    assert {f: types[f] for f in TWO_TYPES} == TWO_TYPES
    mixed = {f: t for f, t in types.items() if len(t) > 1 and f not in TWO_TYPES}
    assert mixed == {}


@pytest.mark.parametrize(
    "cmd", ["precompute", "eval", "demo", "check-data", "models", "train", "distill"]
)
def test_converted_commands_take_a_config_file(cmd):
    names = {name for c, name, _, _ in checks.iter_options(app) if c == cmd}
    assert "config" in names


def test_a_count_check_declared_at_the_field():
    """``opt(count=(1, ...))`` registers the name's check; a second minimum for the same name
    is refused at declaration (one meaning per flag name)."""
    assert checks.COUNTS["num_images"][0] == 1  # declared by NumImagesOptions, not in the table

    @dataclass(kw_only=True)
    class Clash:
        num_images: int = opt(3, "How many.", count=(0, "something else"))

    with pytest.raises(TypeError, match="one meaning per name"):
        command(typer.Typer(), "clash", Clash)(lambda o: None)


def test_train_and_distill_options_from_flags_and_config(tmp_path):
    """The library dataclasses are the commands' options: text options are parsed into their
    values, --no-eval/--no-sal are negative switches, method flags land in method_options, and
    the TOML keys are the flag names."""
    from dfmsd_cli.distill.run import DistillOptions
    from dfmsd_cli.engine.train import TrainOptions

    seen: list = []
    toy = typer.Typer()
    command(toy, "train", TrainOptions)(lambda o: seen.append(o))
    command(toy, "distill", DistillOptions)(lambda o: seen.append(o))
    argv = ["train", "-m", "retina_tiny", "-o", "r", "--img-scale", "96,64", "--steps", "8,11",
            "--no-eval", "--grad-clip", "35"]  # fmt: skip
    assert CliRunner().invoke(toy, argv).exit_code == 0
    t = seen.pop()
    assert (t.img_scale, t.steps, t.evaluate, t.grad_clip, t.epochs) == (
        (96, 64),
        (8, 11),
        False,
        35.0,
        12,
    )
    assert TrainOptions(model="m", out=Path("r")).img_scale == (1333, 800)
    cfg = tmp_path / "d.toml"
    cfg.write_text('[distill]\nepochs = [1, 2]\nno-sal = true\nalpha = 0.5\nno-eval = true\n'
                   'stages = "a, b"\n')  # fmt: skip
    argv = ["distill", "-s", "retina_tiny", "-o", "r", "--config", str(cfg), "--grad-clip", "0",
            "--mask-rule", "top"]  # fmt: skip
    res = CliRunner().invoke(toy, argv)
    assert res.exit_code == 0, res.output
    d = seen.pop()
    assert (d.epochs, d.stages, d.evaluate, d.grad_clip, d.img_scale) == (
        (1, 2),
        ("a", "b"),
        False,
        None,
        None,
    )
    assert d.method_options["sal"] is False and d.method_options["alpha"] == 0.5
    assert d.method_options["mask_rule"] == "top" and d.method_options["beta"] is None
    rec = record(d)
    assert rec["alpha"] == 0.5 and rec["epochs"] == [1, 2] and "method_options" not in rec
    assert DistillOptions(student="s", out=Path("r")).grad_clip == 35.0  # the distill recipe

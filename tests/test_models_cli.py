"""``dfmsd models``: table and JSON listing of the registry."""

from __future__ import annotations

import json

import pytest

from dfmsd_cli.cli import main


def _run(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:  # typer's standalone mode always exits
        main(args)
    return exc.value.code


def test_models_json(capsys):
    assert _run(["models", "*_tiny", "--json", "-"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_name = {r["name"]: r for r in rows}
    assert {"retina_tiny", "fcos_tiny", "frcnn_tiny", "mrcnn_tiny"} <= set(by_name)
    r = by_name["retina_tiny"]
    assert r["strides"] == [8, 16, 32, 64, 128] and r["channels"] == 64
    assert 500_000 < r["parameters"] < 3_000_000
    assert by_name["mrcnn_tiny"]["has_masks"] is True


def test_models_table_and_torchvision_column(capsys):
    assert _run(["models", "retina_r50"]) == 0
    out = capsys.readouterr().out
    assert "retina_r50" in out and "33.81 M" in out and "COCO" in out and "36.4" in out


def test_models_unknown_pattern_exits_2(capsys):
    assert _run(["models", "nope*"]) == 2
    assert "no model matches 'nope*'" in capsys.readouterr().err

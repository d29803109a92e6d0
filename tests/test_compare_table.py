"""examples/compare_table.py on a fabricated results tree: paired Δ, sign counts, skips, JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "compare_table.py"


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("compare_table", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(root, pair, row, seed, mAP, steps=100, **extra):
    d = root / pair / row / f"s{seed}"
    d.mkdir(parents=True)
    bbox = {c: mAP for c in ("mAP", "APs", "APm", "APl", "mAR", "ARs", "ARm", "ARl")}
    bbox.update(extra)
    stages = [{"iterations": steps // 2, "epochs_done": 1}, {"iterations": steps - steps // 2,
              "epochs_done": 1, "val": {"bbox": bbox}}]  # fmt: skip
    (d / "summary.json").write_text(json.dumps({"stages": stages, "seconds": 10.0}))
    (d / "config.json").write_text(json.dumps({"options": {"seed": seed, "method": row}}))
    (d / "student.pth").write_bytes(b"x")
    return d


@pytest.fixture()
def tree(tmp_path):
    """het: alone 0.10/0.20/0.30 on seeds 0-2; 'a' beats it by 0.02/0.01/0.03 (paired, though its
    spread across seeds is larger than the gaps); 'b' is worse on 2 of 3; 'c' skipped; 'd'
    unfinished (no student.pth); APl of seed 2 is -1 (no large objects) for alone."""
    for s, base in enumerate((0.10, 0.20, 0.30)):
        _run(tmp_path, "het", "none", s, base, APl=-1 if s == 2 else base)
        _run(tmp_path, "het", "a", s, base + (0.02, 0.01, 0.03)[s])
        _run(tmp_path, "het", "b", s, base + (-0.01, 0.02, -0.03)[s])
    (tmp_path / "het" / "c").mkdir()
    (tmp_path / "het" / "c" / "s0.skipped").write_text("error: c needs logits: use a pair ...")
    d = _run(tmp_path, "het", "d", 0, 0.5)
    (d / "student.pth").unlink()
    t = tmp_path / "het" / "a" / "s0.time.json"
    t.write_text('Command exited with non-zero status 1\n{"wall_s": 5, "user_s": 3, "sys_s": 1}\n'
                 '{"wall_s": 7, "user_s": 5, "sys_s": 1}\n')  # fmt: skip
    (tmp_path / "data" / "x" / "s0").mkdir(parents=True)  # compare.sh's data folder: not a pair
    (tmp_path / "cache-uint8" / "gfl_tiny" / "s0").mkdir(parents=True)  # a store folder: neither
    return tmp_path


def test_paired_delta_and_sign_count(table, tree):
    pairs = table.aggregate(table.collect(tree))
    assert list(pairs) == ["het"]
    rows = pairs["het"]["rows"]
    assert list(rows)[0] == "none" and "delta" not in rows["none"]
    a = rows["a"]["delta"]["mAP"]
    assert a["mean"] == pytest.approx(2.0) and a["std"] == pytest.approx(1.0)
    assert (a["better"], a["n"]) == (3, 3)
    assert a["per_seed"] == {"0": 2.0, "1": 1.0, "2": 3.0}
    # t = 2 / (1 / sqrt 3) = 3.46 > t_0.975(2) = 4.303? no: not significant with 3 seeds
    assert a["significant"] is False
    b = rows["b"]["delta"]["mAP"]
    assert b["mean"] == pytest.approx(-0.6667, abs=1e-2) and (b["better"], b["n"]) == (1, 3)
    # a column with -1 for one seed of the baseline: paired over the seeds that have it
    assert rows["a"]["delta"]["APl"]["n"] == 2
    assert rows["none"]["mean"]["APl"] == pytest.approx(15.0)
    assert rows["a"]["mean"]["mAP"] == pytest.approx(22.0)
    assert rows["a"]["steps"] == [100]
    assert rows["a"]["cpu_seconds_per_step"] == pytest.approx(0.1)  # (3+1+5+1) / 100
    assert rows["c"]["n"] == 0 and rows["c"]["skipped"].startswith("error: c needs logits")
    assert rows["d"]["n"] == 0


def test_significance_with_enough_seeds(table):
    base = {s: {"mAP": 0.1} for s in range(5)}
    row = {s: {"mAP": 0.1 + d} for s, d in enumerate((0.02, 0.01, 0.03, 0.02, 0.02))}
    d = table.paired_delta(row, base, "mAP")
    assert d["significant"] is True and d["better"] == 5  # t = 2 / (0.71 / sqrt 5) = 6.3 > 2.78
    flat = {s: {"mAP": 0.1 + d} for s, d in enumerate((0.05, -0.04, 0.03, -0.02, 0.01))}
    assert table.paired_delta(flat, base, "mAP")["significant"] is False


def test_markdown_and_results_json(table, tree):
    out = tree / "results.json"
    md = table.main([str(tree), "--json", str(out)])
    assert "| student alone | 3 | 20.0 ± 10.0 |" in md
    assert "| +2.0 ± 1.0 | 3/3 | no |" in md
    assert "c: skipped — error: c needs logits" in md
    one = table.render(table.aggregate([r for r in table.collect(tree) if r["seed"] == 0]))
    assert "| student alone | 1 | 10.0 | 10.0 |" in one and "| +2.0 | 1/1 | no |" in one
    res = json.loads(out.read_text())
    assert res["seeds"] == [0, 1, 2] and res["columns"][:2] == ["mAP", "APs"]
    statuses = sorted(r["status"] for r in res["runs"])
    assert statuses.count("done") == 9 and "skipped" in statuses and "unfinished" in statuses
    run = next(r for r in res["runs"] if r["row"] == "a" and r["seed"] == 0)
    assert run["config"] == {"seed": 0, "method": "a"} and run["metrics"]["mAP"] == pytest.approx(
        0.12
    )
    assert run["cpu_seconds"] == 10 and run["wall_seconds"] == 12
    assert res["pairs"]["het"]["rows"]["a"]["delta"]["mAP"]["mean"] == pytest.approx(2.0)


def test_paired_delta_against_another_row(table, tree):
    """--versus a: every row's Δ mAP against row 'a' on the seeds both have (b - a per seed:
    -0.03, +0.01, -0.06 -> mean -2.67, better on 1 of 3)."""
    pairs = table.aggregate(table.collect(tree), versus=("a",))
    rows = pairs["het"]["rows"]
    b = rows["b"]["versus"]["a"]
    assert b["mean"] == pytest.approx(-2.67, abs=1e-2) and (b["better"], b["n"]) == (1, 3)
    assert rows["none"]["versus"]["a"]["mean"] == pytest.approx(-2.0)
    assert "versus" not in rows["a"] and "versus" not in rows["c"]
    md = table.main([str(tree), "--versus", "a"])
    assert "paired Δ mAP vs a" in md and "| b | -2.7 ± 3.5 | 1/3 | no |" in md


def test_prior_results_fill_in_and_yield_to_new_runs(table, tree, tmp_path_factory):
    """An earlier results.json adds the runs ROOT lacks (marked with where they came from); a
    finished run under ROOT wins over the earlier record; the earlier record wins over an
    unfinished run; a file that is not a results.json is refused."""
    old = tmp_path_factory.mktemp("old")
    _run(old, "het", "none", 3, 0.40)
    _run(old, "het", "a", 3, 0.45)
    _run(old, "het", "a", 0, 0.99)  # ROOT has het/a/s0 finished: this one must not count
    _run(old, "het", "d", 0, 0.60)  # ROOT's het/d/s0 is unfinished: this one counts
    prior = old / "results.json"
    table.main([str(old), "--json", str(prior)])
    runs = table.merge_prior(table.collect(tree), [prior])
    by = {(r["pair"], r["row"], r["seed"]): r for r in runs}
    assert by[("het", "a", 0)]["metrics"]["mAP"] == pytest.approx(0.12)
    assert "from" not in by[("het", "a", 0)]
    assert by[("het", "a", 3)]["from"] == str(prior)
    assert by[("het", "d", 0)]["status"] == "done" and by[("het", "d", 0)]["from"] == str(prior)
    a = table.aggregate(runs)["het"]["rows"]["a"]["delta"]["mAP"]
    assert a["n"] == 4 and a["per_seed"]["3"] == pytest.approx(5.0)
    bad = old / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(SystemExit, match="not a compare_table.py results.json"):
        table.merge_prior([], [bad])


def test_paper_budget_row_is_paired_with_the_alone_run_at_its_budget(table, tmp_path):
    """dfmsd-paper (2x steps) is compared with none-paper (the student alone at 2x), not with
    the 1x student alone; none-paper itself with the 1x one."""
    for s in range(3):
        _run(tmp_path, "het", "none", s, 0.10)
        _run(tmp_path, "het", "none-paper", s, 0.20)
        _run(tmp_path, "het", "dfmsd-paper", s, 0.25 + 0.01 * s)
    rows = table.aggregate(table.collect(tmp_path))["het"]["rows"]
    paper = rows["dfmsd-paper"]
    assert paper["baseline"] == "none-paper"
    assert paper["delta"]["mAP"]["mean"] == pytest.approx(6.0)
    assert rows["none-paper"]["baseline"] == "none"
    assert rows["none-paper"]["delta"]["mAP"]["mean"] == pytest.approx(10.0)

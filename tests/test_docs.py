"""The documentation follows the code: docs/cli.md is the generated reference of every command
and option, every relative link in README.md and docs/ resolves (file and heading anchor), and
the fast test tier (``pytest -m "not slow"``) imports every dfmsd_cli subpackage."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from dfmsd_cli.cli import reference

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


# ------------------------------------------------------------------- generated CLI reference
def test_cli_reference_is_up_to_date():
    """docs/cli.md equals what the code generates (regenerate: python -m
    dfmsd_cli.cli.reference)."""
    assert reference.DOC == REPO / "docs" / "cli.md"
    want = reference.render()
    got = reference.DOC.read_text(encoding="utf-8") if reference.DOC.is_file() else ""
    assert got == want, "docs/cli.md is out of date: run python -m dfmsd_cli.cli.reference"


def test_every_command_and_option_is_in_the_reference():
    text = reference.render()
    seen = 0
    for path, cmd, _ctx in reference.walk():
        title = " ".join(path)
        assert f"## `{title}`" in text, title
        section = text.split(f"## `{title}`\n", 1)[1].split("\n## ", 1)[0]
        for param in cmd.params:
            if getattr(param, "hidden", False):
                continue
            for opt in [*param.opts, *param.secondary_opts]:
                assert re.search(rf"`[^`]*{re.escape(opt)}\b", section), f"{title} {opt}"
                seen += 1
    assert seen > 100  # the walk really visited the commands' options


def test_reference_check_mode(tmp_path, capsys):
    page = tmp_path / "cli.md"
    assert reference.main([str(page)]) == 0
    assert reference.main(["--check", str(page)]) == 0
    page.write_text(page.read_text() + "stale\n")
    assert reference.main(["--check", str(page)]) == 1
    assert "out of date" in capsys.readouterr().err


# flags the docs name that are not dfmsd's: torchrun, pytest, tools/mmdet_parity.py, the reference
FOREIGN_FLAGS = {
    "--nproc",
    "--nproc-per-node",
    "--durations",
    "--help",
    "--check",
    "--all",
    "--checkpoint",
    "--markdown",
    "--no-spread",
    "--size",
    "--softmax-std",
    "--losses",  # tools/mmdet_parity.py
    "--latency",  # examples/s3_read_bench.py
    "--batch",  # examples/s3_read_bench.py
    "--versus",  # examples/compare_table.py
    "--prior",  # examples/compare_table.py
}


def test_every_flag_the_docs_name_exists():
    """A flag renamed or removed in the code cannot live on in README or docs/ (docs/cli.md is
    regenerated; the hand-written pages are checked here)."""
    flags = set()
    for _path, cmd, _ctx in reference.walk():
        for param in cmd.params:
            flags |= {*param.opts, *param.secondary_opts}
    stale = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for flag in sorted(set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))):
            if flag not in flags | FOREIGN_FLAGS:
                stale.append(f"{page.relative_to(REPO)}: {flag}")
    assert stale == [], "flags in the docs that no dfmsd command has"


def test_readme_command_table_names_every_command():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for path, _cmd, _ctx in reference.walk():
        if len(path) == 2:
            assert f"`dfmsd {path[1]}" in readme, f"README's command table lacks {path[1]}"


# ------------------------------------------------------------------------------------ links
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
_CODE = re.compile(r"`[^`\n]*`")
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _prose(text: str) -> str:
    """Markdown without fenced blocks, inline code and comments (their brackets are code)."""
    return _CODE.sub("", _FENCE.sub("", _COMMENT.sub("", text)))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: markup and punctuation dropped, lower case, spaces to
    hyphens (github-slugger)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = text.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Anchors of every heading in ``page``; repeated headings get -1, -2, ... as on GitHub."""
    found: set[str] = set()
    counts: dict[str, int] = {}
    for line in _FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = counts.get(base, 0)
            counts[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(page: Path) -> list[str]:
    """Relative link targets in ``page`` (web, mail and absolute links are left out)."""
    out = []
    for target in _LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("/"):
            continue
        out.append(target)
    return out


def test_slug_matches_github():
    assert slug("Quick start: `dfmsd demo`") == "quick-start-dfmsd-demo"
    assert slug("`dfmsd cache verify`") == "dfmsd-cache-verify"
    assert slug("Install and the two commands") == "install-and-the-two-commands"
    assert slug("Store (`store/`), see issue 3") == "store-store-see-issue-3"


def test_link_checker_finds_broken_links(tmp_path):
    (tmp_path / "a.md").write_text("# Top\n## Two words\n")
    page = tmp_path / "b.md"
    page.write_text(
        "[ok](a.md#two-words) [web](https://x.org) `[code](nope.md)` [bad](missing.md)\n"
        "```\n[fenced](nope2.md)\n```\n[badanchor](a.md#nope) [self](#b)\n# B\n"
    )
    assert links(page) == ["a.md#two-words", "missing.md", "a.md#nope", "#b"]
    assert _broken(page) == ["missing.md", "a.md#nope"]


def _broken(page: Path) -> list[str]:
    bad = []
    for target in links(page):
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            bad.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(target)
    return bad


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    assert _broken(page) == [], f"{page.relative_to(REPO)}: broken links"


def test_docs_pages_named_in_code_and_scripts_exist():
    """Docstrings, comments and scripts that point to a docs page (``docs/<page>.md``) name a
    page that exists (pages move; the mentions are not links, so the link test cannot see them)."""
    files = [*(REPO / "dfmsd_cli").rglob("*.py"), *(REPO / "tests").glob("*.py")]
    files += [f for d in ("examples", "tools", ".ci") for f in (REPO / d).rglob("*") if f.is_file()]
    files += PAGES
    stale = set()
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for name in re.findall(r"\bdocs/[\w./-]*?\.md\b", text):
            if not (REPO / name).is_file():
                stale.add(f"{f.relative_to(REPO)}: {name}")
    assert sorted(stale) == []


# ------------------------------------------------------------------ fast tier covers modules
def _is_slow(decorators: list[ast.expr]) -> bool:
    return any("slow" in ast.unparse(d) for d in decorators)


def _imports(node: ast.AST) -> set[str]:
    """dfmsd_cli modules imported anywhere inside ``node`` (``from a import b`` adds a.b too)."""
    found = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Import):
            found |= {a.name for a in sub.names if a.name.startswith("dfmsd_cli")}
        elif isinstance(sub, ast.ImportFrom) and (sub.module or "").startswith("dfmsd_cli"):
            found.add(sub.module)
            found |= {f"{sub.module}.{a.name}" for a in sub.names}
    return found


def fast_tier_imports(test_dir: Path) -> set[str]:
    """dfmsd_cli modules imported by tests outside the slow tier: module-level imports of a
    file with at least one unmarked test, and the imports inside unmarked tests/fixtures."""
    found: set[str] = set()
    for file in sorted(test_dir.glob("test_*.py")):
        tree = ast.parse(file.read_text(encoding="utf-8"))
        marks = [ast.unparse(n) for n in tree.body if isinstance(n, ast.Assign)]
        if any("pytestmark" in m and "slow" in m for m in marks):  # the whole file is slow
            continue
        funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)]
        fast = [f for f in funcs if not _is_slow(f.decorator_list)]
        if any(f.name.startswith("test") for f in fast):
            found |= _imports(ast.Module([n for n in tree.body if n not in funcs], []))
        for f in fast:
            found |= _imports(f)
    return found


def test_fast_tier_imports_every_subpackage():
    """Each dfmsd_cli subpackage (and top-level module) is imported by a test that
    ``pytest -m "not slow"`` runs, so the fast tier touches every part of the code."""
    pkg = REPO / "dfmsd_cli"
    parts = {p.name for p in pkg.iterdir() if (p / "__init__.py").is_file()}
    parts |= {p.stem for p in pkg.glob("*.py") if not p.stem.startswith("_")}
    imported = fast_tier_imports(REPO / "tests")
    missing = sorted(p for p in parts if not any(m.split(".")[1:2] == [p] for m in imported))
    assert missing == [], f"no fast (unmarked) test imports dfmsd_cli.{missing}"

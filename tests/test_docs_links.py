"""The documents a reader gets with the repository hold together: every relative link in README.md
and docs/*.md names a file inside the repository (and a heading that exists, for an anchor), none
points outside it (e.g. to a folder beside the repository), and the worked adapter in docs/adapter.md is the code
that the tests run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|^\s*\[[^\]\n]+\]:\s*<?(\S+?)>?\s*$|"
                  r"href=[\"']([^\"']+)[\"']", re.M)
EXTERNAL = ("http://", "https://", "mailto:")


def links(md: str) -> list[str]:
    """Link targets outside code: inline, reference-style and HTML href."""
    text = INLINE_CODE.sub("", FENCE.sub("", md))
    return [next(g for g in m.groups() if g) for m in LINK.finditer(text)]


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    h = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\- ]", "", h))


def anchors(md: str) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", FENCE.sub("", md), re.M)}


def problems(doc: Path, md: str | None = None) -> list[str]:
    """What is wrong with the links of `doc` (its text, or `md` read as if it were at `doc`)."""
    out = []
    md = doc.read_text() if md is None else md
    for target in links(md):
        if target.startswith(EXTERNAL):
            continue
        path, _, anchor = target.partition("#")
        if path.startswith("/"):
            out.append(f"{target}: absolute path (not portable, maybe outside the repository)")
            continue
        dest = (doc.parent / path).resolve() if path else doc
        try:
            dest.relative_to(ROOT)
        except ValueError:
            out.append(f"{target}: points outside the repository")
            continue
        if not dest.exists():
            out.append(f"{target}: no such file in the repository")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            out.append(f"{target}: {dest.relative_to(ROOT)} has no heading #{anchor}")
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(doc):
    assert problems(doc) == []


def test_docs_exist_and_are_linked_from_the_index():
    index = (ROOT / "docs" / "index.md").read_text()
    for name in ("design.md", "invariants.md", "reading-a-report.md", "adapter.md"):
        assert (ROOT / "docs" / name).exists(), name
        assert f"]({name})" in index, f"docs/index.md does not link {name}"


def test_the_checker_catches_bad_links():
    """The checker itself can fail: outside the repository, missing file, missing anchor, absolute."""
    md = ("[a](../../outside/NOTES.md) [b](nope.md) [c](design.md#no-such-heading) [d](/etc/passwd) "
          "`[e](ignored.md)` [f](https://example.com) [g](design.md) [h](#the-adapter-api)\n[i]: ../../x.md\n")
    got = problems(ROOT / "docs" / "adapter.md", md)
    assert [g.split(": ")[0] for g in got] == ["../../outside/NOTES.md", "nope.md", "design.md#no-such-heading",
                                              "/etc/passwd", "../../x.md"]


def test_worked_adapter_in_the_doc_is_the_shipped_code():
    md = (ROOT / "docs" / "adapter.md").read_text()
    marker = "<!-- example: conformance/examples/dict_cache.py -->\n```python\n"
    assert marker in md
    block = md.split(marker, 1)[1].split("\n```\n", 1)[0] + "\n"
    assert block == (ROOT / "conformance" / "examples" / "dict_cache.py").read_text(), \
        "docs/adapter.md's copy of dict_cache.py differs from the file: paste the file in again"


def test_report_doc_states_the_verdicts_exit_codes():
    """docs/reading-a-report.md's table of verdicts says what `refcache verify` exits with."""
    from campaign.verify import EXIT

    md = (ROOT / "docs" / "reading-a-report.md").read_text()
    for verdict, code in EXIT.items():
        assert f"| `{verdict}` | {code} |" in md, f"reading-a-report.md: {verdict} should exit {code}"
    assert "| (usage error) | 2 |" in md


def test_design_doc_classifies_every_seeded_bug():
    """Every seeded bug appears in design.md's table of bug classes (a new one must be placed)."""
    from stateful_tests.seeded_bugs import SEEDED_BUGS

    md = (ROOT / "docs" / "design.md").read_text()
    table = md.split("## Bug classes and the seeded bugs", 1)[1]
    missing = [name for name in SEEDED_BUGS if f"`{name}`" not in table]
    assert not missing, f"docs/design.md does not place these seeded bugs in a bug class: {missing}"

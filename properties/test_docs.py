"""The invariant pages are generated from the registry, as Markdown and HTML."""

import re
from html.parser import HTMLParser

from properties.docs import checking_tests, generate
from properties.prove import run_all
from properties.registry import INVARIANTS


def test_docs_generated(tmp_path):
    proofs = run_all(2, budget_s=60, transitions=["lock", "unlock"], bugs=["class4_lock_host_only_bottom"])
    paths = generate(tmp_path / "inv", proofs=proofs, steps={"steps": 1234})
    md = (tmp_path / "inv" / "index.md").read_text()
    page = (tmp_path / "inv" / "index.html").read_text()
    for i, inv in INVARIANTS.items():
        assert f"## {i}" in md and inv.statement in md
        assert f"id='{i}'" in page
        assert (tmp_path / "inv" / f"{i}.md").exists()
    assert "proved inductive over 2 transitions for every tree of up to 2 nodes" in md
    assert "checked in 1234 stateful steps" in md
    assert "sgl-project/sglang PR #23696" in md  # bug history of T3
    assert "Z3 counterexample via lock (N=2)" in md
    HTMLParser().feed(page)
    assert len(paths) == 2 + len(INVARIANTS)


def test_checking_tests_are_found():
    named = checking_tests(["X2"])
    assert "tests/test_walk_finds_seeded_bugs.py::test_class1_seeded_bug_is_caught_by_x2" in named["X2"]


def test_command_writes_pages(tmp_path, capsys):
    from properties.docs import main

    steps = tmp_path / "summary.json"
    steps.write_text('{"clean": {"steps": 77}}')
    assert main(["--out", str(tmp_path / "d"), "--no-proofs", "--campaign", str(steps)]) == 0
    assert "checked in 77 stateful steps" in (tmp_path / "d" / "T1.md").read_text()


def test_committed_reference_is_fresh():
    """docs/invariants.md is what `python -m properties.docs --write docs/invariants.md` writes now:
    a change to the registry, a predicate, an encoding or the transitions must regenerate it."""
    import difflib

    from properties.docs import REFERENCE, REGENERATE, ROOT, reference_md

    want = reference_md()
    have = (ROOT / REFERENCE).read_text() if (ROOT / REFERENCE).exists() else ""
    diff = "".join(list(difflib.unified_diff(have.splitlines(True), want.splitlines(True), f"{REFERENCE} (committed)",
                                             f"{REFERENCE} (generated now)", n=1))[:40])
    assert have == want, f"{REFERENCE} is stale: run `{REGENERATE}` and commit it.\n{diff}"


def test_reference_covers_every_invariant_and_bug():
    from properties.docs import reference_md
    from properties.registry import BUGS
    from properties.transitions import TRANSITIONS

    md = reference_md()
    for i, inv in INVARIANTS.items():
        assert f"### {i}\n" in md and " ".join(inv.statement.split()) in md
        assert f"refcache.invariants.{inv.predicate.__name__}" in md
        if inv.z3 is not None:
            assert f"properties.encodings.{inv.z3.__name__}" in md
    assert all(f"| `{t}` |" in md for t in TRANSITIONS)
    assert all(f"| {b} |" in md for b in BUGS)
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", md)  # no date: the committed file would always be stale

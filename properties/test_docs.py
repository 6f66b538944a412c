"""The invariant pages are generated from the registry, as Markdown and HTML."""

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

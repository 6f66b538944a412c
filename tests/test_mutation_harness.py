"""The mutation harness (`benchmarks/mutation*.py`) can fail both ways: a mutant that breaks
`page_align` is killed by the unit-test check while the unmutated code is not, and an exception at
import counts as a campaign kill. The cosmic-ray part (enumerating refcache/pages.py) runs only
where the `mutation` extra is installed; the rest needs nothing beyond the `test` extra.

Checks run as fresh interpreters ("spawn"): this process already holds the real `refcache`, so it
must not be forked into a check.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.mutation import classify_campaign, classify_tests
from benchmarks.mutation_run import Child, Sandbox, make_sandbox, run_child

PAGE_ALIGN_TESTS = ["tests/test_pages.py::test_page_align_examples"]
ALIGNED = "    return n_tokens - n_tokens % page_size\n"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Sandbox:
    return Sandbox(make_sandbox(tmp_path_factory.mktemp("mutation")))


def unit_test_check(sb: Sandbox, ids: list[str]) -> dict:
    child = run_child(Child(sb.path, {"phase": "tests", "ids": ids}, mode="spawn", log=sb.path / ".check.log",
                            limit_for=lambda test: 120.0))
    return classify_tests(child)


def test_unit_test_check_kills_a_broken_page_align_and_passes_the_original(sandbox):
    source = (sandbox.path / "refcache/pages.py").read_text()
    assert ALIGNED in source
    assert unit_test_check(sandbox, PAGE_ALIGN_TESTS)["status"] == "survived"
    sandbox.apply("refcache/pages.py", source.replace(ALIGNED, ALIGNED.replace(" - ", " + ")))
    try:
        verdict = unit_test_check(sandbox, PAGE_ALIGN_TESTS)
    finally:
        sandbox.restore()
    assert verdict["status"] == "killed-by-tests-only", verdict
    assert "test_page_align_examples" in verdict["killed_by"]
    assert (sandbox.path / "refcache/pages.py").read_text() == source


def test_an_exception_at_import_is_a_campaign_kill(sandbox):
    source = (sandbox.path / "refcache/pages.py").read_text()
    sandbox.apply("refcache/pages.py", source + "\nraise RuntimeError('mutant')\n")
    try:
        child = run_child(Child(sandbox.path, {"phase": "campaign", "machines": [], "seed": 1, "budget": 0.5},
                                mode="spawn", log=sandbox.path / ".check.log"))
    finally:
        sandbox.restore()
    verdict = classify_campaign(child)
    assert verdict is not None and verdict["status"] == "killed-by-campaign", (verdict, child.messages)
    assert verdict["killed_by"] == "exception" and "mutant" in verdict["detail"]


def test_cosmic_ray_enumerates_pages_and_its_page_align_mutant_is_killed(sandbox):
    pytest.importorskip("cosmic_ray")
    from benchmarks.mutation import enumerate_module, mutant_source

    mutants, _ = enumerate_module("pages", cache=False)
    assert len(mutants) > 50
    assert len({m.id for m in mutants}) == len(mutants)
    m = next(m for m in mutants if m.operator.endswith("ReplaceBinaryOperator_Sub_Add") and m.function == "page_align")
    assert m.before == ALIGNED.strip() and m.after == ALIGNED.strip().replace(" - ", " + ")
    _, mutated = mutant_source(m, Path(sandbox.path))
    sandbox.apply(m.path, mutated)
    try:
        verdict = unit_test_check(sandbox, PAGE_ALIGN_TESTS)
    finally:
        sandbox.restore()
    assert verdict["status"] == "killed-by-tests-only", verdict


@pytest.mark.parametrize("argv", [["--tests-only"], ["--tests-only", "--recheck"], ["--tests-only", "--no-tests"]])
def test_tests_only_needs_a_recheck_of_listed_survivors(argv, capsys):
    """`--tests-only` trusts an earlier campaign verdict, so it only runs over a listed recheck."""
    from benchmarks.mutation import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "--tests-only re-checks listed campaign survivors" in capsys.readouterr().err


def test_whole_suite_counts_test_kills_the_campaign_view_does_not():
    """The two figures of the report: a mutant the unit tests killed after the campaign missed it
    counts for the whole suite only."""
    from benchmarks.mutation import tables

    ms = [{"id": "a", "module": "pages", "status": "killed-by-campaign"},
          {"id": "b", "module": "pages", "status": "killed-by-tests-only", "check": "tests"},
          {"id": "c", "module": "pages", "status": "survived"}]
    t = tables(ms, {})
    assert (t["campaign"][-1]["killed"], t["suite"][-1]["killed"]) == (1, 2)
    assert t["suite"][-1]["score"] == pytest.approx(2 / 3) and t["campaign"][-1]["score"] == pytest.approx(1 / 3)


def test_a_gap_stays_a_miss_while_equivalent_and_benign_leave_the_denominator():
    from benchmarks.mutation import tables

    ms = [{"id": "k", "module": "pages", "status": "killed-by-campaign"},
          {"id": "e", "module": "pages", "status": "survived"},
          {"id": "g", "module": "pages", "status": "survived"}]
    gap = tables(ms, {"e": {"verdict": "equivalent", "reason": ""}, "g": {"verdict": "gap", "reason": ""}})
    benign = tables(ms, {"e": {"verdict": "equivalent", "reason": ""}, "g": {"verdict": "benign", "reason": ""}})
    assert gap["campaign"][-1]["score_non_equivalent"] == pytest.approx(1 / 2)
    assert benign["campaign"][-1]["score_non_equivalent"] == pytest.approx(1.0)


def test_each_view_judges_its_own_outcome():
    """A campaign timeout whose unit tests ran later stays a campaign timeout, and a benign campaign
    survivor that a unit test kills stays out of the campaign's denominator (the campaign figure does
    not move because the unit tests ran) while the whole suite counts it killed."""
    from benchmarks.mutation import tables

    ms = [{"id": "k", "module": "pages", "status": "killed-by-campaign", "check": "campaign"},
          {"id": "t", "module": "pages", "status": "killed-by-tests-only", "check": "tests",
           "campaign": "timeout (earlier run)"},
          {"id": "b", "module": "pages", "status": "killed-by-tests-only", "check": "tests",
           "campaign": "survived (earlier run)"},
          {"id": "g", "module": "pages", "status": "survived", "campaign": "survived (earlier run)"}]
    t = tables(ms, {"b": {"verdict": "benign", "reason": ""}, "g": {"verdict": "gap", "reason": ""}})
    camp, suite = t["campaign"][-1], t["suite"][-1]
    assert (camp["killed"], camp["timeout"], camp["survived"], camp["benign"]) == (1, 1, 2, 1)
    assert camp["score_non_equivalent"] == pytest.approx(2 / 3)  # k, t of k, t, g
    assert (suite["killed"], suite["timeout"], suite["survived"], suite["benign"]) == (3, 0, 1, 0)
    assert suite["score_non_equivalent"] == pytest.approx(3 / 4)


def test_tests_only_refuses_ids_the_campaign_killed(tmp_path, capsys):
    """--tests-only trusts the campaign's earlier verdict: a listed id the campaign killed is refused
    with its name, and the report is left as it was."""
    pytest.importorskip("cosmic_ray")  # enumerating the mutants (the mutation extra)
    from benchmarks import mutation

    out = tmp_path / "m.json"
    ms = mutation.enumerate_mutants(["bookkeeping"], mutation.REPO)[0][:1]
    rec = {**mutation.mutant_record(ms[0]), "status": "killed-by-campaign", "check": "campaign"}
    out.write_text(json.dumps({"mutants": [rec]}))
    before = out.read_text()
    ids = tmp_path / "ids.txt"
    ids.write_text(ms[0].id + "\n")
    rc = mutation.main(["--modules", "bookkeeping", "--tests-only", "--recheck", "--ids", str(ids), "--out", str(out),
                        "--md", str(tmp_path / "m.md"), "--jobs", "1"])
    assert rc == 2 and ms[0].id in capsys.readouterr().err
    assert out.read_text() == before

"""CrossHair checks refcache.pages' contracts in bounded time and finds bug class 2."""

import inspect

from properties import checked_pages
from properties.crosshair_checks import TARGETS, run
from refcache import pages


def contract(fn) -> list[str]:
    return [line.strip() for line in (inspect.getdoc(fn) or "").splitlines() if line.strip().startswith(("pre:", "post:"))]


def test_bug_wrapper_carries_the_real_contract():
    assert contract(checked_pages.prefetch_length_gives_up) == contract(pages.prefetch_length)


def test_crosshair_within_budget():
    rows = run(budget_s=20.0)
    by = {r["function"]: r for r in rows}
    assert len(rows) == len(TARGETS)
    for r in rows:
        assert r["status"] != "error", r
        assert r["ok"], r
    gives_up = by["properties.checked_pages.prefetch_length_gives_up"]
    assert gives_up["status"] == "counterexample" and "prefetch_length_gives_up(" in gives_up["counterexample"]
    assert sum(r["seconds"] for r in rows) < 60

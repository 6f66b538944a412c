"""CrossHair over the pure helpers' contracts (refcache/pages.py docstrings), in bounded time.

`run(budget_s)` analyses each target with CrossHair's Python API (what `crosshair check` runs)
and returns one row per function: status 'confirmed' (every path explored), 'no counterexample'
(none found within its time), 'counterexample' (with CrossHair's message), or 'error'. Targets
marked `expect='counterexample'` are bugs under the real contract (class 2's length rule, a chain
hash that ignores its parent): finding their counterexample is the check passing.

`python -m properties.crosshair_checks [--budget S]` prints the table; exit 1 if any target's
status is not the expected one.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    qualname: str  # module.function
    expect: str  # "holds" or "counterexample"
    about: str


TARGETS: tuple[Target, ...] = (
    Target("refcache.pages.page_align", "holds", "page alignment"),
    Target("refcache.pages.match_length", "holds", "key match length (whole pages, common prefix)"),
    Target("refcache.pages.split_key", "holds", "key split on a page boundary"),
    Target("refcache.pages.prefetch_length", "holds", "prefetch truncation to what fits (class 2 rule)"),
    Target("properties.checked_pages.chain_hash_distinguishes_parents", "holds", "chain hashing depends on the parent"),
    Target("properties.checked_pages.prefetch_length_gives_up", "counterexample", "bug class 2 under the real contract"),
    Target("properties.checked_pages.chain_hash_distinguishes_parents_mutant", "counterexample",
           "chain hash ignoring the parent (DESIGN §4)"),
)


def _resolve(qualname: str):
    mod, _, name = qualname.rpartition(".")
    return getattr(importlib.import_module(mod), name)


def check_one(target: Target, seconds: float) -> dict:
    """Analyse one function, `seconds` per postcondition (CrossHair's per-condition timeout)."""
    from crosshair.core_and_libs import MessageType, analyze_any, run_checkables
    from crosshair.fnutil import FunctionInfo
    from crosshair.main import prefer_pure_python_imports
    from crosshair.options import AnalysisOptionSet

    t0 = time.perf_counter()
    row = dict(function=target.qualname, expect=target.expect, about=target.about)
    try:
        fn = _resolve(target.qualname)
        opts = AnalysisOptionSet(per_condition_timeout=max(0.5, seconds), per_path_timeout=max(0.25, seconds / 4),
                                 report_all=True)
        with prefer_pure_python_imports():
            msgs = list(run_checkables(analyze_any(FunctionInfo.from_module(sys.modules[fn.__module__], fn.__name__),
                                                   opts)))
    except Exception as e:  # an analysis that cannot run is reported, not hidden
        return dict(row, status="error", seconds=round(time.perf_counter() - t0, 2), counterexample=None,
                    detail=f"{type(e).__name__}: {e}")
    bad = [m for m in msgs if m.state > MessageType.PRE_UNSAT]
    if bad:
        status, cx = "counterexample", bad[0].message
    elif msgs and all(m.state == MessageType.CONFIRMED for m in msgs):
        status, cx = "confirmed", None
    else:
        status, cx = "no counterexample", None
    ok = (status == "counterexample") == (target.expect == "counterexample")
    return dict(row, status=status, seconds=round(time.perf_counter() - t0, 2), counterexample=cx, ok=ok)


def conditions(target: Target) -> int:
    """Postconditions of a target (CrossHair gives each its own timeout)."""
    doc = _resolve(target.qualname).__doc__ or ""
    return max(1, sum(1 for line in doc.splitlines() if line.strip().startswith("post:")))


def run(budget_s: float = 60.0, targets: tuple[Target, ...] = TARGETS) -> list[dict]:
    """Every target within about `budget_s` seconds in total, shared by postcondition (CrossHair
    stops a condition at its timeout, so the total stays near the budget). Rows: function,
    status, seconds, counterexample, expect, ok (status is what was expected)."""
    per = 0.8 * budget_s / sum(conditions(t) for t in targets)
    return [check_one(t, per) for t in targets]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m properties.crosshair_checks", description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=60.0, help="seconds for all targets (default 60)")
    a = ap.parse_args(argv)
    rows = run(a.budget)
    for r in rows:
        print(f"{r['function']:<65s} {r['status']:<18s} expect {r['expect']:<15s} {r['seconds']:6.1f}s"
              f"{'' if r.get('ok') else '  <-- NOT AS EXPECTED'}")
        if r["counterexample"]:
            print(f"    {r['counterexample']}")
        if r.get("detail"):
            print(f"    {r['detail']}")
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

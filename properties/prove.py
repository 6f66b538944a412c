"""Inductive checks with Z3: for every transition and every structural invariant,
    (all invariants and lemmas hold) and (guard of the transition) => (the invariant holds after)
over every tree of up to N nodes (N counts cache nodes; the root is a further slot; transitions
that add a node need a free slot, so they are checked from trees of up to N - 1 nodes) with up to
M operations in flight, in all three component configurations at once.

`python -m properties.prove [--nodes N] [--ops M] [--bugs] [--budget S]` prints the table
invariant x transition; `run_all(nodes, budget_s, bugs)` returns the same as rows.
With a seeded bug, the bug's transitions are checked against the invariants it breaks and the
counterexample is decoded (`decode`) into a concrete pre-state, the input of properties.replay.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import z3

from .encodings import ENCODINGS, LEMMAS, all_formulas, conjunction
from .symbolic import (
    KC,
    KINDS,
    NODE_BOOL,
    NODE_INT,
    OP_BOOL,
    OP_INT,
    OP_NODE,
    PY,
    SIDECARS,
    Z3,
    State,
    fresh_state,
    types,
)
from .transitions import BUG_TRANSITIONS, MUTANT_TRANSITIONS, TRANSITIONS, Z3Choices

DEFAULT_OPS = 2

BUG_INVARIANTS: dict[str, tuple[str, ...]] = {
    "class1_terminate_with_pool_in_flight": ("X2",),
    "class3_resolve_mutates_record": ("X1",),
    "class4_load_back_at_last_host": ("T6",),
    "class4_lock_host_only_bottom": ("T2",),
    "class5_cascade_ignores_host_ref": ("T3",),
}
"""The invariant each seeded bug (stateful_tests/seeded_bugs.py) must break in the Z3 model."""


@dataclass
class Query:
    """One transition, encoded once; invariants are then checked against it incrementally."""

    transition: str
    nodes: int
    ops: int
    bug: str | None
    hyps: list
    pre: State
    post: State
    choices: Z3Choices
    build_s: float
    extra: list = field(default_factory=list)


def build(transition: str, nodes: int, ops: int = DEFAULT_OPS, bug: str | None = None,
          assumptions: Iterable = ()) -> Query:
    """Encode `transition` over trees of `nodes` cache nodes, assuming every formula before."""
    t0 = time.perf_counter()
    N = nodes + 1
    pre = fresh_state(N, ops, "pre")
    ch = Z3Choices("ch", N, ops)
    guard, post = TRANSITIONS[transition].fn(Z3, pre, ch, bug)
    hyps = [types(Z3, pre), conjunction(Z3, pre), *ch.constraints, guard, *assumptions]
    return Query(transition, nodes, ops, bug, hyps, pre, post, ch, time.perf_counter() - t0)


def solver() -> z3.Solver:
    """A fresh (non-incremental) solver with light preprocessing: measured fastest here."""
    return z3.Then("simplify", "propagate-values", "solve-eqs", "smt").solver()


def check(q: Query, invariant: str, timeout_s: float | None = None) -> tuple[str, float, z3.ModelRef | None]:
    """'proved', 'counterexample' or 'unknown' for one invariant after `q`'s transition."""
    f = all_formulas()[invariant](Z3, q.post)
    t0 = time.perf_counter()
    if f is True:
        return "proved", 0.0, None
    s = solver()
    if timeout_s is not None:
        s.set("timeout", max(1, int(timeout_s * 1000)))
    s.add(*q.hyps, z3.Not(f) if f is not False else z3.BoolVal(True))
    r = s.check()
    model = s.model() if r == z3.sat else None
    status = "proved" if r == z3.unsat else "counterexample" if r == z3.sat else "unknown"
    return status, time.perf_counter() - t0, model


# ------------------------------------------------------------------------------- decoding
def _val(model: z3.ModelRef, t):
    if isinstance(t, (bool, int)):
        return t
    v = model.eval(t, model_completion=True)
    if z3.is_true(v):
        return True
    if z3.is_false(v):
        return False
    return v.as_long()


def decode(model: z3.ModelRef, s: State) -> State:
    """The concrete (Python-valued) state a model gives to symbolic state `s`."""
    n = {f: [_val(model, t) for t in s.n[f]] for f in s.n}
    o = {f: [_val(model, t) for t in s.o[f]] for f in s.o}
    on = {f: [[_val(model, t) for t in row] for row in s.on[f]] for f in s.on}
    cfg = {f: _val(model, t) for f, t in s.cfg.items()}
    return State(s.N, s.M, n, o, on, cfg)


def decode_choices(model: z3.ModelRef, ch: Z3Choices) -> dict:
    return {k: _val(model, v) for k, v in ch.vars.items()}


def describe(s: State) -> str:
    """A concrete state as text: the tree with per-node flags, then the operations."""
    lines = [f"config: {SIDECARS[s.side] or 'full'}, swa window {s.W} pages, write-back={s.wb}"]

    def walk(j, depth):
        if j:
            flags = [f for f in ("dev", "host", "mdev", "mhost", "swa", "swah") if s.n[f][j]]
            extra = [f"{f}={s.n[f][j]}" for f in ("lock", "href", "clk") if s.n[f][j]]
            extra += [f for f in ("lws",) if s.n[f][j]] + ([] if s.recok[j] or not s.mhost[j] else ["record-mutated"])
            stale = [f for f in ("kdev", "khost") if s.n[f][j]]
            lines.append(f"{'  ' * depth}n{j} ({s.ln[j]}p): {' '.join(flags) or 'no data'}"
                         f"{' | ' + ' '.join(extra) if extra else ''}{' | kept:' + ','.join(stale) if stale else ''}")
        for c in range(j + 1, s.N):
            if s.alive[c] and s.par[c] == j:
                walk(c, depth + 1)

    walk(0, 0)
    for k in range(s.M):
        if s.act[k]:
            segs = [j for j in range(1, s.N) if s.seg[k][j]]
            swn = [j for j in range(1, s.N) if s.swn[k][j]]
            parts = f"kv {'pending' if s.kvp[k] else 'failed' if s.kvf[k] else 'done'}"
            if s.pool[k]:
                parts += f", pool {'pending' if s.plp[k] else 'failed' if s.plf[k] else 'done'}"
            lines.append(f"op{k}: {KINDS[s.kind[k]]} phase={['prep', 'in flight', 'draining'][s.phase[k]]} "
                         f"lk={s.lk[k]} hr={s.hr[k]} anchor={s.an[k]} segs={segs} swa_nodes={swn} {parts}"
                         f"{' demote' if s.demote[k] else ''}{' aborted' if s.abort[k] else ''}"
                         f"{'' if s.intact[k] else ' records-mutated'}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------- runs
def invariant_ids(lemmas: bool = True) -> list[str]:
    return list(ENCODINGS) + (list(LEMMAS) if lemmas else [])


def run_all(nodes: int = 6, budget_s: float = 600.0, bugs: bool | Iterable[str] = False, ops: int = DEFAULT_OPS,
            transitions: Iterable[str] | None = None, invariants: Iterable[str] | None = None,
            lemmas: bool = True, progress=None) -> list[dict]:
    """Every (invariant, transition) inductive check on the clean cache; with `bugs` (True, or
    names of seeded bugs / mutants), also each bug's transitions against the invariants it must
    break (a mutant: the first invariant it breaks). Rows: invariant, transition,
    bug (None = clean), status (proved | counterexample | unknown | skipped), nodes, seconds,
    and for counterexamples `state` (the decoded pre-state, as text). Stops starting checks once
    `budget_s` is spent (the rest are 'skipped')."""
    deadline = time.perf_counter() + budget_s
    invs = list(invariants) if invariants is not None else invariant_ids(lemmas)
    rows: list[dict] = []
    plan = [(t, None, invs) for t in (TRANSITIONS if transitions is None else transitions)]
    if bugs:
        chosen = set(BUG_TRANSITIONS) | set(MUTANT_TRANSITIONS) if bugs is True else set(bugs)
        plan += [(t, bug, list(BUG_INVARIANTS[bug])) for bug, ts in BUG_TRANSITIONS.items() if bug in chosen for t in ts]
        plan += [(t, m, mutant_invariants(m)) for m, ts in MUTANT_TRANSITIONS.items() if m in chosen for t in ts]
    for tname, bug, inv_list in plan:
        if time.perf_counter() >= deadline:
            rows += [dict(invariant=i, transition=tname, bug=bug, status="skipped", nodes=nodes, seconds=0.0)
                     for i in inv_list]
            continue
        q = build(tname, nodes, ops, bug)
        share = q.build_s / max(1, len(inv_list))
        for inv in inv_list:
            left = deadline - time.perf_counter()
            if left <= 0:
                rows.append(dict(invariant=inv, transition=tname, bug=bug, status="skipped", nodes=nodes, seconds=0.0))
                continue
            status, secs, model = check(q, inv, timeout_s=left)
            row = dict(invariant=inv, transition=tname, bug=bug, status=status, nodes=nodes, seconds=round(secs + share, 3))
            if model is not None:
                row["state"] = describe(decode(model, q.pre))
                row["choices"] = decode_choices(model, q.choices)
            rows.append(row)
            if progress:
                progress(row)
            if bug in MUTANT_TRANSITIONS and status == "counterexample":
                break  # a mutant is caught once one invariant breaks
    if bugs:
        rows = _fold_mutants(rows)
    return rows


def mutant_invariants(mutant: str) -> list[str]:
    """The invariants a mutant should break (registry), then every other formula."""
    from .registry import BUGS

    first = [i for b in BUGS.values() if b.z3_mutant == mutant for i in b.invariants if i in ENCODINGS]
    return first + [i for i in invariant_ids() if i not in first]


def _fold_mutants(rows: list[dict]) -> list[dict]:
    """One row per (mutant, transition): the first invariant it breaks, or 'proved' if none."""
    out, seen = [], {}
    for r in rows:
        if r["bug"] not in MUTANT_TRANSITIONS:
            out.append(r)
            continue
        key = (r["bug"], r["transition"])
        if key not in seen:
            seen[key] = dict(r, seconds=0.0)
            out.append(seen[key])
        acc = seen[key]
        acc["seconds"] = round(acc["seconds"] + r["seconds"], 3)
        if acc["status"] != "counterexample" and r["status"] != "proved":
            acc.update({k: v for k, v in r.items() if k != "seconds"})
    return out


def table(rows: list[dict]) -> str:
    """Invariant x transition for the clean rows (P proved, C counterexample, ? unknown, - skipped),
    with per-invariant totals, then one line per seeded-bug row."""
    clean = [r for r in rows if r["bug"] is None]
    trans = list(dict.fromkeys(r["transition"] for r in clean))
    invs = list(dict.fromkeys(r["invariant"] for r in clean))
    mark = {"proved": "P", "counterexample": "C", "unknown": "?", "skipped": "-"}
    cell = {(r["invariant"], r["transition"]): r for r in clean}
    out = []
    if clean:
        n = clean[0]["nodes"]
        out.append(f"clean cache, trees of up to {n} nodes: P proved, C counterexample, ? unknown, - skipped")
        width = max(len(t) for t in trans)
        out.append(" " * width + "  " + " ".join(f"{i:>9s}" for i in invs))
        for t in trans:
            out.append(f"{t:<{width}s}  " + " ".join(f"{mark[cell[i, t]['status']]:>9s}" if (i, t) in cell else " " * 9
                                                      for i in invs))
        out.append(f"{'seconds':<{width}s}  " + " ".join(
            f"{sum(cell[i, t]['seconds'] for t in trans if (i, t) in cell):9.1f}" for i in invs))
        out.append(f"{'status':<{width}s}  " + " ".join(
            f"{('proved' if all(cell[i, t]['status'] == 'proved' for t in trans if (i, t) in cell) else 'OPEN'):>9s}"
            for i in invs))
    buggy = [r for r in rows if r["bug"] is not None]
    if buggy:
        out.append("")
        out.append("seeded bugs and mutants (the bug's transitions against the invariant it must break):")
        for r in buggy:
            out.append(f"  {r['bug']:<40s} {r['transition']:<16s} {r['invariant']:<4s} {r['status']:<15s} "
                       f"N={r['nodes']} {r['seconds']:.2f}s")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m properties.prove", description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=6, help="cache nodes per tree (default 6)")
    ap.add_argument("--ops", type=int, default=DEFAULT_OPS, help="operations in flight (default 2)")
    ap.add_argument("--bugs", action="store_true", help="also check each seeded bug's transitions")
    ap.add_argument("--budget", type=float, default=3600.0, help="seconds for all checks")
    ap.add_argument("--transition", action="append", help="only these transitions (repeatable)")
    ap.add_argument("--invariant", action="append", help="only these invariants (repeatable)")
    ap.add_argument("--show", action="store_true", help="print each counterexample's pre-state")
    ap.add_argument("--json", help="also write the rows to this JSON file (input of properties.docs)")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()

    def progress(r):
        print(f"\r{r['transition']:<20s} {r['invariant']:<10s} {r['status']:<15s}", end="", file=sys.stderr, flush=True)

    rows = run_all(a.nodes, a.budget, a.bugs, a.ops, a.transition, a.invariant, progress=progress)
    print("\r" + " " * 60 + "\r", end="", file=sys.stderr)
    print(table(rows))
    print(f"\n{len(rows)} checks in {time.perf_counter() - t0:.1f}s (N={a.nodes}, M={a.ops}, z3 {z3.get_version_string()})")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(rows, indent=1, default=str))
    if a.show:
        for r in rows:
            if r["status"] == "counterexample":
                print(f"\n--- {r['bug'] or 'clean'}: {r['transition']} breaks {r['invariant']}; choices {r['choices']}")
                print(r["state"])
    clean_open = [r for r in rows if r["bug"] is None and r["status"] != "proved"]
    missed = [r for r in rows if r["bug"] is not None and r["status"] != "counterexample"]
    return 1 if clean_open or missed else 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["run_all", "build", "check", "decode", "describe", "table", "BUG_INVARIANTS", "PY", "NODE_BOOL", "NODE_INT",
           "OP_BOOL", "OP_INT", "OP_NODE", "KC"]

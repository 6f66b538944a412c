"""Z3: every structural invariant (and lemma) is preserved by every clean transition for trees of
up to CI_NODES nodes; each seeded bug and each mutant yields a counterexample."""

import os

import pytest

from properties.prove import BUG_INVARIANTS, build, check, decode, describe, run_all, table
from properties.transitions import BUG_TRANSITIONS, MUTANT_TRANSITIONS, TRANSITIONS

CI_NODES = int(os.environ.get("REFCACHE_PROOF_NODES", "5"))  # the command runs N >= 6 (python -m properties.prove)


@pytest.mark.parametrize("transition", list(TRANSITIONS))
def test_transition_preserves_every_invariant(transition):
    rows = run_all(CI_NODES, budget_s=300, transitions=[transition])
    bad = [r for r in rows if r["status"] != "proved"]
    assert not bad, "\n".join(f"{r['invariant']}: {r['status']}\n{r.get('state', '')}" for r in bad)


@pytest.mark.parametrize("bug,transition", [(b, t) for b, ts in BUG_TRANSITIONS.items() for t in ts])
def test_seeded_bug_yields_counterexample(bug, transition):
    q = build(transition, 3, bug=bug)
    status, _, model = check(q, BUG_INVARIANTS[bug][0])
    assert status == "counterexample"
    assert describe(decode(model, q.pre))  # a concrete tree to show


@pytest.mark.parametrize("mutant", list(MUTANT_TRANSITIONS))
def test_mutant_is_caught(mutant):
    rows = run_all(3, budget_s=120, bugs=[mutant], transitions=[])
    assert rows and all(r["status"] == "counterexample" for r in rows), rows


def test_table_prints_every_cell():
    rows = run_all(2, budget_s=120, transitions=["lock", "split"], invariants=["T1", "T2"])
    text = table(rows)
    assert "lock" in text and "split" in text and "proved" in text
    assert all(r["status"] == "proved" for r in rows)


def test_command_prints_the_table(capsys):
    from properties.prove import main

    assert main(["--nodes", "2", "--transition", "lock", "--transition", "unlock", "--invariant", "T2"]) == 0
    out = capsys.readouterr().out
    assert "lock" in out and "unlock" in out and "T2" in out and "N=2" in out

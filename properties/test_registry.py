"""The registry declares every invariant once, with the very predicate the cache runs."""

from properties.encodings import ENCODINGS
from properties.registry import BUGS, INVARIANTS, check_registry
from refcache import invariants as inv_mod
from refcache.invariants import CHECKS


def test_registry_is_the_single_declaration():
    assert check_registry() == []
    assert list(INVARIANTS) == list(CHECKS)
    for i, inv in INVARIANTS.items():
        assert inv.predicate is CHECKS[i]  # not a copy: the function check_invariants() and the machines call
        assert inv.statement.endswith(".") and len(inv.statement.split(".")) == 2, i  # one sentence
        assert inv.structural == (i in ENCODINGS)


def test_structural_invariants_have_encodings():
    assert set(ENCODINGS) == {"S1", "S2", "T1", "T2", "T3", "T4", "T5", "T6", "R1", "R2", "R3", "X1", "X2"}
    assert not INVARIANTS["D1"].structural and not INVARIANTS["X3"].structural


def test_bug_catalogue_covers_design_section_4():
    classes = [b for b in BUGS.values() if b.id.startswith("class")]
    assert [b.id for b in classes] == ["class1", "class2", "class3", "class4", "class5"]
    assert len(BUGS) - len(classes) >= 10  # "and at least ten more"
    for b in BUGS.values():
        assert all(i in INVARIANTS for i in b.invariants)
    guarded = {i for b in BUGS.values() for i in b.invariants}
    assert guarded >= {"T1", "T2", "T3", "T6", "R1", "R2", "R3", "X1", "X2", "X3", "D1", "S1"}


def test_seeded_bug_names_exist():
    from stateful_tests.seeded_bugs import SEEDED_BUGS

    for b in BUGS.values():
        for name in b.seeded:
            assert name in SEEDED_BUGS, name
    assert inv_mod.CHECKS is CHECKS

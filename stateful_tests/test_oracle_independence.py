"""The oracle does not trust the cache: one cache bug per former blind spot, each caught by the
check that no longer reads the cache's own values (identity, recency, required effects).

Each bug is a seeded bug (stateful_tests/seeded_bugs.py) that the cache is self-consistent under:
its hashes chain, its eviction follows its own stamps, every change it makes is one the frame
allows. Before the model derived contents from tokens, kept its own recency and predicted required
effects and kept its own account of L3, none of them was found in 25 s of search; each must now be
found, by the named check.
The clean machines (test_machines.py) pass the same checks.
"""

from __future__ import annotations

import pytest
from hypothesis.stateful import run_state_machine_as_test

from stateful_tests.machines import MACHINES
from stateful_tests.profiles import DETECT_PHASES, current
from stateful_tests.seeded_bugs import SEEDED_BUGS

CASES = {
    # D1 by the token prefix, or the model's own account of L3 (keyed by prefix: a colliding key
    # makes storage answer for pages it does not hold)
    "weak_hash_collides": ("bytes of this prefix", "bytes that are not this prefix's", "by the model L3 holds"),
    "match_forgets_recency": "not least recently used",  # the model's own recency
    # allocation must succeed (the machine's own allocations, a default-built cache's, or L1 one page
    # short in another geometry)
    "alloc_refuses_when_all_evictable_needed": ("freeable", "whose data is all evictable", "one page (or one state) short"),
    "write_through_skips_passed_nodes": "due for backup",  # write-through must back up
    "storage_exists_counts_past_a_hole": "by the model L3 holds",  # the model's own account of L3
}


@pytest.mark.parametrize("bug", list(CASES))
def test_blind_spot_is_closed(bug):
    """A bounded, derandomized search (the ci profile: the same examples on every machine, however
    slow) must find the bug, and the failure must come from the expected check."""
    with SEEDED_BUGS[bug].patch(), pytest.raises(Exception) as info:  # noqa: B017 - any failure is a detection
        run_state_machine_as_test(MACHINES[SEEDED_BUGS[bug].machines[0]], settings=current(
            phases=DETECT_PHASES, print_blob=False, max_examples=3000))
    signs = CASES[bug] if isinstance(CASES[bug], tuple) else (CASES[bug],)
    assert any(sign in str(info.value) for sign in signs), \
        f"{bug}: found by another check than expected: {str(info.value)[:300]}"

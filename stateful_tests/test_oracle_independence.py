"""The oracle does not trust the cache: one cache bug per former blind spot, each caught by the
check that no longer reads the cache's own values (identity, recency, required effects).

Each bug is a seeded bug (stateful_tests/seeded_bugs.py) that the cache is self-consistent under:
its hashes chain, its eviction follows its own stamps, every change it makes is one the frame
allows. Before the model derived contents from tokens, kept its own recency and predicted required
effects, none of them was found in 25 s of search; each must now be found, by the named check.
The clean machines (test_machines.py) pass the same checks.
"""

from __future__ import annotations

import pytest

from campaign.hunt import hunt
from stateful_tests.seeded_bugs import SEEDED_BUGS

CASES = {
    "weak_hash_collides": "bytes of this prefix",  # D1 by the token prefix
    "match_forgets_recency": "not least recently used",  # the model's own recency
    "alloc_refuses_when_all_evictable_needed": "freeable",  # allocation must succeed
    "write_through_skips_passed_nodes": "due for backup",  # write-through must back up
}


@pytest.mark.parametrize("bug", list(CASES))
def test_blind_spot_is_closed(bug):
    found = None
    for seed in range(4):  # a bounded search: each slice is independent, the first detection ends it
        h = hunt(SEEDED_BUGS[bug].machines[0], 100 + seed, 10.0, shrink_s=2.0, patch=SEEDED_BUGS[bug].patch())
        if h.found:
            found = h
            break
    assert found is not None, f"{bug}: not found in 40 s of search"
    assert CASES[bug] in found.error, f"{bug}: found by another check than expected: {found.error[:300]}"

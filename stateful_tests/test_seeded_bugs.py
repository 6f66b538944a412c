"""The stateful suite finds every available seeded bug (DESIGN §4) within the chosen profile,
and the same machines are green on the clean cache (test_machines.py)."""

from __future__ import annotations

import time

import pytest
from hypothesis.stateful import run_state_machine_as_test

from stateful_tests.machines import MACHINES
from stateful_tests.profiles import DETECT_PHASES, current
from stateful_tests.seeded_bugs import SEEDED_BUGS

DETECT_EXAMPLES = 3000  # a bound on the hunt, not its expected length: detection stops at the first failure

# The five classes on every machine named for them; each further bug on its first machine
# (`refcache verify --bugs all` hunts all of them on all their machines).
CASES = [pytest.param(name, m, id=f"{name}-{m}") for name, bug in SEEDED_BUGS.items()
         for m in (bug.machines if bug.bug_class else bug.machines[:1])]


@pytest.mark.parametrize("bug,machine", CASES)
def test_seeded_bug_is_found(bug, machine):
    t0 = time.perf_counter()
    with SEEDED_BUGS[bug].patch(), pytest.raises(Exception) as info:  # noqa: B017 - any failure is a detection
        run_state_machine_as_test(MACHINES[machine], settings=current(phases=DETECT_PHASES, print_blob=False,
                                                                      max_examples=DETECT_EXAMPLES))
    print(f"{bug} found on {machine} in {time.perf_counter() - t0:.2f}s: {str(info.value).splitlines()[0]}")


def test_patches_are_undone():
    """Each seeded bug changes something while active, and nothing once its context manager exits."""
    import refcache.bookkeeping as bookkeeping_mod
    import refcache.cache as cache_mod
    import refcache.prefetch as prefetch_mod
    import refcache.storage as storage_mod
    from refcache.cache import HiCache
    from refcache.prefetch import PrefetchMixin

    watched = [(cache_mod, "resolve"), (cache_mod, "copy_kv"), (prefetch_mod, "prefetch_length"),
               (prefetch_mod, "page_hashes"), (bookkeeping_mod, "contribution"), (bookkeeping_mod, "host_evictable"),
               (storage_mod.StorageBackend, "exists"),
               *[(PrefetchMixin, n) for n in ("prefetch_progress", "abort_prefetch", "_drain")],
               *[(HiCache, n) for n in ("match_prefix", "lock", "_make_room_device", "_try_backup",
                                        "_cascade", "_split", "_drop_device", "_release",
                                        "_drop_mamba")]]

    def current_impls():
        import refcache.pages as pages_mod

        return [getattr(owner, name) for owner, name in watched] + [pages_mod.chain_hash.__code__]

    originals = current_impls()
    for name, bug in SEEDED_BUGS.items():
        with bug.patch():
            assert current_impls() != originals, f"{name}: the patch changes nothing watched here"
        assert current_impls() == originals, f"{name}: the patch is not undone"


def test_a_patch_leaves_no_memoized_result_behind():
    """A campaign worker hunts a seeded bug, then explores the clean cache in the same process:
    the other geometries' round trips it memoized under the patch must not stand for the clean
    code (a mamba slot leak found this way was reported as a clean violation)."""
    from refcache.config import CacheConfig
    from stateful_tests import geometries

    base = CacheConfig(page_size=2, device_tokens=16, host_tokens=24, components=("full", "mamba"))
    with SEEDED_BUGS["mamba_eviction_leaks_slot"].patch():
        under_patch = geometries.round_trip_once(base, 1, 0, 1)
    assert under_patch, "the seeded leak is visible to the round trip"
    assert geometries.round_trip_once(base, 1, 0, 1) == [], "the clean code's round trip is its own"

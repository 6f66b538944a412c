"""The Z3 relation and encodings against the concrete cache: every step the random walker takes
is a sequence of transitions of the relation (drift guard), every reachable state satisfies the
encodings and lemmas, and seeded bugs show up as drift and as broken encodings."""

import time

import pytest

from campaign.random_walk import RandomWalk, small_config
from properties import drift
from properties.abstraction import abstract, slot_map
from properties.encodings import ENCODINGS, LEMMAS
from properties.symbolic import PY
from refcache import RefCacheError
from stateful_tests.seeded_bugs import SEEDED_BUGS

ACTIONS = {"insert": "alloc+insert", "match": "match", "lock": "lock", "unlock": "unlock", "evict": "evict",
           "evict_host": "evict_host", "evict_side": "evict_sidecar", "backup": "backup", "load": "match+load_back",
           "complete": "complete", "fail": "fail", "poll": "poll", "store": "store", "prefetch": "match+prefetch",
           "progress": "prefetch_progress", "abort": "abort_prefetch", "fault": "noop"}


class Walk(RandomWalk):
    """The campaign's walker, remembering which call each step made."""

    def _do(self, action, r, c):
        self.action = action
        return super()._do(action, r, c)


def walk_steps(config: str, seed: int, steps: int):
    """(before, op name, after, log line) for each step of a walk."""
    w = Walk(small_config(config), seed)
    for _ in range(steps):
        before = w.cache.snapshot()
        try:
            line = w.step()
        except (RefCacheError, AssertionError) as e:
            line = f"raised {e}"
        yield before, ACTIONS[w.action], w.cache.snapshot(), line, w


def formulas_hold(snap) -> list[str]:
    s = abstract(snap, slot_map(snap))
    return [name for name, f in {**ENCODINGS, **LEMMAS}.items() if not f(PY, s)]


@pytest.mark.parametrize("config", ["full/write_through", "mamba/write_back", "swa/write_through"])
def test_initial_state_satisfies_every_formula(config):
    """The base case of the induction: an empty cache satisfies every encoding and lemma."""
    w = Walk(small_config(config), 0)
    assert formulas_hold(w.cache.snapshot()) == []


@pytest.mark.parametrize("config", ["full/write_through", "full/write_back", "mamba/write_through",
                                    "mamba/write_back", "swa/write_through", "mamba/wait_complete"])
def test_walk_steps_are_transitions_of_the_relation(config):
    t0, calls = time.perf_counter(), 0
    for before, op, after, line, _ in walk_steps(config, 0, 80):
        calls += 1
        assert drift.check_step(before, op, after) == [], line
        assert formulas_hold(after) == [], line
    print(f"{config}: {calls} steps checked in {time.perf_counter() - t0:.2f}s")


def test_seeded_bug_shows_as_drift_and_broken_encoding():
    """Class 3 mutates a record: the relation cannot produce that step, and X1's encoding fails."""
    flagged = broken = False
    with SEEDED_BUGS["class3_resolve_mutates_record"].patch():
        for before, op, after, _, w in walk_steps("mamba/write_through", 0, 200):
            flagged |= bool(drift.check_step(before, op, after))
            if w.cache.check_invariants():
                broken = "X1" in formulas_hold(after)
                break
    assert flagged and broken


def test_impossible_step_is_reported():
    """An after-snapshot from another walk is not what one lock call can produce."""
    steps = list(walk_steps("full/write_through", 1, 30))
    before = steps[10][0]
    after = steps[25][2]
    assert drift.check_step(before, "lock", after, max_states=2000)

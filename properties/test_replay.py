"""Each seeded bug's Z3 counterexample becomes HiCache calls that break the bug's invariant with
the bug patched in and keep every invariant on the clean cache."""

import pytest

from properties.replay import PLANS, as_pytest, replay


@pytest.mark.parametrize("bug", list(PLANS))
def test_counterexample_replays(bug):
    r = replay(bug, nodes=3)
    assert r.built_as_model == [], r.source  # the calls built exactly the model's pre-state
    assert r.clean_violations == [] and r.clean_error is None, r.source
    assert any(v.startswith(r.invariant) for v in r.buggy_violations), (r.buggy_violations, r.source)
    assert r.reproduced
    assert r.steps <= 12
    assert "def test_seeded_bug_breaks" in as_pytest(r)

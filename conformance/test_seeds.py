"""The upstream seed bugs reverted in SGLang 0.5.23 (conformance/targets/sglang/seeds.py): each
reverted seed's minimized operations fail on the reverted code and pass on clean code. Run in a
fresh process (one process holds one sglang version)."""

from __future__ import annotations

import pytest

from conformance import runner
from conformance.targets.sglang.seeds import SEEDS
from conformance.test_hicache import run_fresh

pytestmark = pytest.mark.conformance
REVERTED = [s.id for s in SEEDS.values() if s.patch is not None]


@pytest.mark.parametrize("seed_id", REVERTED)
def test_seed_replay_fails_reverted_passes_clean(seed_id):
    s = SEEDS[seed_id]
    why = runner.unavailable_reason(s.target)
    if why:
        pytest.skip(why)
    assert 0 < len(s.calls) <= 10
    r = run_fresh(f"""
import json
from conformance.targets.sglang.seeds import replay_seed
print(json.dumps({{"clean": replay_seed({seed_id}, False), "reverted": replay_seed({seed_id}, True)}}))
""")
    assert r["clean"] is None, r["clean"]
    assert r["reverted"] is not None and any(x in r["reverted"] for x in s.signs), r["reverted"]


def test_every_seed_is_listed():
    assert set(SEEDS) == {27366, 26945, 23427, 25088, 23696}
    assert all(s.where for s in SEEDS.values() if s.patch is None)

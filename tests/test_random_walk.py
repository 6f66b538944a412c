"""Seeded random walks over every configuration: no invariant broken, data intact."""

import pytest

from campaign.random_walk import CONFIGS, run_walk, small_config
from conftest import test_device


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("manual", [True, False], ids=["manual-order", "auto-complete"])
def test_random_walk_keeps_every_invariant(name, seed, manual):
    """300 random operations; transfers finish (or fail) in an order the walk picks, or at once
    (on CUDA, `auto-complete` is the CUDA executor: the GPU decides)."""
    res = run_walk(small_config(name, test_device()), seed, 300, manual_executor=manual)
    assert res.violations == [], "\n".join(map(str, res.violations)) + "\n" + "\n".join(res.log[-15:])
    assert res.steps == 300


def test_walker_detects_a_broken_cache(monkeypatch):
    """The walker is not vacuous: a cache that forgets to free on delete is caught (R1)."""
    from refcache.cache import HiCache

    monkeypatch.setattr(HiCache, "_drop_host", lambda self, node: None)
    res = run_walk(small_config("full/write_through", test_device()), 0, 300)
    assert any(v.invariant == "R1" for v in res.violations)

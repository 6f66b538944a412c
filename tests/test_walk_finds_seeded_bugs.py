"""The checks are not vacuous: seeded bugs (stateful_tests/seeded_bugs.py) are caught.

Classes 3 and 5 by the random walker within a few seeds (the walker does not prefetch); class 1 by
a directed prefetch scenario. The Hypothesis machines find every class (stateful_tests/)."""

import pytest

from campaign.random_walk import run_walk, small_config
from conftest import test_device
from refcache import CacheConfig, DeterministicExecutor, HiCache
from refcache.data import write_request
from refcache.storage import MemoryStorage
from stateful_tests.seeded_bugs import SEEDED_BUGS


@pytest.mark.parametrize("bug, invariant", [("class3_resolve_mutates_record", "X1"),
                                            ("class5_cascade_ignores_host_ref", "T3")])
def test_random_walk_finds_seeded_bug(bug, invariant):
    """Within 10 seeds of 400 steps, the walker reports the invariant the bug breaks."""
    with SEEDED_BUGS[bug].patch():
        for seed in range(10):
            res = run_walk(small_config("mamba/write_through", test_device()), seed, 400)
            if res.violations:
                break
    assert invariant in {v.invariant for v in res.violations}, res.violations


def _mamba_prefetch_with_pool_pending():
    """A mamba prefetch whose pages all arrived and whose state transfer is still in flight."""
    cfg = CacheConfig(page_size=2, device_tokens=16, host_tokens=32, components=("full", "mamba"),
                      prefetch_policy="best_effort", prefetch_threshold=2, device=test_device())
    page = (cfg.num_layers, 2, cfg.page_size, cfg.num_heads, cfg.head_dim)
    st, sst = MemoryStorage(32, page, cfg.dtype), MemoryStorage(8, (cfg.mamba_state_dim,), cfg.dtype)
    writer = HiCache(cfg, executor=DeterministicExecutor(copy_device=cfg.device), storage=st, state_storage=sst)
    toks = [1, 2, 3, 4]
    idx, slot = write_request(writer, toks)
    writer.insert(toks, idx, slot)
    writer.executor.complete_all()
    writer.poll()
    writer.write_backup_storage(writer.match_prefix(toks).last_device_node)
    writer.executor.complete_all()
    writer.poll()
    reader = HiCache(cfg, executor=DeterministicExecutor(copy_device=cfg.device), storage=st, state_storage=sst)
    op = reader.prefetch("r", reader.root, toks)
    for part in op.kv_parts:
        reader.executor.complete(op.id, part)
    return reader, op


def test_class1_clean_cache_waits_for_the_pool_transfer():
    """Reference: best-effort still does not terminate while the state transfer is in flight."""
    reader, op = _mamba_prefetch_with_pool_pending()
    assert reader.prefetch_progress("r") is False
    reader.executor.complete(op.id, op.parts[-1])
    assert reader.prefetch_progress("r") is True
    assert reader.check_invariants(check_data=True) == []


def test_class1_seeded_bug_is_caught_by_x2():
    """With the bug, the prefetch terminates with its pool transfer in flight, and X2 says so."""
    with SEEDED_BUGS["class1_terminate_with_pool_in_flight"].patch():
        reader, _ = _mamba_prefetch_with_pool_pending()
        assert reader.prefetch_progress("r") is True
        assert "X2" in {v.invariant for v in reader.check_invariants()}

"""Component behaviour of HiCache: mamba states, SWA windows, and data-less full-only nodes.

Every cache here comes from the `make_cache` fixture, which checks all invariants (data
included) when the test ends.
"""

from __future__ import annotations

import pytest
import torch
from helpers import NO_AUTO_BACKUP, A, B, C, D, attached, insert_request, mamba_cache, node_at, settle

from refcache import CacheConfig, DeterministicExecutor, HiCache, InvalidAnchorError, RefCacheError
from refcache.data import node_data_ok, pages_ok

put = insert_request


# ================================================================================== mamba
def test_mamba_insert_takes_slot_for_exact_prefix(make_cache):
    """insert gives the mamba slot to the node ending exactly at the prefix; a duplicate insert does not take it."""
    cache = mamba_cache(make_cache)
    res, _, slot = put(cache, A + B)
    assert res.mamba_slot_used and res.cached_len == 0
    node = node_at(cache, A + B)
    assert torch.equal(node.mamba_value, slot)
    assert node_data_ok(cache, node) == (True, True, True)
    free_before = cache.device_state.allocator.available()
    res2, _, _ = put(cache, A + B)
    assert res2 == (8, False)
    assert torch.equal(node.mamba_value, slot)
    assert cache.device_state.allocator.available() == free_before


def test_mamba_insert_of_shorter_prefix_fills_split_upper(make_cache):
    """Inserting a strict prefix splits the node and the new upper node takes the prefix's own slot."""
    cache = mamba_cache(make_cache)
    _, _, slot_ab = put(cache, A + B)
    res, _, slot_a = put(cache, A)
    assert res.cached_len == 4 and res.mamba_slot_used
    upper, lower = node_at(cache, A), node_at(cache, A + B)
    assert lower.parent is upper
    assert torch.equal(upper.mamba_value, slot_a) and torch.equal(lower.mamba_value, slot_ab)
    assert node_data_ok(cache, upper)[2] and node_data_ok(cache, lower)[2]


def test_mamba_split_upper_is_tombstone(make_cache):
    """A split by match_prefix leaves the upper node without a mamba state; the lower keeps it."""
    cache = mamba_cache(make_cache)
    _, _, slot = put(cache, A + B)
    node = node_at(cache, A + B)
    cache.match_prefix(A)
    upper = node_at(cache, A)
    assert upper is not node and node.parent is upper
    assert upper.mamba_value is None and upper.mamba_host is None
    assert cache.is_tombstone(upper) and not cache.is_tombstone(node)
    assert upper.value is not None
    assert torch.equal(node.mamba_value, slot)
    assert node_data_ok(cache, node) == (True, True, True)


def test_mamba_match_skips_tombstones(make_cache):
    """last_device_node and best_match_node stop at the deepest node with a state, not at a tombstone."""
    cache = mamba_cache(make_cache)
    put(cache, A)
    put(cache, A + B + C)
    m = cache.match_prefix(A + B)  # ends inside the B+C node: B becomes a tombstone
    a, b = node_at(cache, A), node_at(cache, A + B)
    assert b.mamba_value is None
    assert m.last_device_node is a and m.best_match_node is a
    assert m.last_host_node is b
    assert m.device_len == 4 and pages_ok(cache, A + B, m.device_indices)
    full = cache.match_prefix(A + B + C)
    assert full.best_match_node is node_at(cache, A + B + C) is full.last_device_node
    assert full.device_len == 12 and pages_ok(cache, A + B + C, full.device_indices)


def test_mamba_evict_interior_becomes_tombstone(make_cache):
    """evict_mamba on an interior node frees only its state: it stays on device as a tombstone."""
    cache = mamba_cache(make_cache)
    put(cache, A)
    put(cache, A + B)
    a, b = node_at(cache, A), node_at(cache, A + B)
    free = cache.device_state.allocator.available()
    assert cache.evict_mamba(1) == 1  # a is LRU (ties by id) and interior
    assert a.mamba_value is None and cache.is_tombstone(a)
    assert a.value is not None and attached(cache, a)
    assert b.mamba_value is not None
    assert cache.device_state.allocator.available() == free + 1
    assert cache.match_prefix(A).best_match_node is cache.root


def test_mamba_evict_leaf_is_evicted_whole(make_cache):
    """evict_mamba on a device leaf without host data deletes the node and frees its KV too."""
    cache = mamba_cache(make_cache)
    put(cache, A)
    put(cache, A + B)
    a, b = node_at(cache, A), node_at(cache, A + B)
    cache.match_prefix(A)  # a becomes more recent than b
    kv_free = cache.device_kv.allocator.available()
    assert cache.evict_mamba(1) == 1
    assert not attached(cache, b)
    assert cache.device_kv.allocator.available() == kv_free + 4
    assert attached(cache, a) and a.mamba_value is not None


def test_mamba_cascade_deletes_childless_tombstone(make_cache):
    """Deleting the only child of a tombstone deletes the tombstone too (cascade)."""
    cache = mamba_cache(make_cache)
    put(cache, A + B)
    cache.match_prefix(A)  # split: upper tombstone A (recent), lower B (LRU) keeps the state
    upper = node_at(cache, A)
    assert cache.evict_mamba(1) == 1
    assert not attached(cache, upper)
    assert cache.nodes() == []
    assert cache.device_kv.allocator.available() == cache.config.device_tokens
    assert cache.device_state.allocator.available() == cache.config.device_mamba_slots


def test_mamba_cascade_stops_at_locked_tombstone(make_cache):
    """A locked tombstone is not cascade-deleted when its last child goes."""
    cache = mamba_cache(make_cache)
    put(cache, A + B)
    cache.match_prefix(A)
    upper, lower = node_at(cache, A), node_at(cache, A + B)
    assert cache.lock(upper) is upper
    assert cache.evict_mamba(1) == 1
    assert not attached(cache, lower)
    assert attached(cache, upper) and upper.lock_ref == 1 and upper.value is not None
    cache.unlock(upper)


def test_mamba_cascade_stops_at_host_referenced_tombstone(make_cache):
    """A tombstone host-referenced by an in-flight load-back survives the deletion of its other child."""
    cache = mamba_cache(make_cache, write_policy="write_through")
    put(cache, A + B)
    put(cache, A + C)
    settle(cache)
    cache.match_prefix(A)
    p, b, c = node_at(cache, A), node_at(cache, A + B), node_at(cache, A + C)
    assert cache.is_tombstone(p)
    cache.evict(12)  # everything demoted to L2
    assert all(n.value is None for n in (p, b, c))
    op = cache.load_back(b)
    assert p.host_ref == 1 and b.host_ref == 1
    cache.match_prefix(A + B)  # c is now the LRU host leaf
    assert cache.evict_host(4) == 4
    assert not attached(cache, c)
    assert attached(cache, p) and attached(cache, b) and p.children == {tuple(B): b}
    cache.executor.complete_all()
    assert op in cache.poll()
    assert p.host_ref == 0 and p.value is not None and b.mamba_value is not None
    assert cache.match_prefix(A + B).device_len == 8


def test_mamba_cascade_stops_at_host_state_holder(make_cache):
    """A node with no device state but a host mamba state is not a tombstone and survives a cascade."""
    cache = mamba_cache(make_cache, write_policy="write_through")
    put(cache, A)
    put(cache, A + B)
    settle(cache)
    a, b = node_at(cache, A), node_at(cache, A + B)
    assert cache.evict_mamba(1) == 1  # a (LRU, interior) loses its device state only
    assert a.mamba_value is None and a.mamba_host is not None and not cache.is_tombstone(a)
    cache.match_prefix(A)  # b is LRU
    assert cache.evict(4) == 4  # b demoted to L2
    assert b.value is None and b.host_value is not None
    assert cache.evict_host(4) == 4  # b deleted; cascade reaches a
    assert not attached(cache, b)
    assert attached(cache, a) and a.mamba_host is not None
    assert cache.match_prefix(A).best_match_node is a


def test_mamba_cascade_deletes_tombstone_after_host_delete(make_cache):
    """The same cascade deletes the ancestor when it holds no mamba state on either tier."""
    cache = mamba_cache(make_cache, write_policy="write_through")
    put(cache, A + B)
    settle(cache)
    cache.match_prefix(A)  # split: upper is a tombstone on both tiers
    upper, lower = node_at(cache, A), node_at(cache, A + B)
    assert upper.mamba_host is None and lower.mamba_host is not None
    cache.match_prefix(A)
    assert cache.evict(4) == 4  # lower demoted
    assert cache.evict_host(4) == 8  # lower deleted, cascade takes the upper tombstone (counted)
    assert not attached(cache, lower) and not attached(cache, upper)
    assert cache.host_state.allocator.available() == cache.config.host_mamba_slots


def test_mamba_backup_carries_state_as_pool_transfer(make_cache):
    """write_backup moves the mamba state as a pool transfer whose record the node keeps, intact, after poll."""
    cache = mamba_cache(make_cache)
    put(cache, A + B)
    node = node_at(cache, A + B)
    op = cache.write_backup(node)
    assert op is not None and len(op.pool_transfers) == 1
    t = op.pool_transfers[0]
    assert t.name == "mamba" and torch.equal(t.device_indices, node.mamba_value)
    assert t.host_indices.dtype == torch.int64 and t.host_indices.device.type == "cpu"
    fp = t.fingerprint()
    assert sorted(p for _, p in cache.executor.pending_parts()) == sorted(op.parts)
    settle(cache)
    assert node.mamba_host is t
    assert t.fingerprint() == fp
    assert node.host_value is not None
    assert node_data_ok(cache, node) == (True, True, True)


def test_mamba_load_back_restores_anchor_state(make_cache):
    """load_back of a host-only anchor brings its KV and its mamba state back onto the device."""
    cache = mamba_cache(make_cache, write_policy="write_through")
    put(cache, A + B)
    settle(cache)
    node = node_at(cache, A + B)
    assert cache.evict(8) == 8
    assert node.value is None and node.mamba_value is None and node.mamba_host is not None
    m = cache.match_prefix(A + B)
    assert m.best_match_node is node and m.device_len == 0 and m.host_hit_length == 8
    op = cache.load_back(m.best_match_node)
    assert op is not None and [t.name for t in op.pool_transfers] == ["mamba"]
    assert torch.equal(op.pool_transfers[0].host_indices, node.mamba_host.host_indices)
    assert node.mamba_value is None  # not before the ack
    settle(cache)
    assert node.mamba_value is not None and node.value is not None
    assert node_data_ok(cache, node) == (True, True, True)
    m2 = cache.match_prefix(A + B)
    assert m2.last_device_node is node and pages_ok(cache, A + B, m2.device_indices)


def test_mamba_load_back_refuses_tombstone_anchor(make_cache):
    """load_back on a mamba tombstone raises InvalidAnchorError and changes nothing."""
    cache = mamba_cache(make_cache)
    put(cache, A + B)
    cache.match_prefix(A)
    upper = node_at(cache, A)
    before = cache.snapshot()
    with pytest.raises(InvalidAnchorError):
        cache.load_back(upper)
    assert cache.snapshot().nodes == before.nodes and not cache.ops


def test_mamba_locked_node_keeps_state(make_cache):
    """evict_mamba never takes the state of a caller-locked node (or of its locked ancestors)."""
    cache = mamba_cache(make_cache)
    put(cache, A)
    put(cache, A + B)
    a, b = node_at(cache, A), node_at(cache, A + B)
    assert cache.lock(b) is b
    assert cache.evict_mamba(2) == 0
    assert a.mamba_value is not None and b.mamba_value is not None
    cache.unlock(b)
    assert cache.lock(a) is a
    assert cache.evict_mamba(2) == 1  # only b, a leaf, goes
    assert a.mamba_value is not None and not attached(cache, b)
    cache.unlock(a)


# ==================================================================================== swa
def swa_chain(make_cache, **kw):
    """An SWA cache holding the chain A-B-C-D (one page per node, window of two pages)."""
    cache = make_cache(components=("full", "swa"), swa_window=8, **{**NO_AUTO_BACKUP, **kw})
    for t in (A, A + B, A + B + C, A + B + C + D):
        put(cache, t)
    nodes = [node_at(cache, t) for t in (A, A + B, A + B + C, A + B + C + D)]
    return cache, nodes


def test_swa_inserted_nodes_hold_window(make_cache):
    """Every inserted node holds SWA KV on device (not yet on host)."""
    cache, nodes = swa_chain(make_cache)
    assert all(n.swa and not n.swa_host for n in nodes)
    m = cache.match_prefix(A + B + C + D)
    assert m.best_match_node is nodes[-1] is m.last_device_node
    assert pages_ok(cache, A + B + C + D, m.device_indices)


def test_swa_evict_makes_interior_tombstones(make_cache):
    """evict_swa drops SWA KV from interior nodes (LRU first), keeping their full KV."""
    cache, (a, b, c, d) = swa_chain(make_cache)
    assert cache.evict_swa(8) == 8
    assert not a.swa and not b.swa and c.swa and d.swa
    assert cache.is_tombstone(a) and cache.is_tombstone(b)
    assert all(n.value is not None for n in (a, b, c, d))
    m = cache.match_prefix(A + B + C + D)
    assert m.best_match_node is d and m.last_device_node is d  # d's window is c, d
    assert m.device_len == 16 and pages_ok(cache, A + B + C + D, m.device_indices)
    assert cache.match_prefix(A + B).best_match_node is cache.root


def test_swa_best_match_is_deepest_intact_window(make_cache):
    """best_match_node is the deepest node whose window is intact; breaking it moves the match up."""
    cache, (a, b, c, d) = swa_chain(make_cache)
    cache.match_prefix(A + B + C + D)
    cache.match_prefix(A + B)  # a, b most recent: c then d are LRU
    assert cache.evict_swa(4) == 4
    assert not c.swa and d.swa
    m = cache.match_prefix(A + B + C + D)
    assert m.best_match_node is b and m.last_device_node is b
    assert m.last_host_node is d and m.device_len == 8


def test_swa_best_match_uses_host_window(make_cache):
    """A window intact only on L2 still makes best_match_node, but not last_device_node."""
    cache, (a, b, c, d) = swa_chain(make_cache, write_policy="write_through")
    settle(cache)
    assert all(n.swa_host for n in (a, b, c, d))
    assert cache.evict_swa(12) == 12
    assert [n.swa for n in (a, b, c, d)] == [False, False, False, True]
    m = cache.match_prefix(A + B + C + D)
    assert m.best_match_node is d
    assert m.last_device_node is cache.root and m.host_hit_length == 16


def test_swa_load_back_restores_window(make_cache):
    """load_back at best_match_node brings the missing SWA nodes of its window (op.swa_nodes) back."""
    cache, (a, b, c, d) = swa_chain(make_cache, write_policy="write_through")
    settle(cache)
    cache.evict_swa(12)
    m = cache.match_prefix(A + B + C + D)
    op = cache.load_back(m.best_match_node)
    assert op is not None and op.swa_nodes == [c] and op.segments == []
    assert not c.swa
    settle(cache)
    assert c.swa and d.swa and not b.swa
    m2 = cache.match_prefix(A + B + C + D)
    assert m2.last_device_node is d and m2.device_len == 16
    assert pages_ok(cache, A + B + C + D, m2.device_indices)


def test_swa_load_back_of_host_only_path(make_cache):
    """load_back of a host-only path restores its full KV and its window; data is intact."""
    cache, (a, b, c, d) = swa_chain(make_cache, write_policy="write_through")
    settle(cache)
    assert cache.evict(8) == 8  # c and d demoted
    assert c.value is None and d.value is None and not c.swa and not d.swa
    m = cache.match_prefix(A + B + C + D)
    assert m.best_match_node is d and m.last_device_node is b and m.host_hit_length == 8
    op = cache.load_back(d)
    assert [s.node for s in op.segments] == [c, d] and set(op.swa_nodes) == {c, d}
    settle(cache)
    m2 = cache.match_prefix(A + B + C + D)
    assert m2.last_device_node is d and pages_ok(cache, A + B + C + D, m2.device_indices)
    assert all(node_data_ok(cache, n) == (True, True, True) for n in (a, b, c, d))


# ============================================================================== full only
def test_full_only_cascade_of_dataless_interior(make_cache):
    """A data-less interior node (device KV evicted, never backed up) is deleted when its last child goes."""
    cache = make_cache(**NO_AUTO_BACKUP)
    put(cache, A)
    put(cache, A + B)
    a, b = node_at(cache, A), node_at(cache, A + B)
    cache.write_backup(b)
    settle(cache)
    assert cache.evict(4) == 4  # b demoted (has L2)
    assert cache.evict(4) == 4  # a: no L2, has a host-only child -> data-less interior
    assert attached(cache, a) and a.value is None and a.host_value is None
    assert cache.is_tombstone(a)
    assert cache.match_prefix(A + B).last_host_node is cache.root
    assert cache.evict_host(4) == 4
    assert not attached(cache, b) and not attached(cache, a)
    assert cache.nodes() == []
    assert cache.host_kv.allocator.available() == cache.config.host_tokens
    assert cache.device_kv.allocator.available() == cache.config.device_tokens


def test_full_only_cascade_keeps_interior_with_data(make_cache):
    """An interior node that still has device KV is not deleted when its host-only child goes."""
    cache = make_cache(**NO_AUTO_BACKUP)
    put(cache, A)
    put(cache, A + B)
    a, b = node_at(cache, A), node_at(cache, A + B)
    cache.write_backup(b)
    settle(cache)
    assert cache.evict(4) == 4
    assert cache.evict_host(4) == 4
    assert not attached(cache, b) and attached(cache, a) and a.value is not None


def test_full_only_load_back_below_dataless_node_fails_cleanly():
    """load_back of a host-only node under a data-less interior node either works or raises a RefCacheError
    and leaves the cache unchanged."""
    # A private cache (not make_cache): when the bug fires the cache is broken on purpose.
    cache = HiCache(CacheConfig(**NO_AUTO_BACKUP), executor=DeterministicExecutor())
    put(cache, A)
    put(cache, A + B)
    a, b = node_at(cache, A), node_at(cache, A + B)
    cache.write_backup(b)
    settle(cache)
    cache.evict(4)
    cache.evict(4)  # a is now data-less, b host-only below it
    assert a.value is None and a.host_value is None and b.host_value is not None
    free = cache.device_kv.allocator.available()
    try:
        op = cache.load_back(b)
    except RefCacheError:
        op = None
        assert cache.device_kv.allocator.available() == free
        assert a.host_ref == 0 and b.host_ref == 0 and not cache.ops
    else:
        settle(cache)
        assert op is None or b.value is not None
    assert cache.check_invariants(check_data=True) == []


def test_evict_counts_cascade_deleted_tokens(make_cache):
    """evict(n) returns the L1 tokens it freed, cascades included, and stops once n are freed."""
    cache = mamba_cache(make_cache)
    put(cache, A + B)
    cache.match_prefix(A)  # split: A is a tombstone above B
    put(cache, D)  # an unrelated, most recently used leaf
    d = node_at(cache, D)
    before = cache.device_kv.allocator.available()
    got = cache.evict(8)  # deleting B cascades to A: 8 tokens freed, enough
    freed = cache.device_kv.allocator.available() - before
    assert got == freed
    assert attached(cache, d), "the MRU leaf was evicted although 8 tokens were already free"


def test_evict_host_counts_cascade_deleted_tokens(make_cache):
    """evict_host returns the L2 tokens it freed, including those of cascade-deleted tombstones."""
    cache = mamba_cache(make_cache, write_policy="write_through")
    put(cache, A + B)
    settle(cache)
    cache.match_prefix(A)  # split: upper is a tombstone on both tiers
    cache.evict(8)
    before = cache.host_kv.allocator.available()
    got = cache.evict_host(8)
    assert cache.nodes() == []
    assert got == cache.host_kv.allocator.available() - before == 8

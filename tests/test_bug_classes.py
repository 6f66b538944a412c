"""One scenario per bug class of DESIGN §4, each showing the reference cache's CORRECT behaviour.

Prefetch (L3) is not built yet, so classes 1 and 2 are expressed through what exists: the
termination rule of any operation with a pool transfer (backup / load-back), and the pure
length rule `prefetch_length` that the prefetch will use.
"""

from __future__ import annotations

import pytest
import torch
from helpers import PS, A, B, C, attached, insert_request, mamba_cache, node_at, settle

from refcache import InvalidAnchorError, OpState
from refcache.data import node_data_ok, pages_ok
from refcache.pages import page_align, prefetch_length
from refcache.transfer import COPY_INDEX_DTYPE, resolve


def put(cache, tokens):
    return insert_request(cache, tokens)[0]


# ================================================================ class 1: termination (X2)
def test_class1_op_not_acked_while_pool_transfer_pending(make_cache):
    """An op whose KV part is done but whose mamba pool transfer is pending is not acknowledged by poll."""
    cache = mamba_cache(make_cache)
    put(cache, A + B)
    node = node_at(cache, A + B)
    op = cache.write_backup(node)
    pool_part = op.parts[1]
    assert pool_part.startswith("pool:") and "mamba" in pool_part
    cache.executor.complete(op.id, "kv")
    assert cache.poll() == []
    assert op.id in cache.ops and op.state is OpState.IN_FLIGHT
    assert node.host_value is None and node.mamba_host is None
    assert node.lock_ref == 1  # the backup still holds its lock
    assert cache.check_invariants() == []
    cache.executor.complete(op.id, pool_part)
    assert cache.poll() == [op]
    assert op.state is OpState.DONE and op.id not in cache.ops
    assert node.host_value is not None and node.mamba_host is op.pool_transfers[0]
    assert node.lock_ref == 0
    assert node_data_ok(cache, node) == (True, True, True)


def test_class1_load_not_acked_while_state_transfer_pending(make_cache):
    """A load-back whose KV arrived but whose mamba state has not is not acknowledged, and the node is not served."""
    cache = mamba_cache(make_cache, write_policy="write_through")
    put(cache, A + B)
    settle(cache)
    node = node_at(cache, A + B)
    cache.evict(8)
    op = cache.load_back(cache.match_prefix(A + B).best_match_node)
    cache.executor.complete(op.id, "kv")
    assert cache.poll() == []
    assert op.id in cache.ops and node.value is None and node.mamba_value is None
    assert cache.match_prefix(A + B).device_len == 0
    cache.executor.complete(op.id, op.parts[1])
    assert cache.poll() == [op]
    assert node.value is not None and node.mamba_value is not None
    m = cache.match_prefix(A + B)
    assert m.last_device_node is node and pages_ok(cache, A + B, m.device_indices)


def test_class1_pool_done_first_then_kv(make_cache):
    """The other order too: the pool transfer done alone does not finish the operation."""
    cache = mamba_cache(make_cache)
    put(cache, A)
    node = node_at(cache, A)
    op = cache.write_backup(node)
    cache.executor.complete(op.id, op.parts[1])
    assert cache.poll() == [] and op.id in cache.ops
    cache.executor.complete(op.id, "kv")
    assert cache.poll() == [op] and node.mamba_host is not None


def test_class1_failed_pool_transfer_releases_everything(make_cache):
    """A failed pool transfer ends the op as FAILED and releases its L2 KV and state slots."""
    cache = mamba_cache(make_cache)
    put(cache, A + B)
    node = node_at(cache, A + B)
    op = cache.write_backup(node)
    cache.executor.complete(op.id, "kv")
    cache.executor.fail(op.id, op.parts[1])
    assert cache.poll() == [op]
    assert op.state is OpState.FAILED and not cache.ops
    assert node.host_value is None and node.mamba_host is None and node.lock_ref == 0
    assert cache.host_kv.allocator.available() == cache.config.host_tokens
    assert cache.host_state.allocator.available() == cache.config.host_mamba_slots


# ============================================================ class 2: partial prefetch length
@pytest.mark.parametrize("requested,available,want", [
    (32, 32, 32),
    (32, 31, 28),  # one slot short: truncated to the page boundary, not abandoned
    (32, 13, 12),
    (32, 9, 8),    # truncated down to exactly the threshold: still fetched
    (32, 8, 8),
    (32, 7, 0),    # page-aligned 4 < threshold 8: not worth starting
    (8, 100, 8),   # request == threshold
    (7, 100, 0),   # request one token below a page-aligned threshold
    (12, 10, 8),
])
def test_class2_prefetch_truncates_to_available(requested, available, want):
    """L2 short of space: the prefetch length is the page-aligned available size; 0 only below the threshold."""
    assert prefetch_length(requested, available, PS, 8) == want


@pytest.mark.parametrize("ps", [1, 2, 4, 16])
@pytest.mark.parametrize("threshold", [0, 1, 4, 5, 16])
def test_class2_prefetch_length_boundary_sweep(ps, threshold):
    """Around every page boundary and the threshold, a partial fit is kept exactly when it reaches the threshold."""
    for requested in range(0, 3 * 16 + 2):
        for available in range(-1, 3 * 16 + 2):
            r = prefetch_length(requested, available, ps, threshold)
            fit = page_align(min(requested, available), ps)
            assert r == (fit if fit >= max(threshold, 1) else 0), (requested, available)


# ==================================================== class 3: pool-transfer records intact (X1)
def test_class3_backup_record_keeps_host_indices(make_cache):
    """After a backup the node's mamba record still holds the int64 CPU host indices allocated; evict_host frees it."""
    cache = mamba_cache(make_cache)
    put(cache, A + B)
    node = node_at(cache, A + B)
    op = cache.write_backup(node)
    t = op.pool_transfers[0]
    allocated = t.host_indices.clone()
    dev_slot = t.device_indices.clone()
    assert int(allocated.item()) in cache.host_state.allocator.allocated_pages()

    fp = t.fingerprint()
    fresh = resolve([t], torch.device(cache.config.device))
    assert fresh[0] is not t
    assert fresh[0].host_indices.dtype == COPY_INDEX_DTYPE
    assert t.fingerprint() == fp  # resolve did not touch the record

    settle(cache)
    rec = node.mamba_host
    assert rec is t
    assert rec.host_indices.dtype == torch.int64 and rec.host_indices.device.type == "cpu"
    assert torch.equal(rec.host_indices, allocated) and torch.equal(rec.device_indices, dev_slot)
    assert cache.check_invariants(check_data=True) == []

    # later: demote and free the L2 copy; the free must receive the host slot, not a device slot
    cache.evict(8)
    assert node.value is None and node.mamba_host is rec
    assert cache.evict_host(8) == 8
    assert not attached(cache, node)
    assert cache.host_state.allocator.available() == cache.config.host_mamba_slots
    assert int(allocated.item()) not in cache.host_state.allocator.allocated_pages()


def test_class3_load_back_leaves_host_record_intact(make_cache):
    """A load-back reading the state from L2 does not mutate the record the node keeps."""
    cache = mamba_cache(make_cache, write_policy="write_through")
    put(cache, A + B)
    settle(cache)
    node = node_at(cache, A + B)
    rec = node.mamba_host
    fp = rec.fingerprint()
    cache.evict(8)
    op = cache.load_back(node)
    assert op.pool_transfers[0] is not rec
    settle(cache)
    assert node.mamba_host is rec and rec.fingerprint() == fp
    assert node_data_ok(cache, node) == (True, True, True)


# ==================================================== class 4: load-back anchor and lock (T1, T6)
def test_class4_load_back_anchored_at_best_match_node(make_cache):
    """load_back at a tombstone last_host_node raises InvalidAnchorError; at best_match_node it works."""
    cache = mamba_cache(make_cache, write_policy="write_through")
    put(cache, A)
    put(cache, A + B + C)
    settle(cache)
    assert cache.evict(12) == 12  # everything host-only, states on L2
    m = cache.match_prefix(A + B)  # splits B+C: B is a tombstone (its state belongs to A+B+C)
    a, b = node_at(cache, A), node_at(cache, A + B)
    assert m.last_host_node is b and m.best_match_node is a
    assert b.mamba_value is None and b.mamba_host is None and b.host_value is not None
    assert m.last_device_node is cache.root and m.host_hit_length == 4

    with pytest.raises(InvalidAnchorError):
        cache.load_back(m.last_host_node)
    assert not cache.ops and b.host_ref == 0 and a.host_ref == 0
    assert cache.device_kv.allocator.available() == cache.config.device_tokens

    op = cache.load_back(m.best_match_node)
    assert op.anchor is a and [s.node for s in op.segments] == [a]
    assert cache.check_invariants() == []
    settle(cache)
    assert a.value is not None and a.mamba_value is not None and b.value is None
    m2 = cache.match_prefix(A + B)
    assert m2.last_device_node is a and pages_ok(cache, A, m2.device_indices)


def test_class4_lock_skips_host_only_bottom(make_cache):
    """lock() on a node whose bottom segment is host-only locks the deepest device ancestor instead."""
    cache = mamba_cache(make_cache, write_policy="write_through")
    put(cache, A)
    put(cache, A + B)
    put(cache, A + B + C)
    settle(cache)
    a, b, c = node_at(cache, A), node_at(cache, A + B), node_at(cache, A + B + C)
    cache.match_prefix(A + B)  # c is the LRU leaf
    assert cache.evict(4) == 4
    assert c.value is None and b.value is not None
    locked = cache.lock(c)
    assert locked is b and locked.value is not None
    assert c.lock_ref == 0 and b.lock_ref == 1 and a.lock_ref == 1
    assert cache.check_invariants() == []
    assert cache.evict(100) == 0  # nothing on device is evictable now
    assert b.value is not None and b.mamba_value is not None
    cache.unlock(locked)
    assert b.lock_ref == 0 and a.lock_ref == 0


def test_class4_lock_of_fully_host_path_locks_nothing(make_cache):
    """lock() on a path entirely off device returns the root and changes no lock count."""
    cache = mamba_cache(make_cache, write_policy="write_through")
    put(cache, A + B)
    settle(cache)
    node = node_at(cache, A + B)
    cache.evict(8)
    assert cache.lock(node) is cache.root
    assert node.lock_ref == 0 and cache.caller_locks() == {}


# ======================================================== class 5: host_ref blocks cascade (T3)
def test_class5_host_referenced_tombstone_survives_cascade(make_cache):
    """A tombstone parent host-referenced by an in-flight load-back survives a cascade and the load completes."""
    cache = mamba_cache(make_cache, write_policy="write_through")
    put(cache, A + B)
    put(cache, A + C)
    settle(cache)
    cache.match_prefix(A)
    p, x, y = node_at(cache, A), node_at(cache, A + B), node_at(cache, A + C)
    assert cache.is_tombstone(p)  # p's own prefix never had a state
    assert cache.evict(12) == 12
    assert all(n.value is None for n in (p, x, y))
    p_host = p.host_value

    op = cache.load_back(cache.match_prefix(A + B).best_match_node)
    assert op.anchor is x and [s.node for s in op.segments] == [p, x]
    assert p.host_ref == 1 and x.host_ref == 1 and y.host_ref == 0

    cache.match_prefix(A + B)  # y becomes the LRU host leaf
    assert cache.evict_host(4) == 4  # y deleted; the cascade reaches p
    assert not attached(cache, y)
    assert attached(cache, p) and attached(cache, x) and x.parent is p
    assert p.host_value is p_host  # L2 data the load reads is not freed
    assert cache.evict_host(100) == 0  # referenced host data is never freed
    assert cache.check_invariants() == []

    settle(cache)
    assert op.state is OpState.DONE
    assert p.host_ref == 0 and x.host_ref == 0
    m = cache.match_prefix(A + B)
    assert m.last_device_node is x and m.device_len == 8 and pages_ok(cache, A + B, m.device_indices)


def test_class5_cascade_after_load_released(make_cache):
    """Once the load is acknowledged and x is deleted, the tombstone parent is cascade-deleted."""
    cache = mamba_cache(make_cache, write_policy="write_through")
    put(cache, A + B)
    settle(cache)
    cache.match_prefix(A)
    p, x = node_at(cache, A), node_at(cache, A + B)
    cache.evict(8)
    cache.load_back(x)
    settle(cache)
    assert p.host_ref == 0
    cache.match_prefix(A)  # x LRU
    cache.evict(8)
    assert cache.evict_host(8) >= 4
    assert not attached(cache, x) and not attached(cache, p)
    assert cache.nodes() == []
    assert cache.host_kv.allocator.available() == cache.config.host_tokens

"""Operations of HiCache (DESIGN §2): match, insert, locks, eviction, backup policies, load-back, poll.

Every cache comes from the `make_cache` fixture, which checks all invariants (data included)
once the test is over.
"""

from __future__ import annotations

import pytest
import torch
from helpers import insert_request, settle

from refcache import InvalidAnchorError, InvalidIndicesError, OpKind, OpState
from refcache.data import node_data_ok, pages_ok

SMALL = dict(page_size=2, device_tokens=16, host_tokens=32)
NO_BACKUP = dict(SMALL, write_policy="write_through_selective", backup_after_hits=1000)  # never backs up
THROUGH = dict(SMALL, write_policy="write_through")
BACK = dict(SMALL, write_policy="write_back")
MAMBA = ("full", "mamba")

T = [10, 11, 12, 13, 14, 15, 16, 17]  # four pages of two tokens


def put(cache, tokens, keep_duplicates=False):
    """insert_request, returning (indices, InsertResult)."""
    res, idx, _ = insert_request(cache, tokens, keep_duplicates)
    return idx, res


def find(cache, tokens):
    """The node at which `tokens` end, found without stamping or splitting anything."""
    node, pos = cache.root, 0
    while pos < len(tokens):
        node = node.children[tuple(tokens[pos : pos + cache.page_size])]
        pos += len(node.key)
    assert pos == len(tokens), "tokens end inside a node"
    return node


def keys(cache):
    return sorted(n.key for n in cache.nodes())


# ============================================================================ match_prefix
def test_match_empty_cache(make_cache):
    """An empty cache matches nothing: no indices, every node result is the root."""
    cache = make_cache(**SMALL)
    res = cache.match_prefix(T)
    assert res.device_len == 0 and res.host_hit_length == 0
    assert res.last_device_node is res.last_host_node is res.best_match_node is cache.root
    assert cache.nodes() == []


def test_match_full_hit(make_cache):
    """A request equal to an inserted one gets back exactly the inserted slots, holding its KV."""
    cache = make_cache(**NO_BACKUP)
    idx, _ = put(cache, T)
    res = cache.match_prefix(T)
    assert torch.equal(res.device_indices, idx)
    assert res.last_device_node is res.best_match_node is find(cache, T)
    assert pages_ok(cache, T, res.device_indices)


def test_match_partial_hit_splits_node(make_cache):
    """A match ending inside a node splits it; the prefix's slots hold the prefix's KV."""
    cache = make_cache(**NO_BACKUP)
    put(cache, T)
    res = cache.match_prefix(T[:4] + [99, 98])
    assert res.device_len == 4
    assert keys(cache) == [tuple(T[:4]), tuple(T[4:])]
    assert res.last_device_node.key == tuple(T[:4])
    assert find(cache, T).parent is res.last_device_node
    assert pages_ok(cache, T, res.device_indices)


def test_match_truncates_to_page_boundary(make_cache):
    """Request tokens are cut to whole pages: a trailing partial page is ignored."""
    cache = make_cache(**NO_BACKUP)
    put(cache, T)
    assert cache.match_prefix(T + [7]).device_len == 8
    assert len(cache.nodes()) == 1  # the extra half page did not split anything
    assert cache.match_prefix(T[:5]).device_len == 4
    assert keys(cache) == [tuple(T[:4]), tuple(T[4:])]


def test_match_stamps_whole_path(make_cache):
    """match_prefix marks every node on the matched path as the most recently used."""
    cache = make_cache(**NO_BACKUP)
    put(cache, T[:4])
    put(cache, T)
    put(cache, [1, 2])
    upper, lower, other = find(cache, T[:4]), find(cache, T), find(cache, [1, 2])
    assert max(upper.last_access, lower.last_access) < other.last_access
    cache.match_prefix(T)
    assert min(upper.last_access, lower.last_access) > other.last_access


def test_match_refresh_changes_eviction_order(make_cache):
    """A prefix hit by match_prefix outlives an older, unhit one when evicting."""
    cache = make_cache(**NO_BACKUP)
    put(cache, [1, 2])
    put(cache, [3, 4])
    cache.match_prefix([1, 2])
    assert cache.evict(2) == 2
    assert keys(cache) == [(1, 2)]


# ================================================================================== insert
def test_insert_new_prefix(make_cache):
    """A new prefix is taken whole: cached_len 0, and the caller owns none of the slots any more."""
    cache = make_cache(**NO_BACKUP)
    idx, res = put(cache, T)
    assert res.cached_len == 0
    assert torch.equal(find(cache, T).value, idx)
    assert cache.snapshot().caller_pages == frozenset()
    with pytest.raises(InvalidIndicesError):
        cache.free_device(idx)


def test_insert_extends_existing_path(make_cache):
    """Extending a cached prefix: the cached part's indices stay the caller's, the rest go to a new child."""
    cache = make_cache(**NO_BACKUP)
    put(cache, T[:4])
    idx, res = put(cache, T, keep_duplicates=True)
    assert res.cached_len == 4
    assert keys(cache) == [tuple(T[:4]), tuple(T[4:])]
    assert torch.equal(find(cache, T).value, idx[4:])
    cache.free_device(idx[:4])  # the caller's duplicates
    with pytest.raises(InvalidIndicesError):
        cache.free_device(idx[4:])  # taken by the tree


def test_insert_diverging_key_splits_node(make_cache):
    """Inserting a key that diverges inside a node splits it and adds a sibling leaf."""
    cache = make_cache(**NO_BACKUP)
    put(cache, T)
    idx, res = put(cache, T[:4] + [50, 51], keep_duplicates=True)
    assert res.cached_len == 4
    assert keys(cache) == [tuple(T[:4]), tuple(T[4:]), (50, 51)]
    cache.free_device(idx[:4])
    assert pages_ok(cache, T[:4] + [50, 51], cache.match_prefix(T[:4] + [50, 51]).device_indices)


def test_chain_hashes_are_computed_on_first_use_and_survive_splits(make_cache):
    """A device-only insert hashes nothing (only L3 and the data oracle read the hashes); hashes
    computed later, on either side of splits made before or after, chain from the root exactly
    as hashing the whole key would."""
    from refcache.pages import ROOT_HASH, page_hashes

    cache = make_cache(**NO_BACKUP)
    put(cache, T)
    leaf = find(cache, T)
    assert leaf._hashes is None
    cache.match_prefix(T[:2] + [99, 98])  # split before any hash exists: both halves stay lazy
    upper = leaf.parent
    assert upper._hashes is None and leaf._hashes is None
    want = page_hashes(ROOT_HASH, T, 2)
    assert leaf.hashes == want[1:] and upper.hashes == want[:1]
    cache.match_prefix(T[:6] + [99, 98])  # split after: the halves share the computed list
    assert leaf.hashes == want[3:] and leaf.parent.hashes == want[1:3]


def test_insert_fully_cached_returns_full_length(make_cache):
    """Re-inserting a cached prefix takes nothing: cached_len == len and the caller frees every slot."""
    cache = make_cache(**NO_BACKUP)
    first, _ = put(cache, T)
    free_before = cache.device_kv.allocator.available()
    dup, res = put(cache, T, keep_duplicates=True)
    assert res.cached_len == len(T)
    assert torch.equal(find(cache, T).value, first)
    cache.free_device(dup)
    assert cache.device_kv.allocator.available() == free_before


def test_insert_reattaches_fresh_indices_to_host_only_node(make_cache):
    """Inserting over a demoted (host-only) node gives it the caller's fresh slots; nothing counts as cached."""
    cache = make_cache(**THROUGH)
    put(cache, T)
    settle(cache)
    assert cache.evict(len(T)) == len(T)
    node = find(cache, T)
    assert node.value is None and node.host_value is not None
    idx, res = put(cache, T)
    assert res.cached_len == 0
    assert find(cache, T) is node and torch.equal(node.value, idx)
    assert node.host_value is not None
    assert pages_ok(cache, T, cache.match_prefix(T).device_indices)
    with pytest.raises(InvalidIndicesError):
        cache.free_device(idx)


# ============================================================================ lock / unlock
def test_lock_returns_deepest_device_node(make_cache):
    """Locking a host-only node locks (and returns) its deepest device ancestor."""
    cache = make_cache(**THROUGH)
    put(cache, T[:4])
    put(cache, T)
    settle(cache)
    upper, lower = find(cache, T[:4]), find(cache, T)
    assert cache.evict(4) == 4  # demotes the leaf only
    assert lower.value is None and upper.value is not None
    assert cache.lock(lower) is upper
    assert upper.lock_ref == 1 and lower.lock_ref == 0
    cache.unlock(upper)
    assert upper.lock_ref == 0


def test_lock_on_device_node_returns_it(make_cache):
    """Locking a device node locks that very node."""
    cache = make_cache(**NO_BACKUP)
    put(cache, T)
    node = find(cache, T)
    assert cache.lock(node) is node and node.lock_ref == 1
    cache.unlock(node)
    assert node.lock_ref == 0


def test_lock_ref_counts_along_path(make_cache):
    """lock/unlock add and remove one reference on every node from the node to the root, not on siblings."""
    cache = make_cache(**NO_BACKUP)
    put(cache, T)
    put(cache, T[:4] + [50, 51])
    upper, a, b = find(cache, T[:4]), find(cache, T), find(cache, T[:4] + [50, 51])
    cache.lock(a)
    assert (upper.lock_ref, a.lock_ref, b.lock_ref) == (1, 1, 0)
    cache.lock(b)
    assert (upper.lock_ref, a.lock_ref, b.lock_ref) == (2, 1, 1)
    cache.unlock(a)
    cache.unlock(b)
    assert (upper.lock_ref, a.lock_ref, b.lock_ref) == (0, 0, 0)


def test_locked_data_not_evicted(make_cache):
    """evict skips locked nodes (and their ancestors) and frees them once unlocked."""
    cache = make_cache(**NO_BACKUP)
    put(cache, [1, 2, 3, 4])
    put(cache, [5, 6])
    locked = cache.lock(find(cache, [1, 2, 3, 4]))
    assert cache.evict(100) == 2
    assert keys(cache) == [(1, 2, 3, 4)]
    assert pages_ok(cache, [1, 2, 3, 4], locked.value)
    cache.unlock(locked)
    assert cache.evict(100) == 4
    assert cache.nodes() == []


# =================================================================================== evict
def test_evict_lru_order(make_cache):
    """evict frees least recently used leaves first."""
    cache = make_cache(**NO_BACKUP)
    for t in ([1, 2], [3, 4], [5, 6]):
        put(cache, t)
    cache.match_prefix([1, 2])
    assert cache.evict(2) == 2
    assert keys(cache) == [(1, 2), (5, 6)]
    assert cache.evict(2) == 2
    assert keys(cache) == [(1, 2)]


def test_evict_demotes_backed_up_leaf(make_cache):
    """A leaf with L2 data is demoted: it stays in the tree with only its host copy."""
    cache = make_cache(**THROUGH)
    put(cache, T)
    settle(cache)
    assert cache.evict(len(T)) == len(T)
    node = find(cache, T)
    assert node.value is None and node.host_value is not None
    assert cache.device_kv.allocator.available() == 16
    assert node_data_ok(cache, node) == (True, True, True)


def test_evict_deletes_leaf_without_backup(make_cache):
    """A leaf without L2 data is deleted and its slots freed."""
    cache = make_cache(**NO_BACKUP)
    put(cache, T)
    assert cache.evict(len(T)) == len(T)
    assert cache.nodes() == []
    assert cache.device_kv.allocator.available() == 16


def test_evict_continues_to_parent_that_became_leaf(make_cache):
    """Once a leaf is gone its parent becomes a device leaf and is evicted next if more is needed."""
    cache = make_cache(**NO_BACKUP)
    put(cache, T[:4])
    put(cache, T)
    assert cache.evict(6) == 8
    assert cache.nodes() == []


def test_evict_cascade_deletes_childless_mamba_tombstone(make_cache):
    """With mamba, a stateless parent left childless by an eviction is deleted in cascade."""
    cache = make_cache(components=MAMBA, **NO_BACKUP)
    put(cache, T)
    put(cache, T[:4] + [50, 51])  # splits T: the upper node has no state (a mamba tombstone)
    upper = find(cache, T[:4])
    assert upper.mamba_value is None
    cache.evict(6)  # the two leaves
    assert cache.nodes() == []
    assert cache.device_kv.allocator.available() == 16


def test_evict_return_counts_cascaded_tokens(make_cache):
    """evict returns every L1 token it freed, those of cascade-deleted tombstones included."""
    cache = make_cache(components=MAMBA, **NO_BACKUP)
    put(cache, T)
    put(cache, T[:4] + [50, 51])
    free = cache.device_kv.allocator.available()
    freed = cache.evict(6)
    assert freed == cache.device_kv.allocator.available() - free == 10


def test_evict_continues_past_cascaded_tombstone(make_cache):
    """evict keeps going above a tombstone deleted in cascade: an evictable grandparent is freed too."""
    cache = make_cache(components=MAMBA, **NO_BACKUP)
    put(cache, [1, 2])
    put(cache, [1, 2, 3, 4, 5, 6])
    cache.match_prefix([1, 2, 3, 4, 0, 0])  # splits (3..6): (3, 4) is a stateless tombstone
    assert find(cache, [1, 2, 3, 4]).mamba_value is None
    cache.evict(6)
    assert cache.nodes() == []
    assert cache.device_kv.allocator.available() == 16


# ============================================================================== evict_host
def test_evict_host_only_frees_host_only_leaves(make_cache):
    """evict_host removes host-only leaves and leaves nodes that are also on device alone."""
    cache = make_cache(**THROUGH)
    put(cache, [1, 2])
    put(cache, [3, 4])
    settle(cache)
    assert cache.evict(2) == 2  # demotes (1, 2), the LRU leaf
    assert cache.evict_host(100) == 2
    assert keys(cache) == [(3, 4)]
    kept = find(cache, [3, 4])
    assert kept.value is not None and kept.host_value is not None
    assert cache.host_kv.allocator.available() == 30


def test_evict_host_lru_order(make_cache):
    """evict_host frees the least recently used host-only leaf first."""
    cache = make_cache(**THROUGH)
    put(cache, [1, 2])
    put(cache, [3, 4])
    settle(cache)
    cache.evict(100)
    cache.match_prefix([1, 2])
    assert cache.evict_host(2) == 2
    assert keys(cache) == [(1, 2)]


def test_evict_host_skips_host_referenced_node(make_cache):
    """A host-only node being loaded back (host_ref > 0) is not evicted from L2."""
    cache = make_cache(**THROUGH)
    put(cache, T)
    settle(cache)
    cache.evict(100)
    node = find(cache, T)
    assert cache.load_back(node) is not None
    assert node.host_ref == 1
    assert cache.evict_host(100) == 0
    settle(cache)
    assert node.value is not None and node.host_ref == 0


def test_evict_host_cascades_to_dataless_parent(make_cache):
    """Deleting a host-only leaf also deletes its parent once that is a childless node without data."""
    cache = make_cache(**NO_BACKUP)
    put(cache, T[:4])
    put(cache, T)
    cache.write_backup(find(cache, T))
    settle(cache)
    cache.evict(100)  # leaf demoted; its parent has no L2 copy and keeps no data
    upper = find(cache, T[:4])
    assert upper.value is None and upper.host_value is None
    assert cache.evict_host(100) == 4
    assert cache.nodes() == []


def test_evict_host_continues_past_cascaded_node(make_cache):
    """evict_host keeps going above a data-less node deleted in cascade."""
    cache = make_cache(**NO_BACKUP)
    for t in ([1, 2], [1, 2, 3, 4], [1, 2, 3, 4, 5, 6]):
        put(cache, t)
    cache.write_backup(find(cache, [1, 2]))
    cache.write_backup(find(cache, [1, 2, 3, 4, 5, 6]))
    settle(cache)
    cache.evict(100)  # (1,2) and (5,6) host-only, (3,4) data-less between them
    assert find(cache, [1, 2, 3, 4]).host_value is None
    cache.evict_host(100)
    assert cache.nodes() == []
    assert cache.host_kv.allocator.available() == 32


# ========================================================================== write policies
def test_write_through_backs_up_on_insert(make_cache):
    """Under write-through, insert starts a backup at once; poll records the L2 copy."""
    cache = make_cache(**THROUGH)
    put(cache, T)
    node = find(cache, T)
    [op] = cache.ops.values()
    assert op.kind is OpKind.BACKUP and node.host_value is None
    assert settle(cache) == [op]
    assert node.host_value is not None and node_data_ok(cache, node)[1]


def test_write_through_selective_backs_up_after_hits(make_cache):
    """Under write-through-selective, the backup starts once match_prefix has hit the node N times."""
    cache = make_cache(**dict(SMALL, write_policy="write_through_selective", backup_after_hits=2))
    put(cache, T)
    assert not cache.ops
    cache.match_prefix(T)
    assert not cache.ops
    cache.match_prefix(T)
    assert [op.kind for op in cache.ops.values()] == [OpKind.BACKUP]
    settle(cache)
    assert find(cache, T).host_value is not None


def test_write_back_backs_up_only_when_evicting(make_cache):
    """Under write-back, neither insert nor hits back up; evict does, and demotes only when poll sees it done."""
    cache = make_cache(**BACK)
    put(cache, T)
    for _ in range(3):
        cache.match_prefix(T)
    assert not cache.ops
    assert cache.evict(len(T)) == 0  # deferred until the backup completes
    node = find(cache, T)
    [op] = cache.ops.values()
    assert op.kind is OpKind.BACKUP and op.demote_on_done
    cache.executor.complete_all()
    assert node.value is not None  # done, but not yet acknowledged
    assert cache.poll() == [op]
    assert node.value is None and node.host_value is not None
    assert cache.device_kv.allocator.available() == 16


def test_write_backup_none_when_on_host_or_in_flight(make_cache):
    """write_backup returns None for a node already backed up or being backed up."""
    cache = make_cache(**BACK)
    put(cache, T)
    node = find(cache, T)
    assert cache.write_backup(node) is not None
    assert cache.write_backup(node) is None
    settle(cache)
    assert cache.write_backup(node) is None


# =============================================================================== load_back
def test_load_back_whole_path(make_cache):
    """load_back brings every non-device node from the top of the path down to best_match_node."""
    cache = make_cache(**THROUGH)
    put(cache, T[:4])
    put(cache, T)
    settle(cache)
    cache.evict(100)
    res = cache.match_prefix(T)
    upper, lower = find(cache, T[:4]), find(cache, T)
    assert res.device_len == 0 and res.best_match_node is lower and res.host_hit_length == 8
    op = cache.load_back(res.best_match_node)
    assert [s.node for s in op.segments] == [upper, lower]
    settle(cache)
    res = cache.match_prefix(T)
    assert res.device_len == 8 and pages_ok(cache, T, res.device_indices)


def test_load_back_starts_at_first_non_device_node(make_cache):
    """With the upper part still on device, load_back only copies the missing lower part."""
    cache = make_cache(**THROUGH)
    put(cache, T[:4])
    put(cache, T)
    settle(cache)
    cache.evict(4)
    res = cache.match_prefix(T)
    assert res.device_len == 4 and res.host_hit_length == 4
    op = cache.load_back(res.best_match_node)
    assert [s.node for s in op.segments] == [find(cache, T)]
    assert find(cache, T[:4]).lock_ref == 1  # the device ancestor is held while loading
    settle(cache)
    res = cache.match_prefix(T)
    assert res.device_len == 8 and pages_ok(cache, T, res.device_indices)
    assert find(cache, T[:4]).lock_ref == 0


def test_load_back_none_when_nothing_to_load(make_cache):
    """load_back returns None for a node already on device, and for a path whose load is in flight."""
    cache = make_cache(**THROUGH)
    put(cache, T)
    settle(cache)
    node = find(cache, T)
    assert cache.load_back(node) is None
    cache.evict(100)
    assert cache.load_back(node) is not None
    assert cache.load_back(node) is None
    settle(cache)


def test_load_back_data_not_served_before_ack(make_cache):
    """Until poll acknowledges the load, match_prefix does not serve the loading node from device."""
    cache = make_cache(**THROUGH)
    put(cache, T)
    settle(cache)
    cache.evict(100)
    node = find(cache, T)
    cache.load_back(node)
    cache.executor.complete_all()
    assert cache.match_prefix(T).device_len == 0
    cache.poll()
    assert cache.match_prefix(T).device_len == 8


def test_load_back_below_dataless_node_refuses_or_loads(make_cache):
    """load_back under a data-less interior node raises InvalidAnchorError cleanly or loads correctly."""
    cache = make_cache(**NO_BACKUP)
    for t in ([1, 2], [1, 2, 3, 4], [1, 2, 3, 4, 5, 6]):
        put(cache, t)
    cache.write_backup(find(cache, [1, 2]))
    cache.write_backup(find(cache, [1, 2, 3, 4, 5, 6]))
    settle(cache)
    cache.evict(100)  # (1,2) and (5,6) host-only, (3,4) data-less between them
    before = cache.snapshot(with_data=True)
    try:
        cache.load_back(find(cache, [1, 2, 3, 4, 5, 6]))
    except InvalidAnchorError:
        assert cache.snapshot(with_data=True) == before
    else:
        settle(cache)
    assert cache.check_invariants(check_data=True) == []


# ==================================================================================== poll
@pytest.mark.parametrize("first", ["kv", "pool:0:mamba"])
def test_poll_acks_only_when_every_part_done(make_cache, first):
    """A backup with a mamba pool transfer is acknowledged only after both parts complete, in either order."""
    cache = make_cache(components=MAMBA, **THROUGH)
    put(cache, T)
    node = find(cache, T)
    [op] = cache.ops.values()
    assert sorted(p for _, p in cache.executor.pending_parts()) == ["kv", "pool:0:mamba"]
    cache.executor.complete(op.id, first)
    assert cache.poll() == []
    assert op.id in cache.ops and node.host_value is None and node.mamba_host is None
    cache.executor.complete(op.id)
    assert cache.poll() == [op] and op.state is OpState.DONE
    assert node.host_value is not None and node.mamba_host is not None
    assert node_data_ok(cache, node) == (True, True, True)


@pytest.mark.parametrize("failed", ["kv", "pool:0:mamba"])
@pytest.mark.parametrize("failed_first", [True, False])
def test_poll_failed_part_releases_everything(make_cache, failed, failed_first):
    """A failed part aborts the op only once no part is pending; then every slot it held is free again."""
    cache = make_cache(components=MAMBA, **THROUGH)
    host_kv, host_state = cache.host_kv.allocator.available(), cache.host_state.allocator.available()
    put(cache, T)
    node = find(cache, T)
    [op] = cache.ops.values()
    other = "pool:0:mamba" if failed == "kv" else "kv"
    if failed_first:
        cache.executor.fail(op.id, failed)
        assert cache.poll() == []  # the other part is still copying
        assert op.id in cache.ops and cache.host_kv.allocator.available() < host_kv
        cache.executor.complete(op.id, other)
    else:
        cache.executor.complete(op.id, other)
        assert cache.poll() == []
        cache.executor.fail(op.id, failed)
    assert cache.poll() == [op] and op.state is OpState.FAILED
    assert not cache.ops and node.lock_ref == 0
    assert node.host_value is None and node.mamba_host is None and node.value is not None
    assert cache.host_kv.allocator.available() == host_kv
    assert cache.host_state.allocator.available() == host_state


def test_failed_load_releases_device_slots(make_cache):
    """A failed load frees its L1 slots, leaves the node host-only and drops its lock and host_ref."""
    cache = make_cache(**THROUGH)
    put(cache, T[:4])
    put(cache, T)
    settle(cache)
    cache.evict(4)
    upper, lower = find(cache, T[:4]), find(cache, T)
    free = cache.device_kv.allocator.available()
    op = cache.load_back(lower)
    assert cache.device_kv.allocator.available() == free - 4
    cache.executor.fail(op.id, "kv")
    assert cache.poll() == [op] and op.state is OpState.FAILED
    assert cache.device_kv.allocator.available() == free
    assert lower.value is None and lower.host_value is not None
    assert (upper.lock_ref, lower.host_ref, upper.host_ref) == (0, 0, 0)


def test_poll_ops_complete_out_of_order(make_cache):
    """Operations are acknowledged independently: a later one can finish before an earlier one."""
    cache = make_cache(**THROUGH)
    put(cache, [1, 2])
    put(cache, [3, 4])
    first, second = cache.ops.values()
    cache.executor.complete(second.id)
    assert cache.poll() == [second]
    assert find(cache, [3, 4]).host_value is not None and find(cache, [1, 2]).host_value is None
    cache.executor.complete(first.id)
    assert cache.poll() == [first]
    assert find(cache, [1, 2]).host_value is not None

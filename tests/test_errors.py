"""Bad inputs (DESIGN §2): each raises the right `refcache.errors` error and leaves the cache unchanged.

"Unchanged" is checked by comparing whole snapshots (tree, pools, caller-owned slots, operations,
bookkeeping, data checks) taken before and after the failed call.
"""

from __future__ import annotations

import pytest
import torch
from helpers import insert_request, settle

from refcache import (
    CacheConfig,
    ComponentError,
    ConfigError,
    InvalidAnchorError,
    InvalidIndicesError,
    InvalidKeyError,
    LockError,
    PoolExhaustedError,
    RefCacheError,
    TreeNode,
    UnknownNodeError,
)
from refcache.data import write_request

SMALL = dict(page_size=2, device_tokens=16, host_tokens=32)
NO_BACKUP = dict(SMALL, write_policy="write_through_selective", backup_after_hits=1000)  # never backs up
THROUGH = dict(SMALL, write_policy="write_through")
MAMBA = ("full", "mamba")

T = [10, 11, 12, 13]


def put(cache, tokens):
    """insert_request, returning the node the tokens end at."""
    insert_request(cache, tokens)
    return cache.match_prefix(tokens).last_host_node


def raises_unchanged(cache, error, fn, *args, **kwargs):
    """Call fn(*args, **kwargs); it must raise `error` and leave the cache's snapshot exactly as it was."""
    before = cache.snapshot(with_data=True)
    with pytest.raises(error) as info:
        fn(*args, **kwargs)
    after = cache.snapshot(with_data=True)
    assert after.nodes == before.nodes
    assert after.pools == before.pools
    assert after.caller_pages == before.caller_pages and after.caller_states == before.caller_states
    assert after.ops == before.ops
    assert after == before
    assert isinstance(info.value, RefCacheError)
    return info.value


def demoted(cache, tokens):
    """Insert `tokens` under write-through, back them up and evict them: the node is host-only."""
    node = put(cache, tokens)
    settle(cache)
    cache.evict(len(tokens))
    assert node.value is None and node.host_value is not None
    return node


# ===================================================================================== keys
@pytest.mark.parametrize("n", [1, 3, 5])
def test_insert_unaligned_key(make_cache, n):
    """insert refuses a key that is not a whole number of pages."""
    cache = make_cache(**NO_BACKUP)
    idx, _ = write_request(cache, T)
    raises_unchanged(cache, InvalidKeyError, cache.insert, list(range(n)), idx)
    cache.free_device(idx)


@pytest.mark.parametrize("tokens", [[1.0, 2.0], ["a", "b"], [1, None], [1, 2.5]])
def test_insert_non_integer_tokens(make_cache, tokens):
    """insert refuses tokens that are not integers."""
    cache = make_cache(**NO_BACKUP)
    idx = cache.alloc_device(2)
    raises_unchanged(cache, InvalidKeyError, cache.insert, tokens, idx)
    cache.free_device(idx)


@pytest.mark.parametrize("tokens", [torch.tensor([1.0, 2.0]), torch.tensor([True, False]),
                                    torch.tensor([[1, 2], [3, 4]])])
def test_match_bad_token_tensor(make_cache, tokens):
    """match_prefix refuses float, bool and multi-dimensional token tensors."""
    cache = make_cache(**NO_BACKUP)
    put(cache, T)
    raises_unchanged(cache, InvalidKeyError, cache.match_prefix, tokens)


def test_match_non_integer_list(make_cache):
    """match_prefix refuses a list with a non-integer token."""
    cache = make_cache(**NO_BACKUP)
    put(cache, T)
    raises_unchanged(cache, InvalidKeyError, cache.match_prefix, [10, 11, 12.0, 13])


def test_insert_float_token_tensor(make_cache):
    """insert refuses a float token tensor, even one holding whole numbers."""
    cache = make_cache(**NO_BACKUP)
    idx = cache.alloc_device(4)
    raises_unchanged(cache, InvalidKeyError, cache.insert, torch.tensor(T, dtype=torch.float32), idx)
    cache.free_device(idx)


# ================================================================================== indices
@pytest.mark.parametrize("bad", ["int32", "meta", "list", "2d", "short", "long", "unaligned", "repeated"])
def test_insert_malformed_indices(make_cache, bad):
    """insert refuses indices of the wrong dtype, device, type, shape, length or page alignment."""
    cache = make_cache(**NO_BACKUP)
    idx, _ = write_request(cache, T)
    wrong = {
        "int32": lambda: idx.to(torch.int32),
        "meta": lambda: idx.to("meta"),
        "list": lambda: idx.tolist(),
        "2d": lambda: idx.view(2, 2),
        "short": lambda: idx[:2],
        "long": lambda: torch.cat([idx, cache.alloc_device(2)]),
        "unaligned": lambda: idx + 1,
        "repeated": lambda: torch.cat([idx[:2], idx[:2]]),
    }[bad]()
    raises_unchanged(cache, InvalidIndicesError, cache.insert, T, wrong)


def test_insert_indices_not_allocated(make_cache):
    """insert refuses slots the caller never allocated."""
    cache = make_cache(**NO_BACKUP)
    free = cache.device_kv.allocator.slots_of([0, 1])
    raises_unchanged(cache, InvalidIndicesError, cache.insert, T, free)


def test_insert_indices_owned_by_tree(make_cache):
    """insert refuses slots the tree already took from an earlier insert."""
    cache = make_cache(**NO_BACKUP)
    node = put(cache, T)
    raises_unchanged(cache, InvalidIndicesError, cache.insert, [1, 2, 3, 4], node.value)


def test_double_free(make_cache):
    """free_device of slots already given back raises, leaving the pool as it was."""
    cache = make_cache(**NO_BACKUP)
    idx = cache.alloc_device(4)
    cache.free_device(idx)
    raises_unchanged(cache, InvalidIndicesError, cache.free_device, idx)


def test_free_of_tree_owned_slots(make_cache):
    """free_device refuses slots held by a tree node."""
    cache = make_cache(**NO_BACKUP)
    node = put(cache, T)
    raises_unchanged(cache, InvalidIndicesError, cache.free_device, node.value)


def test_free_partly_owned_is_all_or_nothing(make_cache):
    """free_device of owned plus foreign slots frees nothing."""
    cache = make_cache(**NO_BACKUP)
    node = put(cache, T)
    mine = cache.alloc_device(2)
    raises_unchanged(cache, InvalidIndicesError, cache.free_device, torch.cat([mine, node.value[:2]]))
    cache.free_device(mine)


@pytest.mark.parametrize("n", [-2, 3])
def test_alloc_device_not_whole_pages(make_cache, n):
    """alloc_device refuses a token count that is not a whole, non-negative number of pages."""
    cache = make_cache(**NO_BACKUP)
    raises_unchanged(cache, InvalidIndicesError, cache.alloc_device, n)


# ==================================================================================== locks
def test_unlock_never_locked(make_cache):
    """unlock of a node no caller locked raises LockError."""
    cache = make_cache(**NO_BACKUP)
    node = put(cache, T)
    raises_unchanged(cache, LockError, cache.unlock, node)


def test_unlock_twice(make_cache):
    """A second unlock after one lock raises LockError."""
    cache = make_cache(**NO_BACKUP)
    node = cache.lock(put(cache, T))
    cache.unlock(node)
    raises_unchanged(cache, LockError, cache.unlock, node)


def test_unlock_of_node_held_only_by_an_operation(make_cache):
    """A lock held by an in-flight backup cannot be released by a caller's unlock."""
    cache = make_cache(**THROUGH)
    node = put(cache, T)
    assert node.lock_ref == 1 and cache.ops  # the write-through backup holds it
    raises_unchanged(cache, LockError, cache.unlock, node)
    settle(cache)


def test_unlock_of_ancestor_of_locked_node(make_cache):
    """Unlocking the parent of the node actually locked raises LockError (unlock the node lock returned)."""
    cache = make_cache(**NO_BACKUP)
    put(cache, T[:2])
    leaf = put(cache, T)
    locked = cache.lock(leaf)
    raises_unchanged(cache, LockError, cache.unlock, leaf.parent)
    cache.unlock(locked)


# ============================================================================ unknown nodes
def _stranger(cache, make_cache, kind):
    if kind == "fresh":
        return TreeNode((1, 2))
    if kind == "other_cache":
        return put(make_cache(**NO_BACKUP), T)
    if kind == "detached":
        node = put(cache, [1, 2])
        cache.evict(100)
        assert node.parent is None
        return node
    return "not a node"


@pytest.mark.parametrize("method", ["lock", "unlock", "load_back", "write_backup"])
@pytest.mark.parametrize("kind", ["fresh", "other_cache", "detached", "str"])
def test_unknown_node(make_cache, method, kind):
    """Node methods refuse a node that is not attached to this cache."""
    cache = make_cache(**NO_BACKUP)
    put(cache, T)
    stranger = _stranger(cache, make_cache, kind)
    raises_unchanged(cache, UnknownNodeError, getattr(cache, method), stranger)


# ================================================================================= anchors
def test_load_back_on_mamba_tombstone(make_cache):
    """load_back refuses an anchor without a mamba state: it is not a match end."""
    cache = make_cache(components=MAMBA, **NO_BACKUP)
    put(cache, T)
    upper = cache.match_prefix(T[:2] + [0, 0]).last_host_node  # split: the upper half has no state
    assert upper.mamba_value is None and upper.mamba_host is None
    raises_unchanged(cache, InvalidAnchorError, cache.load_back, upper)


def test_load_back_on_dataless_node(make_cache):
    """load_back refuses a data-less interior node (no KV on any tier)."""
    cache = make_cache(**NO_BACKUP)
    put(cache, T[:2])
    leaf = put(cache, T)
    cache.write_backup(leaf)
    settle(cache)
    cache.evict(100)
    upper = leaf.parent
    assert upper.value is None and upper.host_value is None and upper.children
    raises_unchanged(cache, InvalidAnchorError, cache.load_back, upper)


def test_write_backup_of_host_only_node(make_cache):
    """write_backup refuses a node with no device KV."""
    cache = make_cache(**THROUGH)
    node = demoted(cache, T)
    raises_unchanged(cache, InvalidAnchorError, cache.write_backup, node)


# ============================================================================== exhaustion
def test_alloc_without_eviction_when_full(make_cache):
    """alloc_device(evict=False) raises when L1 is full, even though eviction could have made room."""
    cache = make_cache(**NO_BACKUP)
    put(cache, list(range(16)))
    assert cache.device_kv.allocator.available() == 0
    raises_unchanged(cache, PoolExhaustedError, cache.alloc_device, 2, evict=False)


def test_alloc_when_everything_locked(make_cache):
    """alloc_device raises, evicting nothing, when all of L1 is locked."""
    cache = make_cache(**NO_BACKUP)
    cache.lock(put(cache, list(range(16))))
    raises_unchanged(cache, PoolExhaustedError, cache.alloc_device, 2)


def test_alloc_when_caller_holds_everything(make_cache):
    """alloc_device raises when callers hold every L1 slot (nothing in the tree to evict)."""
    cache = make_cache(**NO_BACKUP)
    put(cache, T)
    held = cache.alloc_device(12)
    raises_unchanged(cache, PoolExhaustedError, cache.alloc_device, 6)
    cache.free_device(held)


def test_alloc_larger_than_evictable(make_cache):
    """alloc_device raises, evicting nothing, when even full eviction would not make room."""
    cache = make_cache(**NO_BACKUP)
    put(cache, [1, 2])
    locked = cache.lock(put(cache, list(range(20, 32))))
    raises_unchanged(cache, PoolExhaustedError, cache.alloc_device, 6)
    cache.unlock(locked)


def test_write_backup_when_host_full(make_cache):
    """write_backup raises when L2 is full of data it may not evict."""
    cache = make_cache(**dict(NO_BACKUP, host_tokens=4))
    a, b = put(cache, [1, 2, 3, 4]), put(cache, [5, 6, 7, 8])
    cache.write_backup(a)  # takes all of L2 until acknowledged
    raises_unchanged(cache, PoolExhaustedError, cache.write_backup, b)
    settle(cache)


# ============================================================================== components
def test_mamba_slot_on_full_only_cache(make_cache):
    """insert with a mamba_slot on a cache without mamba raises ComponentError."""
    cache = make_cache(**NO_BACKUP)
    idx, _ = write_request(cache, T)
    raises_unchanged(cache, ComponentError, cache.insert, T, idx, torch.tensor([0]))
    cache.free_device(idx)


def test_missing_mamba_slot(make_cache):
    """insert without a mamba_slot on a mamba cache raises ComponentError."""
    cache = make_cache(components=MAMBA, **NO_BACKUP)
    idx, slot = write_request(cache, T)
    raises_unchanged(cache, ComponentError, cache.insert, T, idx)
    cache.free_device(idx)
    cache.free_mamba(slot)


def test_mamba_slot_not_owned(make_cache):
    """insert with a mamba slot the caller did not allocate raises InvalidIndicesError."""
    cache = make_cache(components=MAMBA, **NO_BACKUP)
    idx, slot = write_request(cache, T)
    foreign = torch.tensor([int(slot) + 1])
    raises_unchanged(cache, InvalidIndicesError, cache.insert, T, idx, foreign)
    cache.free_device(idx)
    cache.free_mamba(slot)


@pytest.mark.parametrize("method", ["alloc_mamba", "evict_mamba"])
def test_mamba_api_on_full_only_cache(make_cache, method):
    """Mamba-only methods raise ComponentError on a cache without mamba."""
    cache = make_cache(**NO_BACKUP)
    args = () if method == "alloc_mamba" else (1,)
    raises_unchanged(cache, ComponentError, getattr(cache, method), *args)


# ==================================================================================== misc
@pytest.mark.parametrize("method", ["evict", "evict_host"])
def test_negative_eviction_amount(make_cache, method):
    """evict and evict_host refuse a negative amount."""
    cache = make_cache(**NO_BACKUP)
    put(cache, T)
    before = cache.snapshot(with_data=True)
    with pytest.raises(ValueError):
        getattr(cache, method)(-2)
    assert cache.snapshot(with_data=True) == before


# ================================================================================== config
@pytest.mark.parametrize("overrides", [
    dict(page_size=0),
    dict(page_size=-4),
    dict(page_size=4, device_tokens=6),
    dict(page_size=4, host_tokens=10),
    dict(page_size=4, device_tokens=0),
    dict(components=("mamba",)),
    dict(components=("swa", "full")),
    dict(components=()),
    dict(components=("full", "full")),
    dict(components=("full", "mamba", "swa")),
    dict(components=("full", "bogus")),
    dict(page_size=4, swa_window=6),
    dict(num_layers=0),
    dict(dtype=torch.int32),
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_config_errors(overrides):
    """CacheConfig refuses inconsistent geometry, sizes and component lists with ConfigError."""
    with pytest.raises(ConfigError):
        CacheConfig(**overrides)

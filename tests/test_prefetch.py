"""The L3 prefetch path: write to storage, prefetch back into L2 under each policy, the mamba pool
transfer (bug class 1), truncation when L2 is short (bug class 2), abort and draining, storage
faults, TP-rank agreement, and the host-slot accounting behind all of them.

Typical flow: cache A writes a request, backs it up to L2 and writes it to L3; a fresh cache B
sharing the storages prefetches it, the test drives each part with the deterministic executor,
`prefetch_progress` terminates it, and load-back must bring the exact bytes onto the device.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conftest import test_device
from refcache import CacheConfig, DeterministicExecutor, HiCache, UnknownOperationError
from refcache.data import pages_ok, write_request
from refcache.pages import ROOT_HASH, page_hashes
from refcache.storage import FileStorage, MemoryStorage
from refcache.tp import RankGroup
from refcache.transfer import OpState, PartStatus

PS = 4
TOKENS = list(range(100, 116))  # 4 pages
POLICIES = ("best_effort", "wait_complete", "timeout")
MAMBA = ("full", "mamba")


# ============================================================================== helpers
def _cfg(**kw) -> CacheConfig:
    return CacheConfig(**{"device": test_device(), "page_size": PS, **kw})


def _storages(cfg: CacheConfig, capacity: int = 256):
    page_shape = (cfg.num_layers, 2, cfg.page_size, cfg.num_heads, cfg.head_dim)
    return (MemoryStorage(capacity, page_shape, cfg.dtype),
            MemoryStorage(capacity, (cfg.mamba_state_dim,), cfg.dtype))


def _cache(cfg: CacheConfig, storage, state_storage, ranks: RankGroup | None = None) -> HiCache:
    return HiCache(cfg, executor=DeterministicExecutor(copy_device=cfg.device), storage=storage,
                   state_storage=state_storage, ranks=ranks)


def _ok(cache: HiCache) -> None:
    v = cache.check_invariants(check_data=True)
    assert v == [], "\n".join(map(str, v))


def _settle(cache: HiCache) -> None:
    cache.executor.complete_all()
    cache.poll()


def _insert(cache: HiCache, tokens) -> None:
    idx, slot = write_request(cache, tokens)
    res = cache.insert(tokens, idx, slot)
    if res.cached_len:
        cache.free_device(idx[: res.cached_len])
    if slot is not None and not res.mamba_slot_used:
        cache.free_mamba(slot)
    _settle(cache)  # write-through backup to L2


def _store(cache: HiCache, node) -> None:
    op = cache.write_backup_storage(node)
    assert op is not None
    _settle(cache)
    assert op.state is OpState.DONE


def _seed(cfg: CacheConfig, storage, state_storage, tokens=TOKENS, cuts=()) -> HiCache:
    """Cache A: write `tokens` (as nodes ending at each cut and at the end) and store every node in L3."""
    roomy = replace(cfg, device_tokens=256, host_tokens=256, write_policy="write_through")  # whatever B gets
    a = _cache(roomy, storage, state_storage)
    for end in [*cuts, len(tokens)]:
        _insert(a, tokens[:end])
    for n in a.nodes():
        _store(a, n)
    _ok(a)
    return a


def _host_used(cache: HiCache) -> tuple[int, int]:
    """(L2 KV tokens, L2 mamba slots) owned by nodes and in-flight prefetches."""
    kv = sum(n.host_value.numel() for n in cache.nodes() if n.host_value is not None)
    st = sum(1 for n in cache.nodes() if n.mamba_host is not None)
    for op in cache.ops.values():
        kv += cache.prefetch_owned_host(op).numel()
        st += sum(t.host_indices.numel() for t in op.pool_transfers if t.host_indices is not None)
    return kv, st


def _accounted(cache: HiCache) -> None:
    """Every L2 slot is free or held by a node or an in-flight prefetch (no backup may be in flight)."""
    kv, st = _host_used(cache)
    assert cache.host_kv.allocator.available() + kv == cache.config.host_tokens
    if cache.host_state is not None:
        assert cache.host_state.allocator.available() + st == cache.config.host_mamba_slots


def _done_len(node) -> int:
    return sum(len(n.key) for n in node.path_to_root())


def _start(cache: HiCache, tokens=TOKENS, rid: str = "req"):
    m = cache.match_prefix(tokens)
    anchor = m.last_host_node
    return cache.prefetch(rid, anchor, tokens[_done_len(anchor):]), anchor


def _load_and_check(cache: HiCache, tokens, want_len: int) -> None:
    """The host hit is exactly `want_len` past the device match; load-back serves the right bytes."""
    m = cache.match_prefix(tokens)
    assert m.device_len + m.host_hit_length == want_len
    if m.host_hit_length:
        op = cache.load_back(m.best_match_node)
        assert op is not None
        _settle(cache)
    m = cache.match_prefix(tokens)
    assert m.device_len == want_len
    assert pages_ok(cache, tokens, m.device_indices)


class FakeRanks(RankGroup):
    """This rank plus one other rank whose answers the test sets."""

    world_size, rank = 2, 0

    def __init__(self, other_hit: int = 10**9, other_not_ready: int = 0, other_terminated: int = 0):
        self.other_hit, self.other_not_ready, self.other_terminated = other_hit, other_not_ready, other_terminated

    def all_max(self, values):
        not_ready, terminated = values
        return [max(int(not_ready), self.other_not_ready), max(int(terminated), self.other_terminated)]

    def all_min(self, values):
        return [min(int(values[0]), self.other_hit)]


# ===================================================================== round trip, per policy
@pytest.mark.parametrize("components", [("full",), MAMBA])
@pytest.mark.parametrize("policy", POLICIES)
def test_full_round_trip_serves_exact_bytes(components, policy):
    cfg = _cfg(components=components, prefetch_policy=policy)
    st, ss = _storages(cfg)
    _seed(cfg, st, ss)
    assert len(st) == 4 and len(ss) == (1 if components == MAMBA else 0)
    b = _cache(cfg, st, ss)
    free0 = b.host_kv.allocator.available()
    op, anchor = _start(b)
    assert anchor is b.root and op is not None
    assert op.kv_parts == [f"page:{i}" for i in range(4)]
    assert len(op.parts) == 4 + (components == MAMBA)
    assert b.host_kv.allocator.available() == free0 - 16
    b.executor.complete(op.id)  # every part
    assert b.prefetch_progress("req") is True
    b.poll()
    assert b.host_kv.allocator.available() == free0 - 16  # all 16 now belong to the new node
    m = b.match_prefix(TOKENS)
    assert m.device_len == 0 and m.host_hit_length == 16
    end = m.best_match_node
    assert _done_len(end) == 16 and end.value is None and end.host_value is not None
    if components == MAMBA:
        assert end.mamba_host is not None
    assert op.id not in b.ops
    _accounted(b)
    _ok(b)
    _load_and_check(b, TOKENS, 16)
    _ok(b)


def test_best_effort_inserts_only_leading_done_pages_and_frees_the_rest_after_they_settle():
    cfg = _cfg(prefetch_policy="best_effort")
    st, ss = _storages(cfg)
    _seed(cfg, st, ss)
    b = _cache(cfg, st, ss)
    free0 = b.host_kv.allocator.available()
    op, _ = _start(b)
    b.executor.complete(op.id, "page:0")
    b.executor.complete(op.id, "page:2")  # not leading: page:1 is still pending
    assert b.prefetch_progress("req") is True  # best effort: at once
    assert op.state is OpState.DRAINING
    m = b.match_prefix(TOKENS)
    assert m.host_hit_length == PS  # only page 0 joined the tree
    assert _done_len(m.last_host_node) == PS
    # pages 1..3 stay the op's while page 1 and 3 may still write into them
    assert b.host_kv.allocator.available() == free0 - 16
    _accounted(b)
    _ok(b)
    b.executor.complete(op.id, "page:1")
    b.poll()
    assert b.host_kv.allocator.available() == free0 - 16  # page 3 still pending
    assert op.id in b.ops
    b.executor.complete(op.id, "page:3")
    b.poll()
    assert b.host_kv.allocator.available() == free0 - PS
    assert op.id not in b.ops and op.state is OpState.DONE
    assert b.match_prefix(TOKENS).host_hit_length == PS  # late pages are not inserted after termination
    with pytest.raises(UnknownOperationError):
        b.prefetch_progress("req")
    _accounted(b)
    _ok(b)
    _load_and_check(b, TOKENS, PS)
    _ok(b)


def test_best_effort_with_nothing_arrived_inserts_nothing():
    cfg = _cfg(prefetch_policy="best_effort")
    st, ss = _storages(cfg)
    _seed(cfg, st, ss)
    b = _cache(cfg, st, ss)
    free0 = b.host_kv.allocator.available()
    op, _ = _start(b)
    assert b.prefetch_progress("req") is True
    assert b.nodes() == []
    assert b.host_kv.allocator.available() == free0 - 16
    _ok(b)
    for p in op.kv_parts:
        b.executor.complete(op.id, p)
    b.poll()
    assert b.host_kv.allocator.available() == free0 and b.nodes() == [] and not b.ops
    _ok(b)


def test_wait_complete_waits_for_every_page():
    cfg = _cfg(prefetch_policy="wait_complete")
    st, ss = _storages(cfg)
    _seed(cfg, st, ss)
    b = _cache(cfg, st, ss)
    op, _ = _start(b)
    for p in ["page:3", "page:0", "page:2"]:
        assert b.prefetch_progress("req") is False
        b.executor.complete(op.id, p)
        b.poll()
        assert op.state is OpState.IN_FLIGHT and b.nodes() == []
    for _ in range(3 * cfg.prefetch_timeout_steps):  # no deadline under wait_complete
        assert b.prefetch_progress("req") is False
    _ok(b)
    b.executor.complete(op.id, "page:1")
    assert b.prefetch_progress("req") is True
    b.poll()
    assert not b.ops
    _accounted(b)
    _load_and_check(b, TOKENS, 16)
    _ok(b)


def test_wait_complete_with_a_failed_page_inserts_the_leading_run():
    cfg = _cfg(prefetch_policy="wait_complete")
    st, ss = _storages(cfg)
    _seed(cfg, st, ss)
    b = _cache(cfg, st, ss)
    free0 = b.host_kv.allocator.available()
    op, _ = _start(b)
    b.executor.complete(op.id, "page:0")
    b.executor.fail(op.id, "page:1")
    b.executor.complete(op.id, "page:2")
    assert b.prefetch_progress("req") is False
    b.executor.complete(op.id, "page:3")
    assert b.prefetch_progress("req") is True  # settled: failed counts as settled
    b.poll()
    assert b.host_kv.allocator.available() == free0 - PS
    assert not b.ops
    _accounted(b)
    _load_and_check(b, TOKENS, PS)
    _ok(b)


@pytest.mark.parametrize("steps", [1, 3, 8])
def test_timeout_terminates_only_past_the_deadline(steps):
    cfg = _cfg(prefetch_policy="timeout", prefetch_timeout_steps=steps)
    st, ss = _storages(cfg)
    _seed(cfg, st, ss)
    b = _cache(cfg, st, ss)
    free0 = b.host_kv.allocator.available()
    op, _ = _start(b)
    b.executor.complete(op.id, "page:0")
    b.executor.complete(op.id, "page:1")
    for _ in range(steps - 1):
        assert b.prefetch_progress("req") is False
    assert b.prefetch_progress("req") or b.prefetch_progress("req")  # past the deadline: at most one tick late
    assert op.state is OpState.DRAINING
    assert b.match_prefix(TOKENS).host_hit_length == 2 * PS
    assert b.host_kv.allocator.available() == free0 - 16
    b.executor.fail(op.id, "page:2")
    b.executor.complete(op.id, "page:3")
    b.poll()
    assert b.host_kv.allocator.available() == free0 - 2 * PS and not b.ops
    _accounted(b)
    _load_and_check(b, TOKENS, 2 * PS)
    _ok(b)


def test_timeout_deadline_counts_other_cache_clock_ticks():
    steps = 6
    cfg = _cfg(prefetch_policy="timeout", prefetch_timeout_steps=steps)
    st, ss = _storages(cfg)
    _seed(cfg, st, ss)
    b = _cache(cfg, st, ss)
    op, _ = _start(b)
    for _ in range(steps + 1):
        b.match_prefix(TOKENS)  # every operation advances the cache clock
    assert b.prefetch_progress("req") is True
    assert b.nodes() == []  # nothing had arrived
    b.executor.complete(op.id)
    b.poll()
    assert not b.ops
    _accounted(b)
    _ok(b)


def test_timeout_terminates_early_when_everything_arrived():
    cfg = _cfg(prefetch_policy="timeout", prefetch_timeout_steps=100)
    st, ss = _storages(cfg)
    _seed(cfg, st, ss)
    b = _cache(cfg, st, ss)
    op, _ = _start(b)
    assert b.prefetch_progress("req") is False
    b.executor.complete(op.id)
    assert b.prefetch_progress("req") is True
    _load_and_check(b, TOKENS, 16)
    _ok(b)


# ============================================================ bug class 1: pool transfer in flight
@pytest.mark.parametrize("policy", POLICIES)
def test_class1_never_terminates_while_the_mamba_pool_transfer_is_in_flight(policy):
    cfg = _cfg(components=MAMBA, prefetch_policy=policy, prefetch_timeout_steps=2)
    st, ss = _storages(cfg)
    _seed(cfg, st, ss)
    b = _cache(cfg, st, ss)
    states0 = b.host_state.allocator.available()
    op, _ = _start(b)
    pool = op.parts[-1]
    assert pool.startswith("pool:") and pool not in op.kv_parts
    assert b.host_state.allocator.available() == states0 - 1
    for p in op.kv_parts:
        b.executor.complete(op.id, p)
    for _ in range(10):  # well past the timeout deadline, and even under best effort
        assert b.prefetch_progress("req") is False
        b.poll()
    assert op.state is OpState.IN_FLIGHT and b.nodes() == []
    _ok(b)
    b.executor.complete(op.id, pool)
    assert b.prefetch_progress("req") is True
    b.poll()
    assert not b.ops
    m = b.match_prefix(TOKENS)
    end = m.best_match_node
    assert _done_len(end) == 16 and end.mamba_host is not None and m.host_hit_length == 16
    assert b.host_state.allocator.available() == states0 - 1  # the slot now belongs to the node
    _accounted(b)
    _ok(b)
    _load_and_check(b, TOKENS, 16)
    assert b.match_prefix(TOKENS).last_device_node.mamba_value is not None
    _ok(b)


@pytest.mark.parametrize("policy", POLICIES)
def test_class1_pool_done_before_pages(policy):
    """The pool part lands first; the pages decide termination as the policy says."""
    cfg = _cfg(components=MAMBA, prefetch_policy=policy, prefetch_timeout_steps=50)
    st, ss = _storages(cfg)
    _seed(cfg, st, ss)
    b = _cache(cfg, st, ss)
    op, _ = _start(b)
    b.executor.complete(op.id, op.parts[-1])
    assert b.prefetch_progress("req") is (policy == "best_effort")
    if policy != "best_effort":
        b.executor.complete(op.id)
        assert b.prefetch_progress("req") is True
        _load_and_check(b, TOKENS, 16)
    else:  # nothing arrived: nothing inserted, the state slot is freed once the pages settle
        b.executor.complete(op.id)
        b.poll()
        assert b.nodes() == [] and not b.ops
        assert b.host_state.allocator.available() == cfg.host_mamba_slots
    _accounted(b)
    _ok(b)


def test_class1_failed_pool_part_terminates_without_a_state():
    cfg = _cfg(components=MAMBA, prefetch_policy="wait_complete")
    st, ss = _storages(cfg)
    _seed(cfg, st, ss)
    b = _cache(cfg, st, ss)
    op, _ = _start(b)
    for p in op.kv_parts:
        b.executor.complete(op.id, p)
    b.executor.fail(op.id, op.parts[-1])
    assert b.prefetch_progress("req") is True
    b.poll()
    assert not b.ops
    m = b.match_prefix(TOKENS)
    assert m.best_match_node is b.root and m.host_hit_length == 0  # no state: not a mamba match end
    assert _done_len(m.last_host_node) == 16 and m.last_host_node.mamba_host is None
    assert b.host_state.allocator.available() == cfg.host_mamba_slots
    _accounted(b)
    _ok(b)


def test_class1_state_read_error_is_a_failed_pool_part():
    cfg = _cfg(components=MAMBA, prefetch_policy="wait_complete")
    st, ss = _storages(cfg)
    _seed(cfg, st, ss)
    b = _cache(cfg, st, ss)
    op, _ = _start(b)
    ss.faults.inject("io_error", "get", op.prefetch.hashes[-1], 1)
    b.executor.complete(op.id)
    assert b.executor.status(op.id)[op.parts[-1]] is PartStatus.FAILED
    assert b.prefetch_progress("req") is True
    b.poll()
    assert b.match_prefix(TOKENS).last_host_node.mamba_host is None
    assert b.host_state.allocator.available() == cfg.host_mamba_slots
    _accounted(b)
    _ok(b)


def test_class1_best_effort_partial_pages_do_not_take_the_state():
    """The state is only valid for the full prefix: a partial insert must not carry it."""
    cfg = _cfg(components=MAMBA, prefetch_policy="best_effort")
    st, ss = _storages(cfg)
    _seed(cfg, st, ss)
    b = _cache(cfg, st, ss)
    op, _ = _start(b)
    b.executor.complete(op.id, "page:0")
    b.executor.complete(op.id, op.parts[-1])
    assert b.prefetch_progress("req") is True
    node = b.match_prefix(TOKENS).last_host_node
    assert _done_len(node) == PS and node.mamba_host is None
    _ok(b)
    b.executor.complete(op.id)
    b.poll()
    assert not b.ops and b.host_state.allocator.available() == cfg.host_mamba_slots
    _accounted(b)
    _ok(b)


# ==================================================================== bug class 2: truncation
@pytest.mark.parametrize("components", [("full",), MAMBA])
def test_class2_short_l2_truncates_to_the_page_aligned_fit(components):
    cfg = _cfg(components=components, host_tokens=8, prefetch_threshold=4)
    st, ss = _storages(cfg)
    _seed(cfg, st, ss)
    b = _cache(cfg, st, ss)
    op, _ = _start(b)
    assert op is not None, "a partial prefetch must not be abandoned"
    assert len(op.kv_parts) == 2
    assert op.prefetch.key == tuple(TOKENS[:8])
    assert b.host_kv.allocator.available() == 0
    b.executor.complete(op.id)
    assert b.prefetch_progress("req") is True
    b.poll()
    node = b.match_prefix(TOKENS).last_host_node
    assert _done_len(node) == 8 and node.host_value is not None
    _accounted(b)
    _ok(b)
    if components == ("full",):
        _load_and_check(b, TOKENS, 8)
        _ok(b)


def test_class2_truncated_mamba_prefetch_carries_the_state_of_its_end():
    cfg = _cfg(components=MAMBA, host_tokens=8, prefetch_threshold=4)
    st, ss = _storages(cfg)
    _seed(cfg, st, ss, cuts=(8,))  # states stored for the 8- and the 16-token prefixes
    assert len(ss) == 2
    b = _cache(cfg, st, ss)
    op, _ = _start(b)
    assert op is not None and len(op.kv_parts) == 2 and len(op.pool_transfers) == 1
    b.executor.complete(op.id, "page:0")
    b.executor.complete(op.id, "page:1")
    assert b.prefetch_progress("req") is False  # the pool part is in flight
    b.executor.complete(op.id, op.parts[-1])
    assert b.prefetch_progress("req") is True
    m = b.match_prefix(TOKENS)
    assert m.host_hit_length == 8 and m.best_match_node.mamba_host is not None
    _accounted(b)
    _ok(b)
    _load_and_check(b, TOKENS, 8)
    _ok(b)


def _pin_host(cache: HiCache, tokens_in_l2: int) -> None:
    """Occupy L2 with device+host data (not L2-evictable)."""
    if tokens_in_l2:
        _insert(cache, list(range(900, 900 + tokens_in_l2)))


@pytest.mark.parametrize("host_tokens, pinned, threshold, stored_pages, want_pages", [
    (16, 0, 4, 4, 4),  # everything fits
    (32, 0, 4, 4, 4),
    (16, 8, 8, 4, 2),  # room 8 == threshold: fetch 2 pages
    (16, 8, 9, 4, 0),  # room 8 < threshold 9
    (16, 12, 4, 4, 1),  # room of exactly one page
    (16, 12, 5, 4, 0),  # one page, below a threshold just above a page
    (16, 12, 0, 4, 1),  # threshold 0 still needs a whole page
    (16, 16, 0, 4, 0),  # no room at all
    (16, 4, 4, 4, 3),
    (16, 4, 13, 4, 0),
    (16, 4, 12, 4, 3),
    (32, 0, 8, 1, 0),  # storage hit (one page) below the threshold, though L2 has room
    (32, 0, 4, 1, 1),
    (32, 0, 16, 4, 4),
    (32, 0, 17, 4, 0),
])
def test_class2_length_boundaries(host_tokens, pinned, threshold, stored_pages, want_pages):
    cfg = _cfg(host_tokens=host_tokens, prefetch_threshold=threshold)
    st, ss = _storages(cfg)
    _seed(cfg, st, ss, tokens=TOKENS[: stored_pages * PS])
    b = _cache(cfg, st, ss)
    _pin_host(b, pinned)
    free0 = b.host_kv.allocator.available()
    assert free0 == host_tokens - pinned
    op, anchor = _start(b, TOKENS + [7, 7])  # a trailing partial page is ignored
    if want_pages == 0:
        assert op is None
        assert b.host_kv.allocator.available() == free0 and not b.ops and "req" not in b._prefetches
        assert anchor.host_ref == 0
    else:
        assert op is not None and len(op.kv_parts) == want_pages
        assert b.host_kv.allocator.available() == free0 - want_pages * PS
        b.executor.complete(op.id)
        assert b.prefetch_progress("req") is True
        _load_and_check(b, TOKENS, want_pages * PS)
    _accounted(b)
    _ok(b)


def test_class2_below_threshold_with_a_real_anchor_holds_nothing():
    cfg = _cfg(host_tokens=12, prefetch_threshold=8)
    st, ss = _storages(cfg)
    _seed(cfg, st, ss)
    b = _cache(cfg, st, ss)
    _insert(b, TOKENS[:8])  # B holds the first 2 pages on device and L2: 4 L2 tokens left
    free0 = b.host_kv.allocator.available()
    assert free0 == 4
    op, anchor = _start(b)
    assert _done_len(anchor) == 8
    assert op is None
    assert anchor.host_ref == 0 and all(n.host_ref == 0 for n in b.nodes())
    assert b.host_kv.allocator.available() == free0 and not b.ops
    _accounted(b)
    _ok(b)


def test_class2_evicts_l2_before_truncating():
    cfg = _cfg(host_tokens=16, device_tokens=32)
    st, ss = _storages(cfg)
    _seed(cfg, st, ss)
    b = _cache(cfg, st, ss)
    other = list(range(500, 508))
    _insert(b, other)
    b.evict(10**6)  # demote: host-only, L2-evictable
    assert b.match_prefix(other).host_hit_length == 8 and b.host_kv.allocator.available() == 8
    op, _ = _start(b)
    assert op is not None and len(op.kv_parts) == 4  # the whole run, by evicting the other prefix
    assert b.match_prefix(other).host_hit_length == 0
    b.executor.complete(op.id)
    assert b.prefetch_progress("req") is True
    _accounted(b)
    _load_and_check(b, TOKENS, 16)
    _ok(b)


def test_class2_truncates_to_free_plus_evictable():
    cfg = _cfg(host_tokens=16, device_tokens=32)
    st, ss = _storages(cfg)
    _seed(cfg, st, ss)
    b = _cache(cfg, st, ss)
    evictable = list(range(500, 504))
    _insert(b, evictable)
    b.evict(10**6)  # 4 L2 tokens host-only
    _pin_host(b, 4)  # 4 L2 tokens on device too: not evictable
    assert b.host_kv.allocator.available() == 8
    op, _ = _start(b)
    assert op is not None and len(op.kv_parts) == 3  # 8 free + 4 evictable
    assert b.host_kv.allocator.available() == 0
    b.executor.complete(op.id)
    assert b.prefetch_progress("req") is True
    _accounted(b)
    _load_and_check(b, TOKENS, 12)
    _ok(b)


# ========================================================================= continuation anchor
def test_prefetch_continues_under_a_device_anchor():
    cfg = _cfg(prefetch_policy="wait_complete")
    st, ss = _storages(cfg)
    _seed(cfg, st, ss)
    b = _cache(cfg, st, ss)
    _insert(b, TOKENS[:8])
    op, anchor = _start(b)
    assert _done_len(anchor) == 8 and len(op.kv_parts) == 2
    assert anchor.host_ref == 1
    b.executor.complete(op.id)
    assert b.prefetch_progress("req") is True
    assert anchor.host_ref == 0
    m = b.match_prefix(TOKENS)
    assert m.device_len == 8 and m.host_hit_length == 8
    _accounted(b)
    _load_and_check(b, TOKENS, 16)
    _ok(b)


def test_anchor_split_during_prefetch():
    cfg = _cfg(prefetch_policy="wait_complete")
    st, ss = _storages(cfg)
    _seed(cfg, st, ss)
    b = _cache(cfg, st, ss)
    _insert(b, TOKENS[:8])
    op, anchor = _start(b)
    b.match_prefix(TOKENS[:4])  # splits the anchor
    assert _done_len(anchor) == 8 and anchor.parent is not b.root
    assert anchor.parent.host_ref == 1
    _ok(b)
    b.executor.complete(op.id)
    assert b.prefetch_progress("req") is True
    assert all(n.host_ref == 0 for n in b.nodes())
    _accounted(b)
    _load_and_check(b, TOKENS, 16)
    _ok(b)


def test_anchor_survives_l2_eviction_while_referenced():
    cfg = _cfg(prefetch_policy="wait_complete", device_tokens=32)
    st, ss = _storages(cfg)
    _seed(cfg, st, ss)
    b = _cache(cfg, st, ss)
    _insert(b, TOKENS[:8])
    b.evict(10**6)  # the anchor is host-only now
    op, anchor = _start(b)
    assert anchor.value is None and anchor.host_value is not None
    assert b.evict_host(10**6) == 0  # host-referenced: kept (T3)
    assert b._nodes.get(anchor.id) is anchor
    _ok(b)
    b.executor.complete(op.id)
    assert b.prefetch_progress("req") is True
    _accounted(b)
    _load_and_check(b, TOKENS, 16)
    _ok(b)


def test_two_requests_for_the_same_pages_share_one_copy():
    cfg = _cfg(prefetch_policy="wait_complete")
    st, ss = _storages(cfg)
    _seed(cfg, st, ss)
    b = _cache(cfg, st, ss)
    free0 = b.host_kv.allocator.available()
    op1, _ = _start(b, rid="r1")
    op2, _ = _start(b, rid="r2")
    assert b.host_kv.allocator.available() == free0 - 32
    b.executor.complete(op1.id)
    b.executor.complete(op2.id)
    assert b.prefetch_progress("r1") is True
    assert b.prefetch_progress("r2") is True
    b.poll()
    assert b.host_kv.allocator.available() == free0 - 16  # the duplicate copy is freed
    assert len(b.nodes()) == 1
    _accounted(b)
    _load_and_check(b, TOKENS, 16)
    _ok(b)


def test_overlapping_requests_of_different_lengths():
    cfg = _cfg(prefetch_policy="wait_complete")
    st, ss = _storages(cfg)
    _seed(cfg, st, ss)
    b = _cache(cfg, st, ss)
    free0 = b.host_kv.allocator.available()
    op_short, _ = _start(b, TOKENS[:8], rid="short")
    op_long, _ = _start(b, TOKENS, rid="long")
    b.executor.complete(op_short.id)
    assert b.prefetch_progress("short") is True
    _ok(b)
    b.executor.complete(op_long.id)
    assert b.prefetch_progress("long") is True
    b.poll()
    assert b.host_kv.allocator.available() == free0 - 16
    _accounted(b)
    _load_and_check(b, TOKENS, 16)
    _ok(b)


# ================================================================================= abort
@pytest.mark.parametrize("settle", ["complete", "fail"])
def test_abort_mid_transfer_releases_anchor_now_and_slots_after_settle(settle):
    cfg = _cfg(prefetch_policy="wait_complete")
    st, ss = _storages(cfg)
    _seed(cfg, st, ss)
    b = _cache(cfg, st, ss)
    _insert(b, TOKENS[:8])
    free0 = b.host_kv.allocator.available()
    op, anchor = _start(b)
    assert anchor.host_ref == 1
    b.executor.complete(op.id, "page:0")
    b.abort_prefetch("req")
    assert anchor.host_ref == 0  # at once
    assert op.state is OpState.DRAINING
    assert b.host_kv.allocator.available() == free0 - 8  # page 1 may still be written
    b.poll()
    assert b.host_kv.allocator.available() == free0 - 8
    _accounted(b)
    _ok(b)
    getattr(b.executor, settle)(op.id, "page:1")
    b.poll()
    assert b.host_kv.allocator.available() == free0 and op.id not in b.ops
    assert op.state is OpState.ABORTED
    assert _done_len(b.match_prefix(TOKENS).last_host_node) == 8  # nothing inserted
    with pytest.raises(UnknownOperationError):
        b.abort_prefetch("req")
    with pytest.raises(UnknownOperationError):
        b.prefetch_progress("req")
    _accounted(b)
    _ok(b)


def test_abort_with_mamba_pool_in_flight_frees_the_state_slot_after_it_settles():
    cfg = _cfg(components=MAMBA, prefetch_policy="wait_complete")
    st, ss = _storages(cfg)
    _seed(cfg, st, ss)
    b = _cache(cfg, st, ss)
    op, _ = _start(b)
    b.executor.complete(op.id, "page:0")
    b.abort_prefetch("req")  # abort is always allowed, even with the pool part in flight
    assert b.host_state.allocator.available() == cfg.host_mamba_slots - 1
    _ok(b)
    b.executor.complete(op.id)
    b.poll()
    assert b.host_state.allocator.available() == cfg.host_mamba_slots
    assert b.host_kv.allocator.available() == cfg.host_tokens and b.nodes() == [] and not b.ops
    _ok(b)


def test_abort_of_a_settled_prefetch_frees_at_once():
    cfg = _cfg(prefetch_policy="wait_complete")
    st, ss = _storages(cfg)
    _seed(cfg, st, ss)
    b = _cache(cfg, st, ss)
    op, _ = _start(b)
    b.executor.complete(op.id)
    b.abort_prefetch("req")
    assert b.host_kv.allocator.available() == cfg.host_tokens and not b.ops and b.nodes() == []
    _ok(b)


def test_request_id_is_reusable_after_termination_and_abort():
    cfg = _cfg(prefetch_policy="wait_complete")
    st, ss = _storages(cfg)
    _seed(cfg, st, ss)
    b = _cache(cfg, st, ss)
    op, _ = _start(b)
    b.abort_prefetch("req")
    op2, _ = _start(b)  # the same id again, while the aborted op still drains
    assert op2 is not None and op2.id != op.id
    b.executor.complete(op.id)
    b.executor.complete(op2.id)
    assert b.prefetch_progress("req") is True
    b.poll()
    assert not b.ops
    _accounted(b)
    _load_and_check(b, TOKENS, 16)
    _ok(b)


def test_unknown_request():
    cfg = _cfg()
    st, ss = _storages(cfg)
    b = _cache(cfg, st, ss)
    with pytest.raises(UnknownOperationError):
        b.prefetch_progress("nope")
    with pytest.raises(UnknownOperationError):
        b.abort_prefetch("nope")
    _ok(b)


# ========================================================================= storage faults
@pytest.mark.parametrize("bad", [0, 1, 3])
def test_io_error_on_a_page_read_fails_that_part(bad):
    cfg = _cfg(prefetch_policy="wait_complete")
    st, ss = _storages(cfg)
    _seed(cfg, st, ss)
    b = _cache(cfg, st, ss)
    free0 = b.host_kv.allocator.available()
    op, _ = _start(b)
    st.faults.inject("io_error", "get", op.prefetch.hashes[bad], 1)
    b.executor.complete(op.id)
    status = b.executor.status(op.id)
    assert status[f"page:{bad}"] is PartStatus.FAILED
    assert all(s is PartStatus.DONE for p, s in status.items() if p != f"page:{bad}")
    assert b.prefetch_progress("req") is True
    b.poll()
    assert b.host_kv.allocator.available() == free0 - bad * PS
    _accounted(b)
    _ok(b)
    _load_and_check(b, TOKENS, bad * PS)
    _ok(b)
    # an I/O error is transient: the record is still there and a later prefetch gets the rest
    assert op.prefetch.hashes[bad] in st
    op2, _ = _start(b, rid="again")
    assert op2 is not None and len(op2.kv_parts) == 4 - bad
    b.executor.complete(op2.id)
    assert b.prefetch_progress("again") is True
    _accounted(b)
    _load_and_check(b, TOKENS, 16)
    _ok(b)


@pytest.mark.parametrize("op_kind", ["get", "put"])
def test_torn_page_is_a_miss_never_wrong_bytes(op_kind):
    cfg = _cfg(prefetch_policy="wait_complete")
    st, ss = _storages(cfg)
    h2 = page_hashes(ROOT_HASH, TOKENS, PS)[2]
    if op_kind == "put":
        st.faults.inject("torn", "put", h2, 1)
    _seed(cfg, st, ss)
    assert h2 in st
    b = _cache(cfg, st, ss)
    op, _ = _start(b)
    assert len(op.kv_parts) == 4  # exists() cannot see the tear
    if op_kind == "get":
        st.faults.inject("torn", "get", h2, 1)
    b.executor.complete(op.id)
    assert b.executor.status(op.id)["page:2"] is PartStatus.FAILED
    assert h2 not in st  # the bad record is dropped
    assert b.prefetch_progress("req") is True
    b.poll()
    _accounted(b)
    _ok(b)
    _load_and_check(b, TOKENS, 2 * PS)
    _ok(b)


@pytest.mark.parametrize("damage", ["flip_payload", "flip_header", "truncate", "misplaced", "deleted"])
def test_corrupt_file_storage_page_is_not_served(tmp_path, damage):
    cfg = _cfg(prefetch_policy="wait_complete")
    page_shape = (cfg.num_layers, 2, cfg.page_size, cfg.num_heads, cfg.head_dim)
    st = FileStorage(tmp_path / "l3", page_shape, cfg.dtype, fsync=False)
    ss = MemoryStorage(16, (cfg.mamba_state_dim,), cfg.dtype)
    _seed(cfg, st, ss)
    hashes = page_hashes(ROOT_HASH, TOKENS, PS)
    path = st.path(hashes[1])
    raw = bytearray(open(path, "rb").read())
    if damage == "flip_payload":
        raw[len(raw) // 2] ^= 0x01
    elif damage == "flip_header":
        raw[6] ^= 0x80
    elif damage == "truncate":
        raw = raw[:-3]
    elif damage == "misplaced":
        raw = bytearray(open(st.path(hashes[3]), "rb").read())  # a valid record of another page
    if damage == "deleted":
        import os

        os.unlink(path)
    else:
        with open(path, "wb") as f:
            f.write(raw)
    b = _cache(cfg, st, ss)
    free0 = b.host_kv.allocator.available()
    op, _ = _start(b)
    assert len(op.kv_parts) == 4
    b.executor.complete(op.id)
    assert b.executor.status(op.id)["page:1"] is PartStatus.FAILED
    assert hashes[1] not in st
    assert b.prefetch_progress("req") is True
    b.poll()
    assert b.host_kv.allocator.available() == free0 - PS
    _accounted(b)
    _ok(b)
    _load_and_check(b, TOKENS, PS)
    _ok(b)


def test_file_storage_round_trip_through_a_reopened_directory(tmp_path):
    cfg = _cfg(components=MAMBA, prefetch_policy="wait_complete")
    page_shape = (cfg.num_layers, 2, cfg.page_size, cfg.num_heads, cfg.head_dim)
    st = FileStorage(tmp_path / "kv", page_shape, cfg.dtype, fsync=False)
    ss = FileStorage(tmp_path / "state", (cfg.mamba_state_dim,), cfg.dtype, fsync=False)
    _seed(cfg, st, ss)
    st2 = FileStorage(tmp_path / "kv", page_shape, cfg.dtype, fsync=False)
    ss2 = FileStorage(tmp_path / "state", (cfg.mamba_state_dim,), cfg.dtype, fsync=False)
    assert len(st2) == 4 and len(ss2) == 1
    b = _cache(cfg, st2, ss2)
    op, _ = _start(b)
    b.executor.complete(op.id)
    assert b.prefetch_progress("req") is True
    assert b.match_prefix(TOKENS).best_match_node.mamba_host is not None
    _accounted(b)
    _load_and_check(b, TOKENS, 16)
    _ok(b)


def test_torn_state_record_is_a_failed_pool_part():
    cfg = _cfg(components=MAMBA, prefetch_policy="timeout", prefetch_timeout_steps=1)
    st, ss = _storages(cfg)
    _seed(cfg, st, ss)
    b = _cache(cfg, st, ss)
    op, _ = _start(b)
    ss.faults.inject("torn", "get", None, 1)
    for p in op.kv_parts:
        b.executor.complete(op.id, p)
    assert b.prefetch_progress("req") is False  # past the deadline but the pool part is pending
    b.executor.complete(op.id, op.parts[-1])
    assert b.executor.status(op.id)[op.parts[-1]] is PartStatus.FAILED
    assert b.prefetch_progress("req") is True
    b.poll()
    node = b.match_prefix(TOKENS).last_host_node
    assert _done_len(node) == 16 and node.mamba_host is None
    _accounted(b)
    _ok(b)


# ============================================================================ TP agreement
def test_tp_hit_length_is_the_minimum_over_ranks():
    cfg = _cfg(prefetch_policy="wait_complete")
    st, ss = _storages(cfg)
    _seed(cfg, st, ss)
    b = _cache(cfg, st, ss, ranks=FakeRanks(other_hit=8))
    op, _ = _start(b)
    assert len(op.kv_parts) == 2
    b.executor.complete(op.id)
    assert b.prefetch_progress("req") is True
    _accounted(b)
    _load_and_check(b, TOKENS, 8)
    _ok(b)


def test_tp_another_rank_not_ready_holds_this_one():
    cfg = _cfg(prefetch_policy="best_effort")
    st, ss = _storages(cfg)
    _seed(cfg, st, ss)
    ranks = FakeRanks(other_not_ready=1)
    b = _cache(cfg, st, ss, ranks=ranks)
    op, _ = _start(b)
    b.executor.complete(op.id)
    assert b.prefetch_progress("req") is False
    ranks.other_not_ready = 0
    assert b.prefetch_progress("req") is True
    _accounted(b)
    _load_and_check(b, TOKENS, 16)
    _ok(b)


def test_tp_pulled_along_with_pool_in_flight_drains_and_inserts_nothing():
    cfg = _cfg(components=MAMBA, prefetch_policy="wait_complete")
    st, ss = _storages(cfg)
    _seed(cfg, st, ss)
    b = _cache(cfg, st, ss, ranks=FakeRanks(other_terminated=1))
    op, _ = _start(b)
    for p in op.kv_parts:
        b.executor.complete(op.id, p)
    assert b.prefetch_progress("req") is True  # another rank terminated: everyone stops waiting
    assert op.state is OpState.DRAINING and b.nodes() == []
    _ok(b)
    b.executor.complete(op.id, op.parts[-1])
    b.poll()
    assert not b.ops
    assert b.host_kv.allocator.available() == cfg.host_tokens
    assert b.host_state.allocator.available() == cfg.host_mamba_slots
    _ok(b)


# ============================================================================== API edges
def test_duplicate_request_id_raises_and_changes_nothing():
    cfg = _cfg(prefetch_policy="wait_complete")
    st, ss = _storages(cfg)
    _seed(cfg, st, ss)
    b = _cache(cfg, st, ss)
    op, _ = _start(b)
    free = b.host_kv.allocator.available()
    with pytest.raises(ValueError):
        b.prefetch("req", b.root, TOKENS)
    assert b.host_kv.allocator.available() == free and list(b.ops) == [op.id]
    b.executor.complete(op.id)
    assert b.prefetch_progress("req") is True
    _load_and_check(b, TOKENS, 16)
    _ok(b)


def test_prefetch_without_storage_returns_none():
    cfg = _cfg()
    b = HiCache(cfg, executor=DeterministicExecutor(copy_device=cfg.device))
    assert b.prefetch("req", b.root, TOKENS) is None
    assert not b.ops and b.host_kv.allocator.available() == cfg.host_tokens
    _insert(b, TOKENS[:8])
    node = b.match_prefix(TOKENS).last_host_node
    assert b.write_backup_storage(node) is None
    assert b.prefetch("req", node, TOKENS[8:]) is None and node.host_ref == 0
    _ok(b)


@pytest.mark.parametrize("tokens", [[], [1, 2, 3], list(range(700, 716))])
def test_nothing_to_fetch_returns_none(tokens):
    """Empty, sub-page, or not in storage: None, nothing held."""
    cfg = _cfg()
    st, ss = _storages(cfg)
    _seed(cfg, st, ss)
    b = _cache(cfg, st, ss)
    assert b.prefetch("req", b.root, tokens) is None
    assert not b.ops and b.host_kv.allocator.available() == cfg.host_tokens
    with pytest.raises(UnknownOperationError):
        b.prefetch_progress("req")
    _ok(b)


def test_storage_partial_hit_fetches_the_leading_run():
    cfg = _cfg(prefetch_policy="wait_complete")
    st, ss = _storages(cfg)
    _seed(cfg, st, ss)
    st.delete(page_hashes(ROOT_HASH, TOKENS, PS)[2])
    b = _cache(cfg, st, ss)
    op, _ = _start(b)
    assert len(op.kv_parts) == 2
    b.executor.complete(op.id)
    assert b.prefetch_progress("req") is True
    _load_and_check(b, TOKENS, 8)
    _ok(b)


def test_chain_hash_depends_on_the_anchor():
    """The same page tokens under a different parent are a different page: not fetched."""
    cfg = _cfg()
    st, ss = _storages(cfg)
    _seed(cfg, st, ss)
    b = _cache(cfg, st, ss)
    other = list(range(300, 304))
    _insert(b, other)
    anchor = b.match_prefix(other + TOKENS[4:]).last_host_node
    assert b.prefetch("req", anchor, TOKENS[4:]) is None
    assert anchor.host_ref == 0
    _ok(b)


def test_store_while_prefetched_node_is_referenced():
    """Write a prefetched (host-only) node back to L3 and prefetch it into a third cache."""
    cfg = _cfg(prefetch_policy="wait_complete")
    st, ss = _storages(cfg)
    _seed(cfg, st, ss)
    b = _cache(cfg, st, ss)
    op, _ = _start(b)
    b.executor.complete(op.id)
    assert b.prefetch_progress("req") is True
    node = b.match_prefix(TOKENS).last_host_node
    st2, ss2 = _storages(cfg)
    b.storage, b.state_storage = st2, ss2
    _store(b, node)
    assert len(st2) == 4
    c = _cache(cfg, st2, ss2)
    op, _ = _start(c)
    c.executor.complete(op.id)
    assert c.prefetch_progress("req") is True
    _load_and_check(c, TOKENS, 16)
    _ok(b)
    _ok(c)


def test_host_ref_on_anchor_blocks_host_eviction_only_while_waiting():
    cfg = _cfg(prefetch_policy="best_effort", device_tokens=32)
    st, ss = _storages(cfg)
    _seed(cfg, st, ss)
    b = _cache(cfg, st, ss)
    _insert(b, TOKENS[:4])
    b.evict(10**6)
    op, anchor = _start(b)
    assert anchor.host_ref == 1
    assert b.prefetch_progress("req") is True  # nothing arrived; the anchor is released
    assert anchor.host_ref == 0
    assert b.evict_host(10**6) == 4  # the anchor goes; the op's slots stay until its reads settle
    assert b.host_kv.allocator.available() == cfg.host_tokens - 12
    _ok(b)
    b.executor.complete(op.id)
    b.poll()
    assert b.host_kv.allocator.available() == cfg.host_tokens and not b.ops
    _ok(b)


def test_page_data_is_poisoned_until_its_part_completes():
    """Slots of a pending page hold poison, not stale bytes, so a premature read is caught."""
    cfg = _cfg(prefetch_policy="wait_complete")
    st, ss = _storages(cfg)
    _seed(cfg, st, ss)
    b = _cache(cfg, st, ss)
    op, _ = _start(b)
    slots = op.prefetch.host[:PS]
    assert torch.isnan(b.host_kv.read_pages(slots).float()).all()
    b.executor.complete(op.id, "page:0")
    assert not torch.isnan(b.host_kv.read_pages(slots).float()).any()
    b.abort_prefetch("req")
    b.executor.complete(op.id)
    b.poll()
    _ok(b)


@pytest.mark.parametrize("fetch", [4, 8, 16])
def test_prefetch_fills_a_data_less_interior_node(fetch):
    """A node that lost its device KV without an L2 copy stays as a data-less interior node (it has
    host-only children). Prefetching its pages must give it L2 data, not discard them as if the tree
    held them (the _insert_host of commit f070cdc freed them: host_hit_length stayed 0 for ever)."""
    cfg = _cfg(prefetch_policy="wait_complete", write_policy="write_through_selective", backup_after_hits=100)
    st, ss = _storages(cfg)
    _seed(cfg, st, ss)
    b = _cache(cfg, st, ss)
    _insert(b, TOKENS[:8])  # device only: selective write-through never backs it up
    op, _ = _start(b)
    b.executor.complete(op.id)
    assert b.prefetch_progress("req") is True  # the tail joins as a host-only child
    b.evict(10**6)  # the head has no L2 copy and a child: it becomes data-less
    assert b.match_prefix(TOKENS).last_host_node is b.root
    _ok(b)
    op, anchor = _start(b, TOKENS[:fetch], rid="again")
    assert anchor is b.root and op is not None and len(op.kv_parts) == fetch // PS
    b.executor.complete(op.id)
    assert b.prefetch_progress("again") is True
    b.poll()
    _accounted(b)
    _ok(b)
    _load_and_check(b, TOKENS, 16 if fetch >= 8 else fetch)  # with the head filled, the old tail is reachable
    _ok(b)


def test_swa_round_trip():
    cfg = _cfg(components=("full", "swa"), swa_window=8, prefetch_policy="wait_complete", extra={"device_swa_tokens": 32})
    st, ss = _storages(cfg)
    _seed(cfg, st, ss)
    b = _cache(cfg, st, ss)
    op, _ = _start(b)
    assert len(op.parts) == 4  # no pool transfer for swa
    b.executor.complete(op.id)
    assert b.prefetch_progress("req") is True
    m = b.match_prefix(TOKENS)
    assert m.best_match_node.swa_host and m.host_hit_length == 16
    _accounted(b)
    _load_and_check(b, TOKENS, 16)
    _ok(b)

"""Geometries the machines' own cache never has: page sizes 1 and 3, prefetch thresholds 0 and 1,
and requests longer than 256 tokens and pages.

The machines run one small cache (page size 2, a few pages) so that Hypothesis reaches deep
states fast. Arithmetic that only goes wrong elsewhere hides there: an offset OR-ed instead of
added (equal when the page size is a power of two), lengths compared by identity (Python shares
the int objects up to 256), a window counted one token off (visible only with one-token pages),
a threshold floor of one page. `round_trip` drives a scratch cache of another geometry through
every tier and back (insert, split, branch, backup, store to L3, eviction of both tiers, a
peer's asynchronous L3 write and read, prefetch, load-back) and predicts each result from the
request alone: lengths from the page count, bytes from `models.contents`, L3's size from its
capacity. It returns what disagreed; the caller raises.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from models.contents import pages_kv
from refcache import CacheConfig, HiCache, InvalidIndicesError, PoolExhaustedError
from refcache.pages import ROOT_HASH, page_hashes
from refcache.storage import MemoryStorage
from refcache.transfer import DeterministicExecutor, OpState

from .data_oracle import geometry, served_ok, write_request, write_state

# (page size, prefetch threshold, pages): the long requests pass 256 tokens, and with one-token
# pages 256 pages, L3 records and slots too
GEOMETRIES = [(ps, threshold, pages) for ps, long in ((1, 260), (3, 90)) for threshold in (0, 1) for pages in (1, 5, long)]
_DONE: dict[tuple, list[str]] = {}  # (configuration, geometry) -> what disagreed, per process


def round_trip_once(base: CacheConfig, ps: int, threshold: int, pages: int) -> list[str]:
    """`round_trip` with a fixed request, run once per process for each configuration and geometry:
    the scratch cache is deterministic, so a second run would repeat the first (and cost the
    machines a tenth of a second of search)."""
    key = (repr(base), ps, threshold, pages)
    if key not in _DONE:
        _DONE[key] = round_trip(base, ps, threshold, pages, seed=1)
    return _DONE[key]


def forget() -> None:
    """Drop the memoized round trips (the cache's code changed: a seeded bug came or went)."""
    _DONE.clear()


def _settle(cache: HiCache) -> None:
    """Poll until no transfer is in flight (the scratch executor lands work at each poll)."""
    for _ in range(8):
        if not cache.ops:
            return
        cache.poll()


def _insert_request(cache: HiCache, tokens: list[int]) -> None:
    """Insert `tokens` as a request does: its KV (and, with mamba, its state) written first."""
    idx = write_request(cache, tokens)
    cache.insert(tokens, idx, write_state(cache, tokens) if cache.config.has("mamba") else None)


def _evict_both_tiers(cache: HiCache) -> None:
    """Evict all of L1 and L2, settling the backups and demotions eviction starts (write-back)."""
    for _ in range(4):
        cache.evict(cache.config.device_tokens)
        _settle(cache)
        cache.evict_host(cache.config.host_tokens)
        _settle(cache)


def _until_done(cache: HiCache, request_id: str) -> bool:
    """Land the prefetch's transfers and ask for progress until the request may stop waiting."""
    for _ in range(4):
        _settle(cache)
        if cache.prefetch_progress(request_id):
            return True
    return False


def _request(seed: int, pages: int, ps: int) -> list[int]:
    """A request of `pages` whole pages plus a partial page when pages are wider than a token.
    Distinct tokens early on keep its prefix apart from the branch's."""
    return [(seed * 7 + i // ps * 3 + i) % 11 + 1 for i in range(pages * ps + (ps > 1))]


def round_trip(base: CacheConfig, ps: int, threshold: int, pages: int, seed: int) -> list[str]:
    """Drive a scratch cache of page size `ps` (the machine's components and policies) through
    every tier with a request of `pages` pages; what disagreed with the prediction."""
    errs: list[str] = []

    def expect(ok: bool, msg: str) -> None:
        if not ok:
            errs.append(f"page size {ps}, threshold {threshold}, {pages} pages: {msg}")

    room = 2 * pages + 8  # pages of L1 (the request, its branch, slack) and of L2
    cfg = replace(base, page_size=ps, device_tokens=room * ps, host_tokens=2 * room * ps, prefetch_threshold=threshold,
                  swa_window=2 * ps, prefetch_timeout_steps=2, device="cpu", device_mamba_slots=4,
                  host_mamba_slots=8, extra={**base.extra, "device_swa_tokens": room * ps} if base.has("swa") else base.extra)
    page_shape = (cfg.num_layers, 2, ps, cfg.num_heads, cfg.head_dim)
    l3_room = pages + 1  # the request fits; the request and the branch a peer wrote do not
    storage = MemoryStorage(l3_room, page_shape, cfg.dtype)
    state_storage = MemoryStorage(8, (cfg.mamba_state_dim,), cfg.dtype) if cfg.has("mamba") else None
    cache = HiCache(cfg, executor=DeterministicExecutor(auto_complete=True), storage=storage,
                    state_storage=state_storage)
    tokens = _request(seed, pages, ps)
    whole = len(tokens) // ps * ps  # the partial last page is never cached

    # insert, then match the whole request: every page on L1, with the bytes of this prefix
    idx = write_request(cache, tokens[:whole])
    cache.insert(tokens[:whole], idx, write_state(cache, tokens[:whole]) if cfg.has("mamba") else None)
    m = cache.match_prefix(tokens)
    expect(m.device_len == whole and served_ok(cache, tokens, m.device_indices),
           f"a match after insert serves {m.device_len} of {whole} tokens, or the wrong bytes")

    # the same request again: the tree already holds every page, so it takes none of the new slots
    again = write_request(cache, tokens[:whole])
    slot = write_state(cache, tokens[:whole]) if cfg.has("mamba") else None
    got = cache.insert(tokens[:whole], again, slot)
    expect(got.cached_len == whole and not got.mamba_slot_used,
           f"re-inserting the request reports {got.cached_len} of {whole} tokens cached (state taken: "
           f"{got.mamba_slot_used})")
    cache.free_device(again[: got.cached_len])
    if slot is not None and not got.mamba_slot_used:
        cache.free_mamba(slot)

    # a branch off near the end: the match splits the node there, the insert takes only the new pages
    cut = (pages - 2 if pages > 4 else (pages + 1) // 2) * ps
    branch = tokens[:cut] + [t + 11 for t in tokens[cut:whole]]
    m = cache.match_prefix(branch)
    shared = 0 if cfg.has("mamba") and cut < whole else cut  # a mamba match ends where a state is: none at the cut
    expect(m.device_len == shared,
           f"a match of a branch off page {cut // ps} serves {m.device_len} tokens, not {shared}")
    bidx = write_request(cache, branch)
    got = cache.insert(branch, bidx, write_state(cache, branch) if cfg.has("mamba") else None)
    expect(got.cached_len == cut, f"inserting the branch reports {got.cached_len} cached tokens, not {cut}")
    cache.free_device(bidx[: got.cached_len])  # the duplicate slots stay the caller's to free
    m = cache.match_prefix(branch)
    expect(m.device_len == whole and served_ok(cache, branch, m.device_indices),
           f"a match of the inserted branch serves {m.device_len} of {whole} tokens, or the wrong bytes")

    # a peer's asynchronous L3 write of the branch, read back whole; L3 is then refilled by the cache
    hashes = page_hashes(ROOT_HASH, branch[:whole], ps)
    put = storage.start_put(hashes, list(pages_kv(tuple(branch[:whole]), geometry(cache))))
    expect(put.poll() and put.result() == [True] * pages, f"a peer's write of {pages} pages stored {put.result()}")
    get = storage.start_get(hashes)
    expect(get.poll() and get.hit_length() == pages, f"a peer's read of {pages} stored pages hit {get.hit_length()}")

    # back the request up to L2, then to L3, every node of its path
    for n in _path(cache, tokens):
        cache.write_backup(n)
        _settle(cache)
        cache.write_backup_storage(n)
        _settle(cache)
    written = 2 * pages - cut // ps  # the branch and the request share their first pages
    expect(len(storage) == min(written, l3_room),
           f"L3 of room {l3_room} holds {len(storage)} pages after {written} distinct ones were written")

    # evict both tiers: nothing of the request stays in the tree
    _evict_both_tiers(cache)
    m = cache.match_prefix(tokens)
    expect(m.device_len == 0 and m.last_host_node is cache.root,
           f"after evicting both tiers a match still finds {m.device_len} tokens on L1 or an L2 node")

    # nothing of an unseen request is in L3: a prefetch of it fetches nothing, whatever the threshold
    expect(cache.prefetch("unseen", cache.root, [t + 40 for t in tokens]) is None,
           "a prefetch of a request L3 never held started")
    # prefetch the request from L3 (a threshold of 0 or 1 token never stops a whole page)
    op = cache.prefetch("req", cache.root, tokens)
    fetched = 0 if op is None else len(op.prefetch.key)
    expect(fetched == whole, f"a prefetch of a request L3 holds whole fetches {fetched} of {whole} tokens")
    if op is not None:
        expect(_until_done(cache, "req"), "a prefetch whose pages all landed never lets its request stop waiting")
    m = cache.match_prefix(tokens)
    end = m.best_match_node
    expect(_length(end) == whole, f"after the prefetch a match reaches {_length(end)} of {whole} tokens")
    if end is not cache.root:
        cache.load_back(end)
        _settle(cache)
    m = cache.match_prefix(tokens)
    expect(m.device_len == whole and served_ok(cache, tokens, m.device_indices),
           f"after load-back a match serves {m.device_len} of {whole} tokens, or the wrong bytes")

    # again from L3, but the request is recomputed while its prefetch is in flight: the run that
    # arrives is already in the tree when the prefetch ends, and joins nothing twice
    _evict_both_tiers(cache)
    op = cache.prefetch("again", cache.root, tokens)
    idx = write_request(cache, tokens[:whole])
    cache.insert(tokens[:whole], idx, write_state(cache, tokens[:whole]) if cfg.has("mamba") else None)
    if op is not None:
        _until_done(cache, "again")
    m = cache.match_prefix(tokens)
    expect(m.device_len == whole and served_ok(cache, tokens, m.device_indices),
           f"after a recompute raced a prefetch a match serves {m.device_len} of {whole} tokens, or the wrong bytes")
    expect(not cache.check_invariants(check_data=False), f"invariants: {cache.check_invariants()[:2]}")
    _refusals(cache, expect)
    _crowded_prefetches(cfg, tokens[:whole], expect)
    _one_page_short(cfg, tokens[:whole], expect)
    _storage_without_room(cfg, tokens[:whole], expect)
    _load_back_by_eviction(cfg, tokens[:whole], expect)
    return errs


def _load_back_by_eviction(cfg: CacheConfig, tokens: list[int], expect) -> None:
    """A load-back that fits only by eviction: the request is on L2 only, and another request,
    unlocked and backed up, fills L1 (KV); or, with mamba, L1 has room for the KV but the state
    pool is full, one state evictable (the caller holds the rest). The load-back must evict and
    bring the whole request back."""
    ps = cfg.page_size
    for short in ("kv", "state") if cfg.has("mamba") else ("kv",):
        cache = HiCache(replace(cfg, write_policy="write_through"), executor=DeterministicExecutor(auto_complete=True))
        _insert_request(cache, tokens)
        _settle(cache)
        cache.evict(cfg.device_tokens)
        _settle(cache)
        room = cache.device_kv.allocator.available() // ps * ps if short == "kv" else ps
        filler = [t + 90 for t in range(room)]
        _insert_request(cache, filler)
        _settle(cache)
        states = []
        while short == "state" and cache.device_state.allocator.available():
            states.append(cache.alloc_mamba(evict=False))
        node = cache.match_prefix(tokens).best_match_node
        try:
            cache.load_back(node)
            _settle(cache)
        except PoolExhaustedError as e:
            expect(False, f"a load-back of {len(tokens)} tokens that eviction can make room for ({short}) was "
                          f"refused: {e}")
        m = cache.match_prefix(tokens)
        expect(m.device_len == len(tokens) and served_ok(cache, tokens, m.device_indices),
               f"after a load-back that had to evict ({short}), a match serves {m.device_len} of {len(tokens)} "
               "tokens, or the wrong bytes")
        for slot in states:
            cache.free_mamba(slot)


def _storage_without_room(cfg: CacheConfig, tokens: list[int], expect) -> None:
    """An L3 of capacity 0 stores nothing: its put answers False (not an error), and a write of the
    request's L2 pages to it must fail, not report them stored. The same for the state's L3 when
    only that one has no room (mamba configurations)."""
    ps = cfg.page_size
    shape = (cfg.num_layers, 2, ps, cfg.num_heads, cfg.head_dim)
    rooms = [(0, 8)] + ([(None, 0)] if cfg.has("mamba") else [])
    for kv_room, state_room in rooms:
        cache = HiCache(replace(cfg, write_policy="write_through"), executor=DeterministicExecutor(auto_complete=True),
                        storage=MemoryStorage(kv_room, shape, cfg.dtype),
                        state_storage=MemoryStorage(state_room, (cfg.mamba_state_dim,), cfg.dtype)
                        if cfg.has("mamba") else None)
        _insert_request(cache, tokens)
        _settle(cache)
        end = _path(cache, tokens)[-1]
        op = cache.write_backup_storage(end)
        _settle(cache)
        which = "KV" if kv_room == 0 else "state"
        expect(op is not None and op.state is OpState.FAILED,
               f"a write to L3 whose {which} storage has no room ended {None if op is None else op.state.name}, "
               "not FAILED")


def _one_page_short(cfg: CacheConfig, tokens: list[int], expect) -> None:
    """L1 exactly one page short: the caller holds every free slot and the tree holds the request,
    backed up (write-through) and unlocked. One more page, and one more mamba state, must come by
    eviction, as the defaults allow: free plus evictable covers them. (At page size 1 the shortfall
    is one token, which a room test off by one lets through.)"""
    ps = cfg.page_size
    cache = HiCache(replace(cfg, write_policy="write_through"), executor=DeterministicExecutor(auto_complete=True))
    _insert_request(cache, tokens)
    _settle(cache)
    held = cache.alloc_device(cache.device_kv.allocator.available(), evict=False)
    states = []
    while cfg.has("mamba") and cache.device_state.allocator.available():
        states.append(cache.alloc_mamba(evict=False))
    try:
        one = cache.alloc_device(ps)
        expect(one.numel() == ps, f"an allocation of one page on a full L1 gave {one.numel()} slots")
        if cfg.has("mamba"):
            cache.alloc_mamba()
    except PoolExhaustedError as e:
        expect(False, f"L1 one page (or one state) short, with the request's pages evictable: {e}")
    cache.free_device(held)
    for slot in states:
        cache.free_mamba(slot)


def _crowded_prefetches(cfg: CacheConfig, tokens: list[int], expect) -> None:
    """A prefetch of a run L3 holds whole into a scratch L2 too small for it: with one free page
    and nothing evictable, it fetches that page; with one page free and one a host-only leaf holds,
    it evicts the leaf and fetches two. (Whole runs that fit are fetched whole.)"""
    ps = cfg.page_size
    for l2_pages, filler in ((1, False), (2, True)):
        cache = HiCache(replace(cfg, host_tokens=l2_pages * ps), executor=DeterministicExecutor(auto_complete=True),
                        storage=MemoryStorage(None, (cfg.num_layers, 2, ps, cfg.num_heads, cfg.head_dim), cfg.dtype))
        put = cache.storage.start_put(page_hashes(ROOT_HASH, tokens, ps), list(pages_kv(tuple(tokens), geometry(cache))))
        put.poll()
        if filler:  # one page on L2 only: backed up, then evicted from L1
            other = [t + 60 for t in tokens[:ps]]
            _insert_request(cache, other)
            cache.write_backup(cache.match_prefix(other).last_device_node)
            _settle(cache)
            cache.evict(cfg.device_tokens)
            _settle(cache)
        op = cache.prefetch("crowded", cache.root, tokens)
        want = min(len(tokens), l2_pages * ps)
        got = 0 if op is None else len(op.prefetch.key)
        expect(got == want, f"a prefetch of {len(tokens)} tokens L3 holds into an L2 of {l2_pages} pages "
                            f"({'one a host-only leaf holds' if filler else 'all free'}) fetches {got}, not {want}")


def _refusals(cache: HiCache, expect) -> None:
    """Caller mistakes at this page size: a freed page with two slots swapped, and a page past the
    pool, are refused naming that page (its slots, or its first slot), and nothing is freed."""
    ps, size = cache.page_size, cache.config.device_tokens
    own = cache.alloc_device(2 * ps, evict=False)
    bent = own.clone()
    if ps > 1:  # (a one-token page cannot be bent)
        bent[ps], bent[ps + 1] = own[ps + 1], own[ps]
    past = torch.cat([own[:ps], torch.arange(size + 2 * ps, size + 3 * ps, dtype=own.dtype)])
    cases = ([(bent, str(bent[ps:].tolist()))] if ps > 1 else []) + [(past, f"slot {size + 2 * ps} ")]
    for slots, says in cases:
        try:
            cache.free_device(slots)
            expect(False, f"free_device({slots.tolist()}) was not refused")
        except InvalidIndicesError as e:
            expect(says in str(e), f"free_device({slots.tolist()}) was refused with {e!r}, which does not name {says}")
    cache.free_device(own)  # still the caller's: raises if a refusal freed any of it


def _path(cache: HiCache, tokens: list[int]) -> list:
    """The nodes from the root's child to the end of the cached prefix of `tokens`."""
    node, out = cache.match_prefix(tokens).last_device_node, []
    while node is not cache.root:
        out.append(node)
        node = node.parent
    return out[::-1]


def _length(node) -> int:
    """Tokens from the root to `node`, from the keys along its path."""
    n = 0
    while node.parent is not None:
        n += len(node.key)
        node = node.parent
    return n

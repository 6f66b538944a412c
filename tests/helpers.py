"""Helpers the unit tests share: insert a request as a serving engine would, find nodes, settle."""

from __future__ import annotations

from refcache.data import write_request

PS = 4
A, B, C, D = [1] * PS, [2] * PS, [3] * PS, [4] * PS
NO_AUTO_BACKUP = {"write_policy": "write_through_selective", "backup_after_hits": 1000}


def insert_request(cache, tokens, keep_duplicates: bool = False):
    """Write KV for `tokens` as a forward pass would and insert it; returns (InsertResult, indices, slot).

    Unless `keep_duplicates`, the caller's share (indices[:cached_len]) is freed; an unused state
    slot always is."""
    idx, slot = write_request(cache, tokens)
    res = cache.insert(tokens, idx, slot)
    if slot is not None and not res.mamba_slot_used:
        cache.free_mamba(slot)
    if not keep_duplicates and res.cached_len:
        cache.free_device(idx[: res.cached_len])
    return res, idx, slot


def node_at(cache, tokens):
    """The attached node whose path from the root spells exactly `tokens`."""
    for n in cache.nodes():
        path = []
        for m in n.path_to_root():
            path = list(m.key) + path
        if path == list(tokens):
            return n
    raise AssertionError(f"no node for {tokens}")


def attached(cache, node) -> bool:
    return any(n is node for n in cache.nodes())


def settle(cache):
    """Complete every pending part and acknowledge; returns the finished operations."""
    cache.executor.complete_all()
    return cache.poll()


def mamba_cache(make_cache, **kw):
    return make_cache(components=("full", "mamba"), **{**NO_AUTO_BACKUP, **kw})

"""refcache as a conformance target: device-only usage (as SGLang's non-hierarchical caches are
used) and full HiCache usage (write-through backups completing at once, acknowledged by a poll
after every operation)."""

from __future__ import annotations

from typing import Any

from models.abstract import Model, Prefix, abstract, node_prefix
from refcache import CacheConfig, DeterministicExecutor, HiCache, PoolExhaustedError
from refcache.data import pages_ok, write_request

from ...target import CORE_OPS, Inserted, Match, Target, TargetError, TargetInfo


class RefcacheTarget(Target):
    def __init__(self, info: TargetInfo, **config):
        self.info = info
        cfg = CacheConfig(page_size=info.page_size, device_tokens=info.device_tokens, **config)
        self.hier = info.host
        self.cache = HiCache(cfg, executor=DeterministicExecutor(auto_complete=self.hier))

    def _settle(self) -> None:
        if self.hier:
            self.cache.poll()

    def alloc(self, tokens: list[int]) -> Any:
        try:
            kv = write_request(self.cache, tokens)
        except PoolExhaustedError as e:
            self._settle()
            raise TargetError(str(e)) from e
        self._settle()
        return kv

    def insert(self, tokens: list[int], kv: Any) -> Inserted:
        idx, slot = kv
        res = self.cache.insert(tokens, idx, slot)
        if res.cached_len:
            self.cache.free_device(idx[: res.cached_len])
        if slot is not None and not res.mamba_slot_used:
            self.cache.free_mamba(slot)
        self._settle()
        return Inserted(res.cached_len, res.mamba_slot_used if slot is not None else None)

    def match(self, tokens: list[int]) -> Match:
        m = self.cache.match_prefix(tokens)
        self._settle()
        self._last_tokens = tokens
        return Match(device_len=m.device_len, best_len=len(node_prefix(m.best_match_node)), node=m.last_device_node,
                     device_indices=m.device_indices.tolist(),
                     last_host_len=len(node_prefix(m.last_host_node)) if self.hier else None,
                     host_hit=m.host_hit_length)

    def load_back(self, tokens: list[int]) -> int | None:
        """Match, then load `best_match_node` back; None when refcache declined (no room)."""
        m = self.cache.match_prefix(tokens)
        try:
            self.cache.load_back(m.best_match_node)
        except PoolExhaustedError:
            self._settle()
            return None
        self._settle()
        return self.cache.match_prefix(tokens).device_len

    def alive(self, node: Any) -> bool:
        return self.cache._nodes.get(node.id) is node

    def node_prefix(self, node: Any) -> Prefix:
        return node_prefix(node)

    def lock(self, node: Any) -> Any:
        return self.cache.lock(node)

    def locked_prefix(self, lock: Any) -> Prefix:
        return node_prefix(lock)

    def unlock(self, lock: Any) -> None:
        self.cache.unlock(lock)

    def evict(self, n_tokens: int) -> int:
        freed = self.cache.evict(n_tokens)
        self._settle()
        return freed

    def evict_mamba(self, n: int) -> int:
        freed = self.cache.evict_mamba(n)
        self._settle()
        return freed

    def abstract(self) -> Model:
        return abstract(self.cache.snapshot())

    def check(self) -> list[str]:
        v = [str(x) for x in self.cache.check_invariants(check_data=True)]
        return v

    def data_ok(self, tokens, m: Match) -> bool:
        import torch

        return pages_ok(self.cache, tokens, torch.tensor(m.device_indices, dtype=torch.int64))


DEVICE_ONLY = {"write_policy": "write_through_selective", "backup_after_hits": 10**9}


def refcache_full() -> RefcacheTarget:
    return RefcacheTarget(TargetInfo("refcache", page_size=2, device_tokens=16), **DEVICE_ONLY)


def refcache_mamba() -> RefcacheTarget:
    info = TargetInfo("refcache-mamba", page_size=1, sidecar="mamba", ops=CORE_OPS | {"evict_mamba"},
                      device_tokens=16, mamba_slots=6)
    return RefcacheTarget(info, components=("full", "mamba"), device_mamba_slots=6, **DEVICE_ONLY)


def refcache_hicache() -> RefcacheTarget:
    info = TargetInfo("refcache-hicache", page_size=2, device_tokens=16, host=True, ops=CORE_OPS | {"load_back"},
                      notes="write-through, every backup completes at once and is acknowledged after each operation")
    return RefcacheTarget(info, host_tokens=24, write_policy="write_through")


def refcache_himamba() -> RefcacheTarget:
    """The refcache counterpart of sglang-himamba: full+mamba, write-through, page 1."""
    info = TargetInfo("refcache-himamba", page_size=1, sidecar="mamba", device_tokens=16, mamba_slots=6, host=True,
                      ops=CORE_OPS | {"evict_mamba", "load_back"},
                      notes="write-through, every backup completes at once and is acknowledged after each operation")
    return RefcacheTarget(info, components=("full", "mamba"), device_mamba_slots=6, host_mamba_slots=12,
                          host_tokens=32, write_policy="write_through")

"""Adapters for SGLang 0.5.23 without a host tier.

- `sglang-radix`: `RadixCache.create_simulated`, page size 2, a `SlotBook` allocator.
- `sglang-unified-python` / `sglang-unified-rust`: `UnifiedRadixCache` with the FULL component only,
  its tree core in Python or the bundled compiled Rust core. Neither exposes nodes in production
  builds, so the abstraction reads the tree through `walk_for_kv_canary` (every device slot with
  its position and predecessor slot) and the `SlotBook` records of what each slot holds; lock counts
  are read as locked / unlocked only, and recency is not readable (eviction order is not judged).

Every adapter runs the cache's own `sanity_check` where it has one, and checks slot accounting (R1),
data (D1) and the evictable/protected sizes (R2).
"""

from __future__ import annotations

from array import array

from models.abstract import Model, Page, Prefix

from ...target import Inserted, Match, SlotBook, Target, TargetError, TargetInfo
from . import shim
from .common import HICACHE_REAL, KNOWN, V_NEW, RadixNodes, _pages


# ================================================================ RadixCache (0.5.23)
class SGLangRadix(RadixNodes, Target):
    def __init__(self):
        shim.load(V_NEW, real=HICACHE_REAL)
        from sglang.srt.mem_cache import base_prefix_cache as b
        from sglang.srt.mem_cache import radix_cache as r

        self.b, self.r = b, r
        self.info = TargetInfo("sglang-radix", page_size=2, device_tokens=16, sglang=V_NEW, allow=KNOWN)
        self.book = SlotBook(self.info.device_tokens, self.info.page_size)
        self.cache = r.RadixCache.create_simulated(mock_allocator=self.book, page_size=self.info.page_size)

    def _key(self, tokens):
        return self.r.RadixKey(array("q", tokens))

    def alloc(self, tokens):
        n = len(tokens)
        short = n - self.book.available_size()
        if short > 0:
            ev = self._evictable()
            if short > ev:
                raise TargetError(f"{n} tokens needed, {self.book.available_size()} free, {ev} evictable")
            self.cache.evict(self.b.EvictParams(num_tokens=short))
        idx = self.book.alloc(n)
        if idx is None:
            raise TargetError(f"only {self.book.available_size()} tokens free after eviction")
        self.book.write(idx, tokens)
        return idx

    def _evictable(self) -> int:
        return self.cache.evictable_size()

    def insert(self, tokens, kv):
        res = self.cache.insert(self.b.InsertParams(key=self._key(tokens), value=kv))
        self.book.take(kv[res.prefix_len:].tolist())
        self.book.free_segment(kv[: res.prefix_len])  # the duplicates stay the caller's to free
        return Inserted(res.prefix_len)

    def match(self, tokens):
        m = self.cache.match_prefix(self.b.MatchPrefixParams(key=self._key(tokens)))
        idx = self.cache.path_device_indices(m.last_device_node).tolist()
        if len(idx) != m.device_prefix_len:
            raise AssertionError(f"device_prefix_len {m.device_prefix_len} but the path holds {len(idx)} slots")
        return Match(device_len=m.device_prefix_len, best_len=self._plen(m.best_match_node), node=m.last_device_node,
                     device_indices=idx)

    def _plen(self, node) -> int:
        return len(self.node_prefix(node))

    def evict(self, n):
        return self.cache.evict(self.b.EvictParams(num_tokens=n)).num_tokens_evicted

    def abstract(self) -> Model:
        m = Model(page_size=self.info.page_size, sidecar=None, window=0)
        for n, pre in self._nodes():
            for p in _pages(self.info.page_size, pre, len(n.key)):
                m.pages[p] = Page(dev=n.value is not None, host=False, lock=n.lock_ref, stamp=n.last_access_time)
        return m

    def check(self) -> list[str]:
        v, slots, ev, pr = [], [], 0, 0
        for n, pre in self._nodes():
            val = n.value.tolist()
            slots += val
            if not all(self.book.content.get(s) == pre[: len(pre) - len(val) + i + 1] for i, s in enumerate(val)):
                v.append(f"D1: node {pre} holds slots whose contents are not its prefix")
            if n.lock_ref == 0:
                ev += len(n.key)
            else:
                pr += len(n.key)
            leaf = n.lock_ref == 0 and not any(not c.evicted for c in n.children.values())
            if leaf != (n in self.cache.evictable_leaves):
                v.append(f"R3: node {pre} evictable leaf={leaf} but evictable_leaves says {not leaf}")
        if (ev, pr) != (self.cache.evictable_size(), self.cache.protected_size()):
            v.append(f"R2: evictable/protected sizes {(self.cache.evictable_size(), self.cache.protected_size())}, "
                     f"the tree sums to {(ev, pr)}")
        return v + self.book.account(slots)


# ======================================================= UnifiedRadixCache (0.5.23)
class SGLangUnified(Target):
    def __init__(self, core: str):
        shim.load(V_NEW, real=HICACHE_REAL)
        from sglang.srt.mem_cache import base_prefix_cache as b
        from sglang.srt.mem_cache import cache_init_params as cip
        from sglang.srt.mem_cache import radix_cache as r
        from sglang.srt.mem_cache import unified_radix_cache as u
        from sglang.srt.mem_cache.unified_cache.component_type import ComponentType

        self.b, self.r, self.FULL = b, r, ComponentType.FULL
        self.info = TargetInfo(f"sglang-unified-{core}", page_size=2, device_tokens=16, sglang=V_NEW,
                               exact_locks=False, stamps=False, allow=KNOWN,
                               notes="nodes not readable: abstraction via walk_for_kv_canary; eviction order not judged")
        self.book = SlotBook(self.info.device_tokens, self.info.page_size)
        params = cip.CacheInitParams(disable=False, req_to_token_pool=None, token_to_kv_pool_allocator=self.book,
                                     page_size=self.info.page_size, tree_components=(ComponentType.FULL,),
                                     tree_core_backend=core)
        self.cache = u.UnifiedRadixCache(params)
        if self.cache._tree_core_backend != core:
            raise shim.ShimError(f"UnifiedRadixCache fell back to the {self.cache._tree_core_backend} tree core "
                                 f"instead of {core}")
        self.prefix_of: dict[int, Prefix] = {}

    def _key(self, tokens):
        return self.r.RadixKey(array("q", tokens))

    def _evictable(self) -> int:
        return self.cache.tree_core.full_evictable_size()

    alloc = SGLangRadix.alloc

    def insert(self, tokens, kv):
        # prev_prefix_len=0: unlike RadixCache, the unified tree frees the duplicates itself.
        res = self.cache.insert(self.b.InsertParams(key=self._key(tokens), value=kv))
        self.book.take(kv[res.prefix_len:].tolist())
        return Inserted(res.prefix_len)

    def match(self, tokens):
        m = self.cache.match_prefix(self.b.MatchPrefixParams(key=self._key(tokens)))
        node = m.last_device_node
        self.prefix_of[node] = tuple(tokens[: m.device_prefix_len])
        best = m.best_match_node
        root = self.cache.tree_core.root_node_handle()
        idx = self.cache.tree_core.collect_full_device_indices(node, root).tolist()
        best_len = m.device_prefix_len if best == node else self._path_len(best)
        return Match(device_len=m.device_prefix_len, best_len=best_len, node=node, device_indices=idx)

    def _path_len(self, node) -> int:
        path = self.cache.tree_core.collect_path_info([node])[0]
        return path[-1].path_end if path else 0

    def alive(self, node) -> bool:
        try:
            self.cache.tree_core.collect_path_info([node])
            return True
        except KeyError:
            return False

    def node_prefix(self, node) -> Prefix:
        return self.prefix_of[node]

    def lock(self, node):
        return self.cache.lock(node)

    def locked_prefix(self, lock) -> Prefix:
        return self.prefix_of[lock.node]

    def unlock(self, lock):
        self.cache.unlock(lock)

    def evict(self, n):
        return self.cache.evict(self.b.EvictParams(num_tokens=n)).num_tokens_evicted

    def _walk(self, unlocked_only: bool):
        w = self.cache.tree_core.walk_for_kv_canary(unlocked_only, False)
        return list(zip(w.slot_indices.tolist(), w.positions.tolist(), w.prev_slot_indices.tolist(), strict=True))

    def abstract(self) -> Model:
        ps = self.info.page_size
        m = Model(page_size=ps, sidecar=None, window=0)
        unlocked = {s for s, _, _ in self._walk(True)}
        for s, pos, _ in self._walk(False):
            pre = self.book.content.get(s)
            if pre is None or len(pre) != pos + 1:
                raise AssertionError(f"D1: slot {s} at position {pos} holds {pre}")
            if (pos + 1) % ps == 0:
                m.pages[pre] = Page(dev=True, host=False, lock=0 if s in unlocked else 1)
        return m

    def check(self) -> list[str]:
        v = []
        walk = self._walk(False)
        for s, pos, prev in walk:
            pre = self.book.content.get(s)
            want = None if pos == 0 else (self.book.content.get(prev) if prev >= 0 else None)
            if pos > 0 and (pre is None or want != pre[:-1]):
                v.append(f"D1: slot {s} (position {pos}) follows slot {prev}, whose contents are not its prefix")
        try:
            self.cache.sanity_check()
        except Exception as e:  # the target's own checker
            v.append(f"sanity_check: {type(e).__name__}: {e}")
        return v + self.book.account([s for s, _, _ in walk])

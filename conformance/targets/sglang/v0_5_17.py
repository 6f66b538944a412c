"""Adapters for SGLang 0.5.17, kept as regression tests of the upstream bugs found there.

- `sglang-mamba`: `MambaRadixCache`, page size 1 (its v1 requires it), KV and mamba state slots
  from `SlotBook`s behind the allocator classes it checks for.
- `sglang-hiradix*`: `HiRadixCache`, SGLang's HiCache before 0.5.23 (device KV backed by a host
  tier), with its real cache controller and host pool; page size 2; write-through, selective, write-back.
- `sglang-himamba`: `HiMambaRadixCache`, the same for full KV + mamba state, page size 1.
  The HiCache ones run on a GPU with SGLang's own copy kernels, or on the CPU with stand-ins for
  pinning and the kernels (`kernels.py`).
"""

from __future__ import annotations

import types
from array import array

import torch

from models.abstract import Model, Page

from ...target import CORE_OPS, Inserted, Match, SlotBook, Target, TargetError, TargetInfo
from . import shim
from .common import HIMAMBA_REAL, KNOWN, KNOWN_HIMAMBA, KNOWN_MAMBA, V_MAMBA, RadixNodes, _pages, cpu_stand_ins


# =========================================================== MambaRadixCache (0.5.17)
class SGLangMamba(Target):
    def __init__(self):
        shim.load(V_MAMBA, real=HIMAMBA_REAL)
        from sglang.srt import runtime_context
        from sglang.srt.mem_cache import base_prefix_cache as b
        from sglang.srt.mem_cache import cache_init_params as cip
        from sglang.srt.mem_cache import mamba_radix_cache as mr
        from sglang.srt.mem_cache import radix_cache as r
        from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator

        self.b, self.r, self.mr = b, r, mr
        self.info = TargetInfo("sglang-mamba", page_size=1, sidecar="mamba", ops=CORE_OPS | {"evict_mamba"},
                               device_tokens=16, mamba_slots=6, sglang=V_MAMBA, allow=KNOWN_MAMBA)
        # The cache reads one server argument (the mamba chunk size) at construction.
        runtime_context._CONTEXT._server_args = types.SimpleNamespace(mamba_cache_chunk_size=64)
        kv_cls = type("BookAllocator", (SlotBook, TokenToKVPoolAllocator), {})  # passes its isinstance check
        self.book = kv_cls(self.info.device_tokens, 1)
        self.states = SlotBook(self.info.mamba_slots, 1, reserve_first_page=False)
        pool = types.SimpleNamespace(mamba_allocator=self.states)
        params = cip.CacheInitParams(disable=False, req_to_token_pool=pool, token_to_kv_pool_allocator=self.book,
                                     page_size=1)
        self.cache = mr.MambaRadixCache(params)
        self.locks = 0

    def _key(self, tokens):
        return self.r.RadixKey(array("q", tokens))

    def alloc(self, tokens):
        n = len(tokens)
        short = n - self.book.available_size()
        if short > 0:
            if short > self.cache.full_evictable_size():
                raise TargetError(f"{n} tokens needed, {self.book.available_size()} free")
            self.cache.evict(self.b.EvictParams(num_tokens=short))
        idx = self.book.alloc(n)
        if idx is None:
            raise TargetError("KV pool full after eviction")
        slot = self.states.alloc(1)
        if slot is None:
            self.cache.evict(self.b.EvictParams(num_tokens=0, mamba_num=1))
            slot = self.states.alloc(1)
        if slot is None:
            self.book.free(idx)
            raise TargetError("mamba state pool full after eviction")
        self.book.write(idx, tokens)
        self.states.write(slot, [("state",) + tuple(tokens)])
        return idx, slot

    def insert(self, tokens, kv):
        idx, slot = kv
        # prev_prefix_len=0: the tree frees the duplicates of the prefix it already holds itself.
        res = self.cache.insert(self.b.InsertParams(key=self._key(tokens), value=idx, mamba_value=slot))
        self.book.take(idx[res.prefix_len:].tolist())
        if res.mamba_exist:
            self.states.free(slot)
        else:
            self.states.take(slot.tolist())
        return Inserted(res.prefix_len, not res.mamba_exist)

    def match(self, tokens):
        m = self.cache.match_prefix(self.b.MatchPrefixParams(key=self._key(tokens)))
        n = m.device_indices.numel()
        return Match(device_len=n, best_len=len(self.node_prefix(m.best_match_node)), node=m.last_device_node,
                     device_indices=m.device_indices.tolist())

    alive = RadixNodes.alive
    node_prefix = RadixNodes.node_prefix
    locked_prefix = RadixNodes.locked_prefix
    _nodes = RadixNodes._nodes

    def evict(self, n):
        return self.cache.evict(self.b.EvictParams(num_tokens=n)).num_tokens_evicted

    def evict_mamba(self, n):
        return self.cache.evict(self.b.EvictParams(num_tokens=0, mamba_num=n)).mamba_num_evicted

    def abstract(self) -> Model:
        m = Model(page_size=1, sidecar="mamba", window=0)
        order = {}
        x = self.cache.full_lru_list.tail.prev if hasattr(self.cache.full_lru_list, "tail") else None
        rank = 0
        while x is not None and x is not self.cache.full_lru_list.head:  # least recent first
            order[id(x)] = rank
            rank += 1
            x = x.prev
        for n, pre in self._nodes():
            for p in _pages(1, pre, len(n.key)):
                m.pages[p] = Page(dev=n.value is not None, host=False, mamba=p == pre and n.mamba_value is not None,
                                  lock=n.full_lock_ref, stamp=order.get(id(n), -1))
        return m

    def check(self) -> list[str]:
        v, slots, states = [], [], []
        for n, pre in self._nodes():
            val = n.value.tolist()
            slots += val
            if not all(self.book.content.get(s) == pre[: len(pre) - len(val) + i + 1] for i, s in enumerate(val)):
                v.append(f"D1: node {pre} holds KV slots whose contents are not its prefix")
            if n.mamba_value is not None:
                states += n.mamba_value.tolist()
                if self.states.content.get(int(n.mamba_value[0])) != (("state",) + pre,):
                    v.append(f"D1: node {pre} holds a mamba state written for another prefix")
        if not self.locks:  # its LRU check asserts the LRU end is unlocked: valid only when idle
            try:
                self.cache.sanity_check()
            except Exception as e:  # its failure path reads the TP rank; the real error is the context
                cause = e.__context__ if e.__context__ is not None else e
                v.append(f"sanity_check: {type(cause).__name__}: {cause}")
        return v + self.book.account(slots) + [f"mamba {x}" for x in self.states.account(states)]

    def lock(self, node):
        self.cache.inc_lock_ref(node)
        self.locks += 1
        return node

    def unlock(self, lock):
        self.cache.dec_lock_ref(lock)
        self.locks -= 1


# ===================================================== HiMambaRadixCache (0.5.17)


class SGLangHiMamba(Target):
    """HiMambaRadixCache with its real HybridCacheController, host pools and mamba pools.

    On a GPU: CUDA streams, events, pinned host memory and — where the `sgl_kernel` package is
    importable — its copy kernels. Without CUDA: the same code, with pinned-memory registration
    skipped and `conformance.kernels`' torch copies standing in for the kernels. Page size 1
    (its v1 requires it), write-through (every insert backs up), io_backend "direct" with the
    page-first-direct host layout (the one that needs no other kernels). Every operation is
    followed by draining the controller's write and load acknowledgements (synchronously), so
    the machine sees settled states. Load-backs below 10 tokens are skipped upstream by policy;
    the adapter sets that threshold to 1 so small trees exercise the load path."""

    # On CUDA the cache is built once per process and reset between runs: its host pools pin memory
    # with cudaHostRegister, and MambaPoolHost's buffers are never unregistered (HostKVCache.destroy
    # unregisters `kv_buffer` only), so a second cache in one process can fail with
    # cudaErrorHostMemoryAlreadyRegistered (rc 712) when the allocator reuses that memory.
    _shared = None

    def __init__(self):
        shim.load(V_MAMBA, real=HIMAMBA_REAL)
        from sglang.srt import runtime_context
        from sglang.srt.configs.mamba_utils import Mamba2CacheParams, Mamba2StateShape
        from sglang.srt.mem_cache import base_prefix_cache as b
        from sglang.srt.mem_cache import cache_init_params as cip
        from sglang.srt.mem_cache import memory_pool as mp
        from sglang.srt.mem_cache import radix_cache as r
        from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
        from sglang.srt.mem_cache.hi_mamba_radix_cache import HiMambaRadixCache

        self.b, self.r = b, r
        self.dev = dev = "cuda" if torch.cuda.is_available() else "cpu"
        if dev == "cpu":
            cpu_stand_ins()
        shared = SGLangHiMamba._shared
        self.info = TargetInfo("sglang-himamba", page_size=1, sidecar="mamba", ops=CORE_OPS | {"load_back", "evict_mamba"},
                               device_tokens=16, mamba_slots=6, host=True, sglang=V_MAMBA, allow=KNOWN_HIMAMBA,
                               notes=f"on {dev}" + ("" if dev == "cuda" else " (CPU stand-ins for pinning and copies)"))
        sa = types.SimpleNamespace(
            mamba_cache_chunk_size=64, hicache_io_backend="direct", hicache_mem_layout="page_first_direct",
            hicache_storage_backend=None, extra_metric_labels=None, hicache_storage_backend_extra_config=None,
            hicache_storage_prefetch_policy="best_effort", hicache_write_policy="write_through", hicache_size=0,
            hicache_ratio=2.0, served_model_name="conformance", hicache_host_memory_mode="cache", enable_hisparse=False)
        runtime_context._CONTEXT._server_args = sa
        self.locks = 0
        if shared is not None:  # CUDA: one cache per process, reset between runs (see _shared)
            self.req_pool, self.kv, self.alloc_, self.cache = shared
            self.cache.reset()
            self.alloc_.clear()
            self.req_pool.mamba_allocator.clear()
            self.k0 = self.kv.full_kv_pool.k_buffer[0]
            return
        shape = Mamba2StateShape.create(tp_world_size=1, intermediate_size=32, n_groups=1, num_heads=2, head_dim=8,
                                        state_size=8, conv_kernel=4)
        self.req_pool = mp.HybridReqToTokenPool(
            size=4, mamba_size=self.info.mamba_slots, mamba_spec_state_size=4, max_context_len=64, device=dev,
            enable_memory_saver=False, cache_params=Mamba2CacheParams(shape=shape, layers=[0]), mamba_layer_ids=[0],
            enable_mamba_extra_buffer=False)
        self.kv = mp.HybridLinearKVPool(size=self.info.device_tokens, dtype=torch.bfloat16, page_size=1, head_num=2,
                                        head_dim=8, full_attention_layer_ids=[1], device=dev, enable_memory_saver=False,
                                        mamba_pool=self.req_pool.mamba_pool)
        self.alloc_ = TokenToKVPoolAllocator(size=self.info.device_tokens, dtype=torch.bfloat16, device=dev,
                                             kvcache=self.kv, need_sort=False)
        params = cip.CacheInitParams(disable=False, req_to_token_pool=self.req_pool,
                                     token_to_kv_pool_allocator=self.alloc_, page_size=1)
        self.cache = HiMambaRadixCache(params, sa)
        self.cache.load_back_threshold = 1
        self.k0 = self.kv.full_kv_pool.k_buffer[0]  # the KV every page's contents are written to and checked in
        if dev == "cuda":
            SGLangHiMamba._shared = (self.req_pool, self.kv, self.alloc_, self.cache)

    # --- data: a page's KV (layer 0, K) is a function of its prefix, so any path through L2 is checked
    @staticmethod
    def _val(prefix) -> float:
        return float(hash(tuple(prefix)) % 251 - 125)

    def _settle(self) -> None:
        c = self.cache
        for _ in range(2000):
            c.writing_check()
            if c.ongoing_load_back:
                c.loading_check()
            if not c.ongoing_write_through and not c.ongoing_load_back:
                return
            if self.dev == "cuda":
                torch.cuda.synchronize()
        raise AssertionError(f"operations never acknowledged: writes {list(c.ongoing_write_through)}, "
                             f"loads {list(c.ongoing_load_back)}")

    def _key(self, tokens):
        return self.r.RadixKey(array("q", tokens))

    def _alloc_kv(self, tokens):
        """KV slots for `tokens` (evicting if short), each holding the value of its prefix."""
        n = len(tokens)
        if self.alloc_.available_size() < n:
            self.cache.evict(self.b.EvictParams(num_tokens=n - self.alloc_.available_size()))
            self._settle()
        idx = self.alloc_.alloc(n)
        if idx is None:
            raise TargetError(f"{n} tokens needed, {self.alloc_.available_size()} free after eviction")
        for i, s in enumerate(idx.tolist()):
            self.k0[s].fill_(self._val(tokens[: i + 1]))
        return idx

    def alloc(self, tokens):
        idx = self._alloc_kv(tokens)
        slot = self.req_pool.mamba_allocator.alloc(1)
        if slot is None:
            self.cache.evict(self.b.EvictParams(num_tokens=0, mamba_num=1))
            slot = self.req_pool.mamba_allocator.alloc(1)
        if slot is None:
            self.alloc_.free(idx)
            raise TargetError("mamba state pool full after eviction")
        return idx, slot

    def insert(self, tokens, kv):
        idx, slot = kv
        res = self.cache.insert(self.b.InsertParams(key=self._key(tokens), value=idx, mamba_value=slot))
        if res.mamba_exist:
            self.req_pool.mamba_allocator.free(slot)
        self._settle()
        return Inserted(res.prefix_len, not res.mamba_exist)

    def match(self, tokens):
        m = self.cache.match_prefix(self.b.MatchPrefixParams(key=self._key(tokens)))
        self._settle()
        # Its last_host_node is the deepest *backed-up* node at or above the mamba boundary (and its
        # best_match_node the same node), not the spec's deepest node with data: not compared.
        return Match(device_len=m.device_indices.numel(), best_len=len(self.node_prefix(m.best_match_node)),
                     node=m.last_device_node, device_indices=m.device_indices.tolist(),
                     mamba_host_hit=m.mamba_host_hit_length)

    def data_ok(self, tokens, m) -> bool:
        got = [float(self.k0[s].flatten()[0]) for s in m.device_indices]
        return got == [self._val(tokens[: i + 1]) for i in range(len(got))]

    def load_back(self, tokens) -> int | None:
        """Match, then load `best_match_node` back (as the scheduler's init_load_back does); None when
        the cache declined. Returns the device match length afterwards."""
        m = self.cache.match_prefix(self.b.MatchPrefixParams(key=self._key(tokens)))
        node = m.best_match_node
        if node is not self.cache.root_node and self._needs_load(node):
            got = self.cache.load_back(node)
            self.cache.ready_to_load_host_cache()
            self._settle()
            if got is None:
                return None
        return self.match(tokens).device_len

    @staticmethod
    def _needs_load(node) -> bool:
        return node.evicted or (node.mamba_evicted and node.mamba_backuped)

    alive = RadixNodes.alive
    node_prefix = RadixNodes.node_prefix
    locked_prefix = RadixNodes.locked_prefix
    _nodes = RadixNodes._nodes
    lock = SGLangMamba.lock
    unlock = SGLangMamba.unlock

    def evict(self, n):
        freed = self.cache.evict(self.b.EvictParams(num_tokens=n)).num_tokens_evicted
        self._settle()
        return freed

    def evict_mamba(self, n):
        freed = self.cache.evict(self.b.EvictParams(num_tokens=0, mamba_num=n)).mamba_num_evicted
        self._settle()
        return freed

    def abstract(self) -> Model:
        m = Model(page_size=1, sidecar="mamba", window=0)
        order, x, rank = {}, self.cache.full_lru_list.tail.prev, 0
        while x is not None and x is not self.cache.full_lru_list.head:
            order[id(x)] = rank
            rank += 1
            x = x.prev
        for n, pre in self._nodes():
            for p in _pages(1, pre, len(n.key)):
                end = p == pre
                m.pages[p] = Page(dev=n.value is not None, host=n.host_value is not None,
                                  mamba=end and n.mamba_value is not None,
                                  mamba_host=end and getattr(n, "mamba_host_value", None) is not None,
                                  lock=n.full_lock_ref, host_ref=n.host_ref_counter, stamp=order.get(id(n), -1))
        return m

    def _device_kv_ok(self, node, prefix) -> bool:
        """D1: the node's device slots hold the KV written for the prefixes ending at each of them."""
        got = [float(self.k0[s].flatten()[0]) for s in node.value.tolist()]
        return got == [self._val(prefix[: len(prefix) - len(got) + i + 1]) for i in range(len(got))]

    def check(self) -> list[str]:
        v = [f"D1: node {pre} holds device KV that is not its prefix's" for n, pre in self._nodes()
             if n.value is not None and not self._device_kv_ok(n, pre)]
        if not self.locks:
            c = self.cache
            lists = [c.full_lru_list] + ([] if "mamba-lru-stamps" in self.info.allow else [c.mamba_lru_list])
            try:
                for lru in lists:
                    lru.sanity_check(c)
            except Exception as e:
                cause = e.__context__ if e.__context__ is not None else e
                v.append(f"sanity_check: {type(cause).__name__}: {cause}")
        return v

    def close(self) -> None:
        if SGLangHiMamba._shared is None:  # a fresh cache per run: give its host memory back
            import atexit

            atexit.unregister(self.cache.shutdown)
            self.cache.release_host_resources()


# ======================================================= HiRadixCache (0.5.17)
class SGLangHiRadix(Target):
    """HiRadixCache (SGLang's HiCache: device KV backed by a host tier) with its real
    HiCacheController and MHA host pool; page size 2, io_backend "direct" with the page-first-direct
    host layout. Without CUDA the pinning and copy kernels are stood in for, as
    for sglang-himamba. A single rank: the TP all-reduces are skipped (world size 1). Every
    operation is followed by draining the controller's acknowledgements, so the machine sees
    settled states; the load-back threshold is set to 1 so small trees exercise the load path.
    `policy`: its hicache_write_policy (write_through, write_through_selective, write_back)."""

    _shared: dict = {}  # policy -> cache; on CUDA one per process, reset between runs (see SGLangHiMamba)

    def __init__(self, policy: str = "write_through"):
        shim.load(V_MAMBA, real=HIMAMBA_REAL)
        from unittest import mock

        from sglang.srt import runtime_context
        from sglang.srt.mem_cache import base_prefix_cache as b
        from sglang.srt.mem_cache import cache_init_params as cip
        from sglang.srt.mem_cache import memory_pool as mp
        from sglang.srt.mem_cache import radix_cache as r
        from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
        from sglang.srt.mem_cache.hiradix_cache import HiRadixCache

        self.b, self.r = b, r
        self.dev = dev = "cuda" if torch.cuda.is_available() else "cpu"
        if dev == "cpu":
            cpu_stand_ins()
        ps = 2
        suffix = {"write_through": "", "write_through_selective": "-selective", "write_back": "-write-back"}[policy]
        self.policy = policy
        allow = KNOWN if policy == "write_through" else KNOWN | {"best-is-backed-up"}
        self.info = TargetInfo(f"sglang-hiradix{suffix}", page_size=ps, ops=CORE_OPS | {"load_back"}, device_tokens=16,
                               host=True, sglang=V_MAMBA, allow=allow,
                               notes=f"on {dev}" + ("" if dev == "cuda" else " (CPU stand-ins for pinning and copies)"))
        sa = types.SimpleNamespace(
            hicache_io_backend="direct", hicache_mem_layout="page_first_direct", hicache_storage_backend=None,
            extra_metric_labels=None, hicache_storage_backend_extra_config=None,
            hicache_storage_prefetch_policy="best_effort", hicache_write_policy=policy, hicache_size=0,
            hicache_ratio=1.5, served_model_name="conformance", hicache_host_memory_mode="cache", enable_hisparse=False)
        runtime_context._CONTEXT._server_args = sa
        if policy in SGLangHiRadix._shared:
            self.kv, self.alloc_, self.cache = SGLangHiRadix._shared[policy]
            self.cache.reset()
            self.alloc_.clear()
            self.k0 = self.kv.k_buffer[0]
            return
        n = self.info.device_tokens
        self.kv = mp.MHATokenToKVPool(size=n, page_size=ps, dtype=torch.bfloat16, head_num=2, head_dim=8, layer_num=2,
                                      device=dev, enable_memory_saver=False)
        self.alloc_ = PagedTokenToKVPoolAllocator(size=n, page_size=ps, dtype=torch.bfloat16, device=dev,
                                                  kvcache=self.kv, need_sort=False)
        params = cip.CacheInitParams(disable=False, req_to_token_pool=None, token_to_kv_pool_allocator=self.alloc_,
                                     page_size=ps)
        with mock.patch.object(torch.distributed, "get_world_size", lambda group=None: 1):  # one rank, no group
            self.cache = HiRadixCache(params, sa)
        self.cache.load_back_threshold = 1
        self.k0 = self.kv.k_buffer[0]  # the KV every page's contents are written to and checked in
        if dev == "cuda":
            SGLangHiRadix._shared[policy] = (self.kv, self.alloc_, self.cache)

    _val = staticmethod(SGLangHiMamba._val)
    _settle = SGLangHiMamba._settle
    _key = SGLangHiMamba._key
    alive = RadixNodes.alive
    node_prefix = RadixNodes.node_prefix
    locked_prefix = RadixNodes.locked_prefix
    _nodes = RadixNodes._nodes
    data_ok = SGLangHiMamba.data_ok
    evict = SGLangHiMamba.evict
    load_back = SGLangHiMamba.load_back
    _device_kv_ok = SGLangHiMamba._device_kv_ok
    alloc = SGLangHiMamba._alloc_kv

    def insert(self, tokens, kv):
        res = self.cache.insert(self.b.InsertParams(key=self._key(tokens), value=kv))
        self.alloc_.free(kv[: res.prefix_len])  # the duplicates stay the caller's to free
        self._settle()
        return Inserted(res.prefix_len)

    def match(self, tokens):
        m = self.cache.match_prefix(self.b.MatchPrefixParams(key=self._key(tokens)))
        self._settle()
        best = len(self.node_prefix(m.best_match_node))
        return Match(device_len=m.device_indices.numel(), best_len=best, node=m.last_device_node,
                     device_indices=m.device_indices.tolist())

    @staticmethod
    def _needs_load(node) -> bool:
        return node.evicted

    lock = RadixNodes.lock
    unlock = RadixNodes.unlock

    def abstract(self) -> Model:
        m = Model(page_size=self.info.page_size, sidecar=None, window=0)
        for n, pre in self._nodes():
            for p in _pages(self.info.page_size, pre, len(n.key)):
                m.pages[p] = Page(dev=n.value is not None, host=n.host_value is not None, lock=n.lock_ref,
                                  host_ref=n.host_ref_counter, stamp=n.last_access_time)
        return m

    def check(self) -> list[str]:
        v, ev, pr = [], 0, 0
        for n, pre in self._nodes():
            if n.value is not None:
                if not self._device_kv_ok(n, pre):
                    v.append(f"D1: node {pre} holds device KV that is not its prefix's")
                if n.lock_ref == 0:
                    ev += len(n.key)
                else:
                    pr += len(n.key)
        if not self.cache.ongoing_write_through and (ev, pr) != (self.cache.evictable_size(), self.cache.protected_size()):
            v.append(f"R2: evictable/protected sizes {(self.cache.evictable_size(), self.cache.protected_size())}, "
                     f"the tree sums to {(ev, pr)}")
        host = self.cache.token_to_kv_pool_host
        held = sum(len(n.host_value) for n, _ in self._nodes() if n.host_value is not None)
        if held + host.available_size() != host.size:  # R1 on the host tier: no slot leaked or shared
            v.append(f"R1: host pool of {host.size} slots: {host.available_size()} free + {held} held by the tree")
        return v

    def close(self) -> None:
        if self.policy not in SGLangHiRadix._shared:  # a fresh cache per run: give its host memory back
            import atexit

            atexit.unregister(self.cache.shutdown)
            self.cache.release_host_resources()

"""SGLang 0.5.23's HiCache for hybrid sliding-window models: `UnifiedRadixCache` with FULL + SWA
components and `init_hicache` (the SWA host-pool strategy: a host KV pool and a host SWA pool behind
one `HybridCacheController`), Python tree core, page 2, sliding window 4 tokens.

Built as a server builds it: an `SWAKVPool` (one full-attention layer, one sliding-window layer, the
SWA pool smaller than the full one, so SWA eviction tombstones nodes while their full KV stays), the
`SWATokenToKVPoolAllocator` that maps every full slot to its SWA slot, and the real controller. The
IO path is the full-KV targets' (`SGLangUniHiCache._io_path`): on a CPU direct IO with torch
stand-ins for the copies and pinning (`kernels.py`); on a GPU SGLang's defaults, kernel IO over the
page_first layout through its JIT HiCache kernels, for both host pools.

The abstraction reads the Python core's nodes: per node, the FULL and SWA device and host values.
A page's `swa` flag is "the SWA component holds device KV for it", so the model's match rule (the
`window` tokens before a match end hold SWA KV, or the run reaches the root) judges SGLang's
validator. Data is read, never assumed: every full slot's K holds an id of the prefix written there,
and so does every SWA slot, and a match's SWA bytes are read through the allocator's full-to-SWA
mapping, as the attention kernels reach them.
"""

from __future__ import annotations

import time

import torch

from models.abstract import Model, Page

from ...target import CORE_OPS, Inserted, TargetError, TargetInfo
from . import shim
from .common import HICACHE_REAL, V_NEW
from .v0_5_23_hicache import KNOWN_HI, POLICY_SUFFIX, SIDECAR_HOST_RULES, SGLangUniHiCache, storage_ops


class SGLangUniHiSWA(SGLangUniHiCache):
    """`UnifiedRadixCache` with FULL + SWA and HiCache on. `policy`: hicache_write_policy."""

    WINDOW = 4  # sliding_window_size, in tokens (two pages)
    SWA_TOKENS = 12  # the SWA device pool, smaller than the full pool's 16

    def __init__(self, policy: str = "write_through", prefetch: str | None = None, core: str = "python"):
        shim.load(V_NEW, real=HICACHE_REAL)
        from sglang.srt.mem_cache import base_prefix_cache as b
        from sglang.srt.mem_cache import cache_init_params as cip
        from sglang.srt.mem_cache import radix_cache as r
        from sglang.srt.mem_cache.allocator.swa import SWATokenToKVPoolAllocator
        from sglang.srt.mem_cache.hicache_storage import PoolName
        from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool
        from sglang.srt.mem_cache.unified_cache.component_type import ComponentType
        from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache
        from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler

        self.b, self.r = b, r
        self.FULL, self.SWA = ComponentType.FULL, ComponentType.SWA
        self.dev = dev = "cuda" if torch.cuda.is_available() else "cpu"
        io, layout, head_dim = self._io_path(dev)
        ps, n = 2, 16
        self.policy, self.core = policy, core
        self.info = TargetInfo(f"sglang-hicache-swa{'' if core == 'python' else '-' + core}{POLICY_SUFFIX[policy]}"
                               f"{self._suffix(prefetch)}", page_size=ps,
                               sidecar="swa", device_tokens=n, ops=CORE_OPS | {"load_back"} | storage_ops(prefetch),
                               host=True, sglang=V_NEW,
                               exact_locks=False, stamps=False, allow=KNOWN_HI | SIDECAR_HOST_RULES,
                               notes=self._io_notes(dev))
        sa = ServerArgs(model_path="dummy", page_size=ps, hicache_io_backend=io,
                        hicache_mem_layout=layout, hicache_write_policy=policy, hicache_ratio=1.5,
                        device=dev, **self._storage(prefetch, ps))
        set_global_server_args_for_scheduler(sa)
        self._one_rank()
        self.kv = SWAKVPool(size=n, size_swa=self.SWA_TOKENS, page_size=ps, dtype=torch.bfloat16, head_num=2,
                            head_dim=head_dim, swa_attention_layer_ids=[1], full_attention_layer_ids=[0], device=dev,
                            enable_memory_saver=False)
        self.alloc_ = SWATokenToKVPoolAllocator(size=n, size_swa=self.SWA_TOKENS, page_size=ps,
                                                dtype=torch.bfloat16, device=dev, kvcache=self.kv, need_sort=False)
        params = cip.CacheInitParams(disable=False, req_to_token_pool=None, token_to_kv_pool_allocator=self.alloc_,
                                     page_size=ps, tree_components=(ComponentType.FULL, ComponentType.SWA),
                                     tree_core_backend=core, sliding_window_size=self.WINDOW)
        self.cache = self._unified(UnifiedRadixCache, params, core)
        self.cache.init_hicache(sa, params)
        self.cache.load_back_threshold = 0
        entries = self.cache.host_pool_group.entry_map
        self.host_kv, self.host_swa = entries[PoolName.KV].host_pool, entries[PoolName.SWA].host_pool
        if dev == "cpu":
            for host in (self.host_kv, self.host_swa):
                host.pin_memory = False
        elif not (self.host_kv.can_use_jit and self.host_swa.can_use_jit):
            raise shim.ShimError("SGLang's host pools declined its JIT HiCache kernels on this GPU")
        self.k0 = self.kv.full_kv_pool.get_key_buffer(0)
        self.s0 = self.kv.swa_kv_pool.get_key_buffer(0)
        self._start_reading()

    # ----------------------------------------------------------------- data in the KV
    def _to_swa(self, full: list[int]) -> list[int]:
        """The SWA slots the attention kernels read for `full` slots (the allocator's mapping)."""
        return self.alloc_.full_to_swa_index_mapping[torch.tensor(full, dtype=torch.int64)].tolist() if full else []

    def data_ok(self, tokens, m) -> bool:
        """D1: the served full slots hold the prefix, and so do the SWA slots they map to within the
        window before the match end (what sliding-window attention reads)."""
        want = [tuple(tokens[: i + 1]) for i in range(len(m.device_indices))]
        if [self._read(s) for s in m.device_indices] != want:
            return False
        tail = m.device_indices[max(0, len(m.device_indices) - self.WINDOW):]
        return [self._read(s, self.s0) for s in self._to_swa(tail)] == want[len(want) - len(tail):]

    # ----------------------------------------------------------------- driving
    def alloc(self, tokens):
        """Full and SWA slots for `tokens`, as `SWATokenToKVPoolAllocator.alloc` takes them for page 1
        (each sub-allocator is paged here), evicting what either pool lacks first."""
        n, a = len(tokens), self.alloc_
        short_full, short_swa = n - a.full_available_size(), n - a.swa_available_size()
        if short_full > 0 or short_swa > 0:
            self.cache.evict(self.b.EvictParams(num_tokens=max(0, short_full), swa_num_tokens=max(0, short_swa)))
            self._settle()
        if n > a.full_available_size() or n > a.swa_available_size():
            raise TargetError(f"{n} tokens needed, {a.full_available_size()} full and {a.swa_available_size()} "
                              "SWA free after eviction")
        full, swa = a.full_attn_allocator.alloc(n), a.swa_attn_allocator.alloc(n)
        a.set_full_to_swa_mapping(full, swa)
        self._write(full, tokens)
        self._write(swa, tokens, self.s0)
        return full

    def insert(self, tokens, kv):
        before = self._device_pages(tokens)
        res = self.cache.insert(self.b.InsertParams(key=self._key(tokens), value=kv, track_adopted_ranges=True))
        self._settle()
        return Inserted(self.cached_len_swa(res, before))

    def cached_len_swa(self, res, on_device: set[int]) -> int:
        """The spec's cached_len. Contract difference, mapped here: besides the host-only nodes it
        adopts (see `cached_len`), 0.5.23 swaps in the request's full KV for a node whose SWA was
        evicted (SWA recovery, `_recover_from_incoming`); that page was on device before, so the
        adopted range stops the device prefix only where its pages were not (`on_device`: the ends of
        the pages of `tokens` with full device KV before the insert)."""
        ps, starts = self.info.page_size, []
        for a, e in (res.adopted_ranges or {}).get(self.FULL, []):
            starts += [p for p in range(a, e, ps) if p + ps not in on_device][:1]
        return min([res.prefix_len, *starts])

    def _device_pages(self, tokens) -> set[int]:
        """The ends of the pages of `tokens` whose full KV is on device (the tree core's full-device
        match, which stamps nothing)."""
        ps = self.info.page_size
        n, _, _ = self.tc.match_full_device_prefix(self._key(tokens[: len(tokens) // ps * ps]))
        return set(range(ps, n + 1, ps))

    # ----------------------------------------------------------------- storage tier (L3)
    def l3_sidecar_pages(self, tokens: list[int]) -> list[bool]:
        """For each page of `tokens`: whether L3 holds the SWA KV of the whole window ending there."""
        backend = self.cache.cache_controller.storage_backend
        held = [bool(backend.exists(k + ".swa")) for k in self._l3_keys(tokens)]
        span = -(-self.WINDOW // self.info.page_size)
        return [all(held[max(0, i + 1 - span): i + 1]) for i in range(len(held))]

    def _staged_swa(self) -> int:
        """Host SWA slots a prefetch in flight holds for the window L3 returns (its SWA transfer's
        host indices; they join the tree, or are released, when the prefetch ends)."""
        from sglang.srt.mem_cache.hicache_storage import PoolName

        ops = getattr(self.cache, "ongoing_prefetch", None) or {}
        return sum(len(x.host_indices) for o in ops.values() for x in (getattr(o.operation, "pool_transfers", None) or [])
                   if x.name == PoolName.SWA and x.host_indices is not None)

    def prefetch_finish(self) -> dict:
        """As the base, and then, like its wait for the KV pool, up to 2 s for the host SWA pool: a
        prefetch that ended before its SWA read did gives that staging back when the storage thread
        lets go of it, so R1 judges a leak, not a release on its way (Python core: its SWA host
        slots are readable)."""
        got = super().prefetch_finish()
        stop = time.monotonic() + 2
        while self.core == "python" and time.monotonic() < stop and self._swa_host_unaccounted():
            self.cache.check_hicache_events()
            time.sleep(0.005)
        self._settle()
        return got

    def _swa_host_unaccounted(self) -> int:
        from sglang.srt.mem_cache.hicache_storage import PoolName

        held = sum(v[5] for v in self._node_values())
        return self.host_swa.size - (self.host_swa.available_size() + self._staged_swa()
                                     + self._releasing(PoolName.SWA) + held)

    def host_sidecar_free(self) -> int:
        """How many SWA windows the host SWA pool has room for."""
        return self.host_swa.available_size() // self.WINDOW

    # ----------------------------------------------------------------- reading the tree
    def abstract(self) -> Model:
        if self.core != "python":
            return super().abstract()
        ps = self.info.page_size
        m = Model(page_size=ps, sidecar="swa", window=self.WINDOW)
        for node, pre in self._tree():
            f, s = node.component_data[self.FULL], node.component_data[self.SWA]
            for end in range(len(pre) - len(node.key) + ps, len(pre) + 1, ps):
                m.pages[pre[:end]] = Page(dev=f.value is not None, host=f.host_value is not None,
                                          swa=s.value is not None, swa_host=s.host_value is not None,
                                          lock=1 if f.lock_ref else 0, host_ref=f.host_lock_ref)
        return m

    def _sidecar_flags(self, node) -> tuple[dict, dict]:
        """The node's SWA, on every page. Its host copy shows through the interface only while its SWA
        KV is off device (`component_has_host_value_only`); beside device SWA it reads as absent,
        which no match rule reads."""
        sv = self.tc.get_component_device_value(node, self.SWA)
        return {"swa": sv is not None and len(sv) > 0,
                "swa_host": bool(self.tc.component_has_host_value_only(node, self.SWA))}, {}

    def _held(self) -> int:
        """L2 slots the tree holds. On the Rust core the base's count: it runs before a prefetch's new
        nodes have known prefixes, which `_node_values` needs there."""
        return sum(v[4] for v in self._node_values()) if self.core == "python" else super()._held()

    def _releasing(self, pool) -> int:
        """Host slots queued for release (the storage threads hand back what a discarded prefetch
        staged; the next poll returns them to the pool). `pool`: None for the KV pool, else its name."""
        cc = self.cache.cache_controller
        q = cc.host_mem_release_queue if pool is None else cc.extra_host_mem_release_queues.get(pool)
        return 0 if q is None else sum(len(x) for x in list(q.queue))

    def _node_values(self) -> list[tuple]:
        """Per node: (prefix, key length, full device value, SWA device value, full host slots, SWA
        host slots); the Rust core's SWA host slots are None (its interface does not say)."""
        if self.core == "python":
            out = []
            for node, pre in self._tree():
                f, s = node.component_data[self.FULL], node.component_data[self.SWA]
                out.append((pre, len(node.key), f.value, s.value, 0 if f.host_value is None else len(f.host_value),
                            0 if s.host_value is None else len(s.host_value)))
            return out
        nodes = self._nodes()
        pre = self._prefixes(nodes)
        return [(pre[i], p[-1].path_end - p[-1].path_start, self.tc.get_component_device_value(i, self.FULL),
                 self.tc.get_component_device_value(i, self.SWA),
                 p[-1].path_end - p[-1].path_start if self.tc.is_backuped(i) else 0, None) for i, p in nodes.items()]

    def check(self) -> list[str]:
        from sglang.srt.mem_cache.hicache_storage import PoolName

        v = []
        held = {"full": 0, "swa": 0, "full_host": 0, "swa_host": 0}
        for pre, n, fv, sv, fh, sh in self._node_values():
            want = [pre[: len(pre) - n + i + 1] for i in range(n)]
            if fv is not None and len(fv):
                held["full"] += len(fv)
                if [self._read(int(x)) for x in fv] != want:
                    v.append(f"D1: node {pre} holds full KV of {[self._read(int(x)) for x in fv]}")
            if sv is not None and len(sv):
                held["swa"] += len(sv)
                got = [self._read(int(x), self.s0) for x in sv]
                if got != want:
                    v.append(f"D1: node {pre} holds SWA KV of {got}")
                if fv is not None and self._to_swa(fv.tolist()) != sv.tolist():
                    v.append(f"D1: node {pre}: its full slots map to SWA slots {self._to_swa(fv.tolist())}, "
                             f"it holds {sv.tolist()}")
            held["full_host"] += fh
            held["swa_host"] = None if sh is None or held["swa_host"] is None else held["swa_host"] + sh
        try:
            self.cache.sanity_check()
        except Exception as e:  # the target's own checker
            v.append(f"sanity_check: {type(e).__name__}: {e}")
        a = self.alloc_
        host = {"full_host": self.host_kv.available_size() + self._staged() + self._releasing(None),
                "swa_host": self.host_swa.available_size() + self._staged_swa() + self._releasing(PoolName.SWA)}
        for what, free, size, pool in (("device full", a.full_available_size(), a.full_attn_allocator.size, "full"),
                                       ("device SWA", a.swa_available_size(), a.swa_attn_allocator.size, "swa"),
                                       ("host KV", host["full_host"], self.host_kv.size, "full_host"),
                                       ("host SWA", host["swa_host"], self.host_swa.size, "swa_host")):
            if held[pool] is not None and free + held[pool] != size:  # R1: no slot leaked or shared
                v.append(f"R1: {what} pool of {size} slots: {free} free, staged or being released + {held[pool]} "
                         "in the tree")
        return v

"""vLLM 0.33.0's CPU offloading manager (`CPUOffloadingManager`, the scheduler-side store behind
`OffloadingConnector`) as a target, with its LRU or ARC policy.

The manager is a flat store: offload key (a block hash, chained over the prefix, + group) ->
chunk (one CPU block here: blocks_per_chunk = 1), with a ref count (-1 while a store is in
flight, then the number of loads reading it). It is this target's only tier, so the model's
device tier stands for "stored and ready in the CPU store". The mapping, operation by
operation, follows how the connector's scheduler side drives it (one `ReqContext` per request,
key positions set, `on_request_finished` at the end):

- alloc(tokens)  = a request: leading `lookup` hits (what it would load), then `prepare_store`
  of all its keys (the manager allocates chunks for the new ones, evicting as its policy says;
  None = cannot make room -> TargetError; the request has still used the ready chunks it
  offered, so they become recent when it finishes);
- insert(tokens) = the store lands: `complete_store` of the stored keys, request finished;
- match(tokens)  = leading `lookup` hits (read-only, recency included);
- lock / unlock  = `prepare_load` (ref +1: protected from eviction) / `complete_load` (ref -1),
  request finished;
- evict(n)       = store pressure: a request storing fresh filler keys that need n tokens more
  than the free chunks, then failing (`complete_store(success=False)` removes them).

Contract differences (README.md here): a flat store evicts by key, not leaf-first (a parent can
go before its child; a later lookup stops at the same place as the model's walk); recency moves
when a request finishes, not on lookup ("lru-recency" allowed; LRU's order is judged against the
finish order this driver records); ARC keeps a frequency list, so no LRU order is judged for it.

Checks every step: each chunk is free or held by exactly one key; ready/pending/evictable
counters equal what they count; every ready key's ref count equals the loads this driver holds;
each key's chunk holds the prefix its hash was computed for (D1); the policy's own structures
(LRU: the evictable set; ARC: T1/T2 disjoint and within capacity, no cached key a ghost,
ghosts bounded, the T1 target within [0, capacity]).
"""

from __future__ import annotations

from dataclasses import dataclass

from conformance.target import CORE_OPS, Inserted, Match, Target, TargetError, TargetInfo
from models.abstract import Model, Page, Prefix

from . import shim
from .block_pool import Node

KNOWN = frozenset({"lru-recency"})


@dataclass(eq=False)
class Load:
    """A caller lock: a load in flight from the CPU store."""

    ctx: object
    prefix: Prefix
    keys: list


class VLLMOffload(Target):
    """`CPUOffloadingManager(num_chunks=8, cache_policy=policy)`, page 2, one block per chunk."""

    def __init__(self, policy: str = "lru", page_size: int = 2, chunks: int = 8):
        shim.load()
        from vllm.utils.hashing import sha256
        from vllm.v1.core import kv_cache_utils as ku
        from vllm.v1.kv_offload import base
        from vllm.v1.kv_offload.cpu.manager import CPUOffloadingManager

        ku.init_none_hash(sha256)
        self.ku, self.base, self.sha256 = ku, base, sha256
        self.policy_name = policy
        self.info = TargetInfo(f"vllm-offload-{policy}", page_size=page_size, device_tokens=chunks * page_size,
                               ops=CORE_OPS, stamps=policy == "lru", allow=KNOWN,
                               notes="vLLM 0.33.0 CPUOffloadingManager; its store is the model's one tier")
        self.mgr = CPUOffloadingManager(num_chunks=chunks, cache_policy=policy)
        self.chunks = chunks
        self.key_of: dict[Prefix, bytes] = {}
        self.prefix_of: dict[bytes, Prefix] = {}
        self.content: dict[int, Prefix] = {}  # chunk id -> the page prefix written into it
        self.loads: list[Load] = []
        self.stamps: dict[Prefix, int] = {}  # page -> when a request that accessed it finished
        self.clock = 0
        self.errors: list[str] = []
        self._n = 0

    # ------------------------------------------------------------------ helpers
    def _pages(self, tokens) -> list[Prefix]:
        ps = self.info.page_size
        return [tuple(tokens[: i + ps]) for i in range(0, len(tokens) - len(tokens) % ps, ps)]

    def _keys(self, tokens) -> list:
        out, parent = [], None
        for p in self._pages(tokens):
            k = self.key_of.get(p)
            if k is None:
                h = self.ku.hash_block_tokens(self.sha256, parent, list(p[-self.info.page_size:]))
                k = self.base.make_offload_key(h, 0)
                if self.prefix_of.setdefault(k, p) != p:
                    self.errors.append(f"H1: one offload key names two prefixes: {self.prefix_of[k]} and {p}")
                self.key_of[p] = k
            parent = self.base.get_offload_block_hash(k)
            out.append(k)
        return out

    def _ctx(self, keys):
        self._n += 1
        ctx = self.base.ReqContext(req_id=f"r{self._n}")
        for i, k in enumerate(keys):
            ctx.set_offload_key_position(k, (i + 1) * self.info.page_size)
        self.mgr.on_new_request(ctx)
        return ctx

    def _finish(self, ctx, pages) -> None:
        self.mgr.on_request_finished(ctx)
        self.clock += 1
        for p in pages:
            self.stamps[p] = self.clock

    def _hits(self, keys) -> int:
        n = 0
        for k in keys:
            if self.mgr.lookup(k, None) != self.base.LookupResult.HIT:
                break
            n += 1
        return n

    def _chunk(self, key):
        return self.mgr._policy.get(key)

    # -------------------------------------------------------------- the interface
    def alloc(self, tokens: list[int]) -> tuple[object, list, int]:
        keys = self._keys(tokens)
        hit = self._hits(keys)
        pages = self._pages(tokens)
        ready = [p for p, k in zip(pages, keys, strict=True) if self.mgr.lookup(k, None) == self.base.LookupResult.HIT]
        ctx = self._ctx(keys)
        out = self.mgr.prepare_store(keys, ctx)
        if out is None:  # the request still accessed the chunks it found ready: they are used, and recent
            self._finish(ctx, ready)
            raise TargetError(f"prepare_store: no room for {len(keys) - hit} chunks")
        for k, c in zip(out.keys_to_store, out.store_spec.block_ids.tolist(), strict=True):
            self.content[int(c)] = self.prefix_of[k]  # the worker writes the chunks
        return ctx, out.keys_to_store, hit

    def insert(self, tokens: list[int], kv: tuple[object, list, int]) -> Inserted:
        ctx, stored, hit = kv
        self.mgr.complete_store(stored, ctx)
        self._finish(ctx, self._pages(tokens))
        return Inserted(hit * self.info.page_size)

    def match(self, tokens: list[int]) -> Match:
        keys = self._keys(tokens)
        n = self._hits(keys)
        ps = self.info.page_size
        slots = [self._chunk(k).chunk_id * ps + i for k in keys[:n] for i in range(ps)]
        return Match(device_len=n * ps, best_len=n * ps, node=Node(tuple(tokens[: n * ps])), device_indices=slots)

    def data_ok(self, tokens: list[int], m: Match) -> bool:
        ps, pages = self.info.page_size, self._pages(tokens)
        return all(self.content.get(s // ps) == pages[i // ps] for i, s in enumerate(m.device_indices))

    def alive(self, node: Node) -> bool:
        return self._hits(self._keys(node.prefix)) * self.info.page_size == len(node.prefix)

    def node_prefix(self, node: Node) -> Prefix:
        return node.prefix

    def lock(self, node: Node) -> Load:
        keys = self._keys(node.prefix)
        n = self._hits(keys)
        if n == 0:
            return Load(None, (), [])
        ctx = self._ctx(keys[:n])
        self.mgr.prepare_load(keys[:n], ctx)
        h = Load(ctx, tuple(node.prefix[: n * self.info.page_size]), keys[:n])
        self.loads.append(h)
        return h

    def locked_prefix(self, lock: Load) -> Prefix:
        return lock.prefix

    def unlock(self, lock: Load) -> None:
        if lock.ctx is None:
            return
        self.mgr.complete_load(lock.keys, lock.ctx)
        self.loads.remove(lock)
        self._finish(lock.ctx, self._pages(lock.prefix))

    def evict(self, n: int) -> int:
        before = self.abstract()
        ps = self.info.page_size
        evictable = sum(1 for g in before.pages.values() if g.lock == 0)
        k = min(-(-n // ps), evictable)
        if k == 0:
            return 0
        free = self.mgr._get_num_free_chunks()
        self._n += 1
        fill = [self.base.make_offload_key(self.sha256(("filler", self._n, i)), 0) for i in range(free + k)]
        ctx = self._ctx(fill)
        out = self.mgr.prepare_store(fill, ctx)
        if out is None:
            self.errors.append(f"prepare_store of {free + k} chunks refused with {free} free and {evictable} evictable")
        else:
            for c in out.store_spec.block_ids.tolist():
                self.content.pop(int(c), None)
            self.mgr.complete_store(fill, ctx, success=False)
        self.mgr.on_request_finished(ctx)
        after = self.abstract()
        return ps * sum(1 for p in before.pages if p not in after.pages)

    # -------------------------------------------------------------- abstraction
    def abstract(self) -> Model:
        m = Model(page_size=self.info.page_size, sidecar=None, window=0)
        for p, k in self.key_of.items():
            c = self._chunk(k)
            if c is not None and c.is_ready:
                m.pages[p] = Page(dev=True, host=False, lock=c.ref_cnt, stamp=self.stamps.get(p, 0))
        return m

    def _entries(self) -> list:
        pol = self.mgr._policy
        if self.policy_name == "arc":
            return list(pol.t1.items()) + list(pol.t2.items())
        return list(pol.chunks.items())

    def check(self) -> list[str]:
        v, self.errors = list(self.errors), []
        mgr, pol = self.mgr, self.mgr._policy
        entries = self._entries()
        held = [c.chunk_id for _, c in entries]
        free = list(mgr._free_list)
        if len(set(held)) != len(held):
            v.append(f"R1: a chunk is held by two keys: {sorted(held)}")
        if len(set(free)) != len(free) or set(free) & set(held):
            v.append(f"R1: free list {free} repeats a chunk or holds one in use {sorted(held)}")
        if set(free) | set(held) != set(range(mgr._num_allocated_chunks)):
            v.append(f"R1: chunks leaked: allocated {mgr._num_allocated_chunks}, free {free}, held {sorted(held)}")
        ready0 = [k for k, c in entries if c.ref_cnt == 0]
        pending = [k for k, c in entries if c.ref_cnt < 0]
        if (mgr._num_evictable_cache_chunks, mgr._num_write_pending_chunks) != (len(ready0), len(pending)):
            v.append(f"R2: evictable/pending counters {(mgr._num_evictable_cache_chunks, mgr._num_write_pending_chunks)}"
                     f", the store holds {(len(ready0), len(pending))}")
        want: dict = {}
        for ld in self.loads:
            for k in ld.keys:
                want[k] = want.get(k, 0) + 1
        for k, c in entries:
            if c.is_ready and c.ref_cnt != want.get(k, 0):
                v.append(f"R1: chunk of {self.prefix_of.get(k)} ref_cnt={c.ref_cnt}, {want.get(k, 0)} loads hold it")
            if k in self.prefix_of and self.content.get(c.chunk_id) != self.prefix_of[k]:
                v.append(f"D1: chunk {c.chunk_id} stored as {self.prefix_of[k]} holds {self.content.get(c.chunk_id)}")
        if self.policy_name == "arc":
            if set(pol.t1) & set(pol.t2) or len(pol.t1) + len(pol.t2) > self.chunks:
                v.append(f"ARC: T1/T2 overlap or exceed capacity ({len(pol.t1)}+{len(pol.t2)} > {self.chunks})")
            if len(pol.b1) > self.chunks or len(pol.b2) > self.chunks:
                v.append("ARC: a ghost list exceeds capacity")
            if (set(pol.t1) | set(pol.t2)) & (set(pol.b1) | set(pol.b2)):
                v.append("ARC: a cached key is also a ghost")
            if not 0 <= pol.target_t1_size <= self.chunks:
                v.append(f"ARC: target T1 size {pol.target_t1_size} outside [0, {self.chunks}]")
        elif pol._evictable != set(ready0):
            v.append("LRU: its evictable set is not the unreferenced ready chunks")
        return v

    def close(self) -> None:
        for ld in list(self.loads):
            self.unlock(ld)

"""vLLM 0.33.0's GPU prefix cache (`KVCacheManager` over `BlockPool`, full attention) as a target.

vLLM keeps no tree. A request's prompt is cut into blocks (block size = our page size); each full
block is named by a hash chained over its parent's hash, and the pool maps hash -> block. A
block in use has ref_cnt > 0; a freed block goes to the tail of an LRU free queue and *stays
cached* until the pool hands it out again. So the mapping onto `models.abstract`:

- page prefix p is on device  <=>  some block is cached under hash(p) (group 0);
- p's lock count              =   the ref counts of its block(s): one per live request holding it;
- alloc(tokens)   = a waiting request: `get_computed_blocks` (hit) + `allocate_slots(...,
  delay_cache_blocks=True)`, which takes the hit blocks (ref +1) and pops new ones from the
  free queue head, evicting whatever cached block it pops;
- insert(tokens)  = the request's blocks are cached (`cache_blocks`) and it finishes (`free`);
- match(tokens)   = `get_computed_blocks` (a lookup: it changes nothing, recency included);
- lock / unlock   = a request holding the matched blocks (`allocate_slots` with no new tokens)
  / that request finishing (`free`);
- evict(n)        = allocation pressure: blocks popped from the free queue head until n tokens
  of cached pages are gone, then returned unhashed (as an aborted request's blocks are).

Contract differences (adapted in the mapping, written down in README.md here):
- hits are capped by the caller: the engine asks for at most len(prompt) - 1 tokens (it must
  recompute the last token for logits); the target asks for all of them, as the model does;
- recency changes only when a request *releases* blocks, never on a lookup ("lru-recency" is
  allowed: the spec's recency is not judged); the eviction order is judged instead against the
  release order this driver records (`stamps`), which is what vLLM documents;
- eviction is by block, not by leaf: a parent can be evicted before its child (the child is
  then unreachable, and the model's prefix walk stops at the same place).

Checks every step (`check`): each block's ref_cnt equals the live requests this driver holds
on it; the free queue holds exactly the unreferenced non-null blocks, once each; every hash in
the map names a block whose written contents are that hash's prefix (D1); no hash names two
prefixes (chaining); the null block is never free or cached.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch

from conformance.target import CORE_OPS, Inserted, Match, Target, TargetError, TargetInfo
from models.abstract import Model, Page, Prefix

from . import shim

# The match-only recency difference (see the module docstring); test_vllm keeps it demonstrated.
KNOWN = frozenset({"lru-recency"})
_POOLING = types.SimpleNamespace(skip_reading_prefix_cache=False)  # a request needs sampling or pooling params


@dataclass(eq=False)
class Node:
    """A match result: the device prefix it ended at."""

    prefix: Prefix


@dataclass(eq=False)
class Held:
    """A live request holding blocks: an allocation awaiting insert, or a caller lock."""

    request: object
    prefix: Prefix
    block_ids: list[int]


class VLLMPrefixCache(Target):
    """`KVCacheManager` with prefix caching, page 2: one full-attention group (8 usable blocks),
    or ("swa") a full-attention group and a sliding-window group of window 4 tokens sharing one
    pool of 12 usable blocks (the hybrid coordinator).

    Full + SWA (`vllm-prefix-swa`): page p's SWA flag is "a block of the SWA group is cached under
    hash(p)"; the model's window is vLLM's sliding_window - 1 tokens (the tokens before a hit
    position that the hit must hold). One more contract difference: when p's full KV is cached but
    not the SWA window ending at p, vLLM's usable hit stops earlier, it recomputes the rest and caches
    a second block under p's hash (BlockHashToBlockMap NOTE #1), where the model's insert finds p
    already on device. `insert` reports as cached the pages vLLM's hit covered plus those it filed
    as duplicates of an already cached block (read from its hash map after `cache_blocks`).

    Full + mamba (`vllm-prefix-mamba`, mamba_cache_mode "align"): page p's mamba flag is "a block
    of the mamba group is cached under hash(p)" (the state after exactly p). The same difference
    applies to states: past a shorter usable hit vLLM recomputes and files a second state block
    under the end page's hash even when one is cached, where the model reuses it. `insert`
    reports mamba_used as the model means it (the end page gained a state it lacked), so that
    decision is not judged independently on vLLM; that the end holds a state afterwards is.

    engine_cap (`vllm-prefix-engine`): insert asks for a hit of at most len(tokens) - 1 tokens, as
    the scheduler does (the last token is recomputed for its logits), so a fully cached prompt
    recomputes its last block and vLLM files it beside the cached one under the same hash; the
    duplicate is reported as cached, as for SWA. Matches and locks still ask for everything."""

    SWA_WINDOW = 4

    def __init__(self, attention: str = "full", page_size: int = 2, device_tokens: int | None = None,
                 engine_cap: bool = False):
        shim.load()
        from vllm.utils.hashing import sha256
        from vllm.v1.core import kv_cache_utils as ku
        from vllm.v1.core.kv_cache_manager import KVCacheManager
        from vllm.v1.kv_cache_interface import (
            FullAttentionSpec,
            KVCacheConfig,
            KVCacheGroupSpec,
            MambaSpec,
            SlidingWindowSpec,
        )
        from vllm.v1.request import Request

        self.ku, self.Request = ku, Request
        ku.init_none_hash(sha256)
        if attention not in ("full", "swa", "mamba"):
            raise ValueError(f"attention {attention!r}: 'full', 'swa' or 'mamba'")
        swa, mamba = attention == "swa", attention == "mamba"
        device_tokens = device_tokens or (16 if attention == "full" else 24)
        self.info = TargetInfo("vllm-prefix" + ("" if attention == "full" else "-" + attention), page_size=page_size,
                               device_tokens=device_tokens, ops=CORE_OPS, sidecar=None if attention == "full" else attention,
                               allow=KNOWN, notes="vLLM 0.33.0 KVCacheManager/BlockPool; see targets/vllm/README.md")
        ps = page_size
        full = FullAttentionSpec(block_size=ps, num_kv_heads=1, head_size=1, dtype=torch.float32)
        groups = [KVCacheGroupSpec(["layer0"], full)]
        if swa:
            groups.append(KVCacheGroupSpec(["layer1"], SlidingWindowSpec(
                block_size=ps, num_kv_heads=1, head_size=1, dtype=torch.float32, sliding_window=self.SWA_WINDOW)))
        if mamba:
            groups.append(KVCacheGroupSpec(["layer1"], MambaSpec(block_size=ps, shapes=((8,),), dtypes=(torch.float32,),
                                                                 mamba_cache_mode="align")))
        self.groups = len(groups)
        self.engine_cap = engine_cap  # insert asks for at most len - 1 tokens, as the scheduler does
        if engine_cap:
            self.info = TargetInfo(self.info.name + "-engine", page_size=ps, device_tokens=device_tokens, ops=CORE_OPS,
                                   sidecar=self.info.sidecar, allow=KNOWN, notes=self.info.notes)
        self.window = self.SWA_WINDOW - 1 if swa else 0
        cfg = KVCacheConfig(num_blocks=device_tokens // ps + 1, kv_cache_tensors=[], kv_cache_groups=groups)
        self.mgr = KVCacheManager(cfg, max_model_len=1024, scheduler_block_size=ps, hash_block_size=ps,
                                  enable_caching=True)
        self.pool = self.mgr.block_pool
        self.hasher = ku.get_request_block_hasher(ps, sha256)
        self.prefix_of: dict[bytes, Prefix] = {}  # block hash -> the page prefix it was computed for
        self.hash_of: dict[Prefix, bytes] = {}
        self.content: dict[int, Prefix] = {}  # block id -> the page prefix written into it (D1)
        self.held: dict[str, Held] = {}
        self.stamps: dict[Prefix, int] = {}  # page -> when a request last released it (vLLM's LRU contract)
        self.clock = 0
        self.errors: list[str] = []
        self._n = 0

    # ------------------------------------------------------------------ requests
    def _request(self, tokens: list[int]):
        self._n += 1
        r = self.Request(f"r{self._n}", list(tokens), None, _POOLING, block_hasher=self.hasher)
        ps = self.info.page_size
        for i, h in enumerate(r.block_hashes):
            p = tuple(tokens[: (i + 1) * ps])
            old = self.prefix_of.setdefault(h, p)
            if old != p:
                self.errors.append(f"H1: one block hash names two prefixes: {old} and {p}")
            self.hash_of.setdefault(p, h)
        return r

    def _hit(self, r, cap: int | None = None) -> tuple[object, int]:
        blocks, n, _ = self.mgr.get_computed_blocks(r, max_cache_hit_length=r.num_tokens if cap is None else cap)
        return blocks, n

    def _release(self, h: Held) -> None:
        self.mgr.free(h.request)
        del self.held[h.request.request_id]
        self.clock += 1
        for p in self._pages(h.prefix):
            self.stamps[p] = self.clock

    def _pages(self, tokens) -> list[Prefix]:
        ps = self.info.page_size
        return [tuple(tokens[: i + ps]) for i in range(0, len(tokens) - len(tokens) % ps, ps)]

    def _block_ids(self, r) -> list[list[int]]:
        """The request's blocks per group (null blocks as 0)."""
        return [list(g) for g in self.mgr.get_block_ids(r.request_id)]

    # -------------------------------------------------------------- the interface
    def alloc(self, tokens: list[int]) -> tuple[object, int]:
        self.mgr.new_step_starts()  # each operation is one scheduler step
        r = self._request(tokens)
        blocks, n = self._hit(r, len(tokens) - 1 if self.engine_cap else None)
        new = self.mgr.allocate_slots(r, len(tokens) - n, n, blocks, delay_cache_blocks=True)
        if new is None:
            self.mgr.free(r)
            raise TargetError(f"allocate_slots: {len(tokens) - n} tokens needed, "
                              f"{self.pool.get_num_free_blocks()} blocks free")
        ids = self._block_ids(r)
        pages = self._pages(tokens)
        for g in ids:
            for i, b in enumerate(g[n // self.info.page_size:], start=n // self.info.page_size):
                if b != 0:
                    self.content[b] = pages[i]  # the forward pass writes the new blocks
        self.held[r.request_id] = Held(r, tuple(tokens), [b for g in ids for b in g if b != 0])
        return r, n

    def insert(self, tokens: list[int], kv: tuple[object, int]) -> Inserted:
        r, n = kv
        end = self._pages(tokens)[-1]
        had = {b.block_id for b in self._cached(end, 1)} if self.info.sidecar == "mamba" else set()
        self.mgr.cache_blocks(r, len(tokens))
        ps, cached = self.info.page_size, n
        if self.groups > 1 or self.engine_cap:  # pages past the hit vLLM filed beside a cached block of that hash
            own = self.held[r.request_id].block_ids  # full-attention blocks first, one per page
            for i, p in enumerate(self._pages(tokens)[n // ps:], start=n // ps):
                ids = {b.block_id for b in self._cached(p)}
                if own[i] not in ids or len(ids) < 2:
                    break
                cached += ps
        self._release(self.held[r.request_id])
        if self.info.sidecar == "mamba":  # the end page gained a state it lacked (see the class docstring)
            return Inserted(cached, mamba_used=not had and bool(self._cached(end, 1)))
        return Inserted(cached)

    def match(self, tokens: list[int]) -> Match:
        blocks, n = self._hit(self._request(tokens))
        ps = self.info.page_size
        slots = [b * ps + i for b in (blocks.get_block_ids()[0] if n else []) for i in range(ps)]
        return Match(device_len=n, best_len=n, node=Node(tuple(tokens[:n])), device_indices=slots)

    def data_ok(self, tokens: list[int], m: Match) -> bool:
        """D1: token slot i (block * page + offset) lies in a block written with tokens' page i // page."""
        ps, pages = self.info.page_size, self._pages(tokens)
        return all(self.content.get(s // ps) == pages[i // ps] for i, s in enumerate(m.device_indices))

    def _cached(self, p: Prefix, group: int = 0) -> list:
        h = self.hash_of.get(p)
        if h is None:
            return []
        got = self.pool.cached_block_hash_to_block._cache.get(self.ku.make_block_hash_with_group_id(h, group))
        return [] if got is None else (list(got.values()) if isinstance(got, dict) else [got])

    def alive(self, node: Node) -> bool:
        """A match result stays lockable while vLLM would still hit all of it (with SWA: its
        window too); vLLM can hold nothing else, having no nodes."""
        return not node.prefix or self._hit(self._request(node.prefix))[1] == len(node.prefix)

    def node_prefix(self, node: Node) -> Prefix:
        return node.prefix

    def lock(self, node: Node) -> Held:
        if not node.prefix:
            return Held(None, (), [])
        self.mgr.new_step_starts()
        r = self._request(node.prefix)
        blocks, n = self._hit(r)
        if n == 0:
            return Held(None, (), [])
        if self.mgr.allocate_slots(r, 0, n, blocks, delay_cache_blocks=True) is None:
            raise AssertionError("allocate_slots refused a request that needs no new block")
        h = Held(r, tuple(node.prefix[:n]), [b for g in self._block_ids(r) for b in g if b != 0])
        self.held[r.request_id] = h
        return h

    def locked_prefix(self, lock: Held) -> Prefix:
        return lock.prefix

    def unlock(self, lock: Held) -> None:
        if lock.request is not None:
            self._release(lock)

    def evict(self, n: int) -> int:
        before = {p for p in self.hash_of if self._cached(p)}
        popped, lost = [], set()
        while len(lost) * self.info.page_size < n and self.pool.get_num_free_blocks() > 0:
            popped += self.pool.get_new_blocks(1)
            lost = {p for p in before if not self._cached(p)}
        for b in popped:
            self.content.pop(b.block_id, None)
        self.pool.free_blocks(popped)
        return len(lost) * self.info.page_size

    # -------------------------------------------------------------- abstraction
    def abstract(self) -> Model:
        m = Model(page_size=self.info.page_size, sidecar=self.info.sidecar, window=self.window)
        for p in self.hash_of:
            blocks = self._cached(p)
            side = self.groups > 1 and bool(self._cached(p, 1))
            if blocks or side:
                m.pages[p] = Page(dev=bool(blocks), host=False, swa=side and self.info.sidecar == "swa",
                                  mamba=side and self.info.sidecar == "mamba", lock=sum(b.ref_cnt for b in blocks),
                                  stamp=self.stamps.get(p, 0))
        return m

    def check(self) -> list[str]:
        v, self.errors = list(self.errors), []
        pool = self.pool
        want = {}
        for h in self.held.values():
            for b in h.block_ids:
                want[b] = want.get(b, 0) + 1
        for b in pool.blocks[1:]:
            if b.ref_cnt != want.get(b.block_id, 0):
                v.append(f"R1: block {b.block_id} ref_cnt={b.ref_cnt}, but {want.get(b.block_id, 0)} live requests hold it")
        free = pool.free_block_queue.get_all_free_blocks()
        ids = [b.block_id for b in free]
        if len(set(ids)) != len(ids):
            v.append(f"R1: a block is twice in the free queue: {ids}")
        unref = {b.block_id for b in pool.blocks[1:] if b.ref_cnt == 0}
        if set(ids) != unref:
            v.append(f"R1: free queue {sorted(set(ids))} is not the unreferenced blocks {sorted(unref)}")
        if len(ids) != pool.get_num_free_blocks():
            v.append(f"R1: {len(ids)} blocks in the free queue, num_free_blocks says {pool.get_num_free_blocks()}")
        if pool.null_block.block_id in ids or pool.null_block.block_hash is not None:
            v.append("R1: the null block is free or cached")
        for key, got in pool.cached_block_hash_to_block._cache.items():
            blocks = list(got.values()) if isinstance(got, dict) else [got]
            h = self.ku.get_block_hash(key)
            p = self.prefix_of.get(h)
            for b in blocks:
                if b.block_hash != key:
                    v.append(f"R1: block {b.block_id} is cached under a hash it does not carry")
                if p is None or self.content.get(b.block_id) != p:
                    v.append(f"D1: block {b.block_id} cached as {p} holds {self.content.get(b.block_id)}")
        return v

    def close(self) -> None:
        for h in list(self.held.values()):
            if h.request is not None:
                self.mgr.free(h.request)
        self.held.clear()


def engine_capped() -> VLLMPrefixCache:
    """`vllm-prefix-engine`: full attention, insert's hit capped at len - 1 as the scheduler asks."""
    return VLLMPrefixCache(engine_cap=True)

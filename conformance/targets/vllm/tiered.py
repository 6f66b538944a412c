"""vLLM 0.33.0's GPU prefix cache with its CPU offloading tier behind it, as `OffloadingConnector`
drives them: a two-tier target (the model's device tier = `KVCacheManager`, its host tier =
`CPUOffloadingManager` with LRU).

- insert(tokens)    = the GPU request (as in `vllm-prefix`), then the connector's store of the
  request's blocks to CPU (`prepare_store` / `complete_store`: every computed block is offered,
  the store keeps what it can make room for): write-through;
- match(tokens)     = the GPU hit (`get_computed_blocks`), then the connector's CPU lookups from
  there on (its `get_num_new_matched_tokens`): device length, and the host-extended length;
- load_back(tokens) = a request scheduled with those external tokens: `allocate_slots(...,
  num_external_computed_tokens=..., delay_cache_blocks=True)` takes GPU blocks for them (None:
  declined), `prepare_load` pins the CPU chunks, the copy lands (this driver copies the chunk's
  contents into the GPU block, as the worker would), `complete_load`, the blocks are cached
  (`cache_blocks`) and the request finishes;
- evict(n)          = GPU allocation pressure, as in `vllm-prefix` (the CPU store evicts on its
  own when a store needs room: the machine lets a host tier do that at any step).

Checks: both sides' own checks (`vllm-prefix`'s and `vllm-offload-lru`'s), plus D1 across the
copy: a loaded GPU block holds what its CPU chunk held.
"""

from __future__ import annotations

from conformance.target import CORE_OPS, Inserted, Match, TargetError, TargetInfo
from models.abstract import Model, Page

from .block_pool import KNOWN, Held, VLLMPrefixCache
from .offload import VLLMOffload


class VLLMTiered(VLLMPrefixCache):
    """8 usable GPU blocks, 12 CPU chunks, page 2."""

    def __init__(self, host_chunks: int = 12):
        super().__init__("full")
        self.host = VLLMOffload("lru", page_size=self.info.page_size, chunks=host_chunks)
        self.info = TargetInfo("vllm-tiered", page_size=self.info.page_size, device_tokens=self.info.device_tokens,
                               host=True, ops=CORE_OPS | {"load_back"}, allow=KNOWN,
                               notes="vLLM 0.33.0 KVCacheManager + CPUOffloadingManager (LRU), write-through")

    def insert(self, tokens: list[int], kv: tuple[object, int]) -> Inserted:
        got = super().insert(tokens, kv)
        try:  # the connector offloads the request's blocks once computed
            self.host.insert(tokens, self.host.alloc(tokens))
        except TargetError:
            pass  # the CPU store could not make room: those blocks are not backed up
        return got

    def _host_run(self, tokens, start_page: int) -> int:
        """CPU hits from page `start_page` on, as the connector looks them up."""
        keys = self.host._keys(tokens)[start_page:]
        return self.host._hits(keys)

    def match(self, tokens: list[int]) -> Match:
        m = super().match(tokens)
        ps = self.info.page_size
        h = self._host_run(tokens, m.device_len // ps) * ps
        return Match(device_len=m.device_len, best_len=m.device_len + h, node=m.node, device_indices=m.device_indices,
                     last_host_len=m.device_len + h, host_hit=h)

    def load_back(self, tokens: list[int]) -> int | None:
        ps = self.info.page_size
        self.mgr.new_step_starts()
        r = self._request(tokens)
        blocks, n = self._hit(r)
        h = self._host_run(tokens, n // ps)
        if h == 0:
            return n
        ext = h * ps
        r = self._request(tokens[: n + ext])  # the request stops where the external hit does
        blocks, n2 = self._hit(r)
        if n2 != n:
            raise AssertionError(f"a second lookup of the same prefix hit {n2}, the first {n}")
        if self.mgr.allocate_slots(r, 0, n, blocks, num_external_computed_tokens=ext, delay_cache_blocks=True) is None:
            return None
        ids = self._block_ids(r)[0]
        keys = self.host._keys(tokens)[n // ps: n // ps + h]
        ctx = self.host._ctx(keys)
        spec = self.host.mgr.prepare_load(keys, ctx)
        for b, c in zip(ids[n // ps:], spec.block_ids.tolist(), strict=True):
            self.content[b] = self.host.content.get(int(c))  # the worker copies CPU chunk -> GPU block
        self.host.mgr.complete_load(keys, ctx)
        self.host._finish(ctx, self._pages(tokens[: n + ext]))
        self.held[r.request_id] = self._held(r, tuple(tokens[: n + ext]))
        self.mgr.cache_blocks(r, n + ext)
        self._release(self.held[r.request_id])
        return self._hit(self._request(tokens))[1]

    def _held(self, r, prefix) -> Held:
        return Held(r, prefix, [b for g in self._block_ids(r) for b in g if b != 0])

    def abstract(self) -> Model:
        m = super().abstract()
        for p, g in self.host.abstract().pages.items():
            d = m.pages.get(p)
            m.pages[p] = Page(dev=bool(d and d.dev), host=True, lock=d.lock if d else 0, host_ref=g.lock,
                              stamp=d.stamp if d else 0)
        return m

    def check(self) -> list[str]:
        return super().check() + [f"host: {x}" for x in self.host.check()]

    def close(self) -> None:
        super().close()
        self.host.close()

"""Deterministic page contents, so any tier can be checked byte-for-byte after any path.

A page's KV is a function of (its chain hash, layer, k/v, position, head, dim); a mamba state
is a function of the chain hash of the prefix it ends. Values are multiples of 1/128 in
[-0.5, 0.5), exactly representable in fp16, bf16 and fp32, so comparisons are exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

import torch

from .pages import ROOT_HASH, page_hashes

if TYPE_CHECKING:
    from .cache import HiCache
    from .node import TreeNode


def _mix(hashes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h = torch.tensor([x & ((1 << 62) - 1) for x in hashes], dtype=torch.int64)
    return h % 127, (h >> 7) % 127, (h >> 14) % 127


def expected_pages(hashes: Sequence[int], num_layers: int, page_size: int, num_heads: int,
                   head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """KV of the pages with chain hashes `hashes`: [pages, layers, 2, page_size, heads, dim]."""
    a, b, c = (t.view(-1, 1, 1, 1, 1, 1) for t in _mix(hashes))
    ar = torch.arange
    lay = ar(num_layers).view(1, -1, 1, 1, 1, 1)
    kv = ar(2).view(1, 1, -1, 1, 1, 1)
    pos = ar(page_size).view(1, 1, 1, -1, 1, 1)
    head = ar(num_heads).view(1, 1, 1, 1, -1, 1)
    dim = ar(head_dim).view(1, 1, 1, 1, 1, -1)
    v = (a + b * (pos + 1) + c * (lay + 1) + 17 * kv + 11 * head + 3 * dim) % 127
    return (v.to(torch.float32) / 128 - 0.5).to(dtype)


def expected_state(prefix_hash: int, state_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Mamba state for the prefix whose last page has chain hash `prefix_hash`."""
    a, b, c = _mix([prefix_hash])
    v = (a + b * (torch.arange(state_dim) + 1) + c * 5) % 127
    return (v.to(torch.float32) / 128 - 0.5).to(dtype)


@lru_cache(maxsize=4096)
def _expected_cached(hashes: tuple[int, ...], geometry: tuple) -> torch.Tensor:
    """Checks recompute the same pages thousands of times a second; they are pure, so keep them."""
    return expected_pages(hashes, *geometry)


@lru_cache(maxsize=4096)
def _expected_state_cached(prefix_hash: int, state_dim: int, dtype: torch.dtype) -> torch.Tensor:
    return expected_state(prefix_hash, state_dim, dtype)


def _expected_for(cache: HiCache, hashes: Sequence[int]) -> torch.Tensor:
    """Read-only expected pages (shared between calls: never write into the result)."""
    c = cache.config
    return _expected_cached(tuple(hashes), (c.num_layers, c.page_size, c.num_heads, c.head_dim, c.dtype))


def write_request(cache: HiCache, tokens: Sequence[int], evict: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What a model forward would do: allocate L1 slots (and a mamba slot) for `tokens` and
    write their KV (and the final state). Returns (device_indices, mamba_slot)."""
    hashes = page_hashes(ROOT_HASH, list(tokens), cache.page_size)
    idx = cache.alloc_device(len(tokens), evict=evict)
    if hashes:
        cache.device_kv.write_pages(idx, _expected_for(cache, hashes))
    slot = None
    if cache.config.has("mamba"):
        try:
            slot = cache.alloc_mamba(evict=evict)
        except Exception:
            cache.free_device(idx)
            raise
        end = hashes[-1] if hashes else ROOT_HASH
        cache.device_state.data[slot] = expected_state(end, cache.config.mamba_state_dim,
                                                       cache.config.dtype).to(cache.device_state.data.device)
    return idx, slot


def pages_ok(cache: HiCache, tokens: Sequence[int], device_indices: torch.Tensor) -> bool:
    """Whether `device_indices` hold the KV written for the first len(indices) tokens."""
    n = device_indices.numel()
    if n == 0:
        return True
    hashes = page_hashes(ROOT_HASH, list(tokens[:n]), cache.page_size)
    got = cache.device_kv.read_pages(device_indices).cpu()
    return torch.equal(got, _expected_for(cache, hashes))


def node_data_ok(cache: HiCache, node: TreeNode) -> tuple[bool, bool, bool]:
    """(L1 pages right, L2 pages right, mamba states right) for one node."""
    want = None
    dev_ok = host_ok = state_ok = True
    if node.value is not None or node.host_value is not None:
        want = _expected_for(cache, node.hashes)
    if node.value is not None:
        dev_ok = torch.equal(cache.device_kv.read_pages(node.value).cpu(), want)
    if node.host_value is not None:
        host_ok = torch.equal(cache.host_kv.read_pages(node.host_value).cpu(), want)
    if node.mamba_value is not None or node.mamba_host is not None:
        ws = _expected_state_cached(node.hashes[-1], cache.config.mamba_state_dim, cache.config.dtype)
        if node.mamba_value is not None:
            state_ok = torch.equal(cache.device_state.data[node.mamba_value.long()].view(-1).cpu(), ws)
        if node.mamba_host is not None:
            hi = node.mamba_host.host_indices.long().cpu()
            state_ok = state_ok and torch.equal(cache.host_state.data[hi].view(-1), ws)
    return dev_ok, host_ok, state_ok

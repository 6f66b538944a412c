"""The data side of the oracle: write what a forward pass would, and read every tier back.

Contents come from the specification (`models.contents`: a function of the token prefix), never
from the cache's hashes. Pools are read and written through their documented layouts with plain
tensor indexing (L1: [layers, 2, slots, heads, dim]; L2: [pages, layers, 2, page_size, heads,
dim]), not through the cache's copy kernels, so a gather/scatter bug cannot cancel itself out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from models.contents import Geometry, page_kv, pages_kv, state
from refcache import HiCache
from refcache.snapshot import Snapshot


def geometry(cache: HiCache) -> Geometry:
    c = cache.config
    return Geometry(c.num_layers, c.page_size, c.num_heads, c.head_dim, c.dtype)


def _slots(slots, device) -> torch.Tensor:
    return torch.as_tensor(list(slots) if not isinstance(slots, torch.Tensor) else slots, dtype=torch.int64).to(device)


def read_device(cache: HiCache, slots) -> torch.Tensor:
    """L1 pages at `slots` (whole pages) as [pages, layers, 2, ps, heads, dim], on the CPU."""
    data = cache.device_kv.data
    ps = cache.page_size
    x = data[:, :, _slots(slots, data.device)]  # [layers, 2, n, heads, dim]
    layers, _, n, heads, dim = x.shape
    return x.view(layers, 2, n // ps, ps, heads, dim).permute(2, 0, 1, 3, 4, 5).cpu()


def read_host(cache: HiCache, slots) -> torch.Tensor:
    """L2 pages at `slots` (whole pages) as [pages, layers, 2, ps, heads, dim]."""
    data = cache.host_kv.data
    s = _slots(slots, data.device)
    return data[s[:: cache.page_size] // cache.page_size].cpu()


def write_device(cache: HiCache, slots: torch.Tensor, pages: torch.Tensor) -> None:
    data = cache.device_kv.data
    layers, _, _, heads, dim = data.shape
    vals = pages.permute(1, 2, 0, 3, 4, 5).reshape(layers, 2, -1, heads, dim)
    data[:, :, _slots(slots, data.device)] = vals.to(data.device, data.dtype)


def write_request(cache: HiCache, tokens: Sequence[int], evict: bool = True) -> torch.Tensor:
    """A forward pass's KV: allocate L1 slots for `tokens` (maybe evicting) and write the pages
    the specification says these tokens hold. Raises what `alloc_device` raises."""
    # evicting is the documented default: call it bare, so a changed default shows
    idx = cache.alloc_device(len(tokens)) if evict else cache.alloc_device(len(tokens), evict=False)
    if len(tokens):
        write_device(cache, idx, pages_kv(tuple(tokens), geometry(cache)))
    return idx


def write_state(cache: HiCache, tokens: Sequence[int], evict: bool = True) -> torch.Tensor:
    """A forward pass's final recurrent state: one L1 mamba slot holding the state of `tokens`."""
    slot = cache.alloc_mamba() if evict else cache.alloc_mamba(evict=False)  # the default evicts
    c = cache.config
    data = cache.device_state.data
    data[int(slot.view(-1)[0])] = state(tuple(tokens), c.mamba_state_dim, c.dtype).to(data.device)
    return slot


def served_ok(cache: HiCache, tokens: Sequence[int], device_indices: torch.Tensor) -> bool:
    """The L1 slots a match served hold the pages of `tokens[:len(device_indices)]`."""
    n = int(device_indices.numel())
    if not n:
        return True
    return torch.equal(read_device(cache, device_indices), pages_kv(tuple(tokens[:n]), geometry(cache)))


def prefixes(snap: Snapshot) -> dict[int, tuple[int, ...]]:
    """Token prefix each attached node ends, from the snapshot's keys alone."""
    out = {snap.root: ()}
    order = [snap.root]
    for nid in order:
        for _, c in snap.nodes[nid].children:
            if c in snap.nodes:
                out[c] = out[nid] + snap.nodes[c].key
                order.append(c)
    return out


def data_errors(cache: HiCache, snap: Snapshot) -> list[str]:
    """D1 by the specification: every L1 and L2 page, and every mamba state, of every node holds
    what its token prefix must hold."""
    g = geometry(cache)
    ps = g.page_size
    errs: list[str] = []
    dev_slots, dev_want, host_slots, host_want, where_dev, where_host = [], [], [], [], [], []
    for nid, prefix in prefixes(snap).items():
        n = snap.nodes[nid]
        if n.parent is None:
            continue
        first = len(prefix) - len(n.key)
        pages = [prefix[: first + i] for i in range(ps, len(n.key) + 1, ps)]
        want = [page_kv(q, g) for q in pages]
        if n.device is not None:
            dev_slots += n.device
            dev_want += want
            where_dev += pages
        if n.host is not None:
            host_slots += n.host
            host_want += want
            where_host += pages
        c = cache.config
        if n.mamba is not None and not torch.equal(
                cache.device_state.data[n.mamba].cpu(), state(prefix, c.mamba_state_dim, c.dtype)):
            errs.append(f"D1: {prefix}: the L1 mamba state is not the state of this prefix")
        if n.mamba_host is not None and not torch.equal(
                cache.host_state.data[n.mamba_host].cpu(), state(prefix, c.mamba_state_dim, c.dtype)):
            errs.append(f"D1: {prefix}: the L2 mamba state is not the state of this prefix")
    for tier, slots, want, where, read in (("L1", dev_slots, dev_want, where_dev, read_device),
                                           ("L2", host_slots, host_want, where_host, read_host)):
        if not slots:
            continue
        got = read(cache, slots)
        want_t = torch.stack(want)
        if not torch.equal(got, want_t):
            bad = [i for i in range(len(want)) if not torch.equal(got[i], want_t[i])]
            errs += [f"D1: {where[i]}: its {tier} page does not hold the bytes of this prefix" for i in bad[:3]]
    return errs

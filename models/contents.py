"""What every cached page must hold: bytes that are a function of the token prefix it ends.

Data identity is part of the specification, not of the cache: a page's expected KV, and the
recurrent state of a prefix, are derived here from the tokens themselves (a digest of the whole
prefix), with no help from the cache's chain hash. A cache whose hash collides, ignores the
parent page, or serves another prefix's page therefore fails the comparison, even though its
own bookkeeping agrees with itself. Values are multiples of 1/128 in [-0.5, 0.5), exact in
fp16, bf16 and fp32, so comparisons are exact.
"""

from __future__ import annotations

import hashlib
import struct
from functools import lru_cache
from typing import NamedTuple

import torch

Prefix = tuple[int, ...]


class Geometry(NamedTuple):
    """Shape of one KV page: [layers, 2 (k, v), page_size, heads, head_dim] in `dtype`."""

    num_layers: int
    page_size: int
    num_heads: int
    head_dim: int
    dtype: torch.dtype


def prefix_digest(prefix: Prefix) -> tuple[int, int, int, int]:
    """Four small numbers drawn from a SHA-256 of every token of `prefix` (order and length
    included), so two different prefixes almost surely get different contents."""
    d = hashlib.sha256(struct.pack(f"<q{len(prefix)}q", len(prefix), *prefix)).digest()
    return d[0] % 128, 1 + d[1] % 127, 1 + d[2] % 127, 1 + d[3] % 127


@lru_cache(maxsize=8192)
def page_kv(prefix: Prefix, geometry: Geometry) -> torch.Tensor:
    """KV of the last page of `prefix`: [layers, 2, page_size, heads, head_dim] (read-only)."""
    a, b, c, e = prefix_digest(prefix)
    g = geometry
    ar = torch.arange
    lay = ar(g.num_layers).view(-1, 1, 1, 1, 1)
    kv = ar(2).view(1, -1, 1, 1, 1)
    pos = ar(g.page_size).view(1, 1, -1, 1, 1)
    head = ar(g.num_heads).view(1, 1, 1, -1, 1)
    dim = ar(g.head_dim).view(1, 1, 1, 1, -1)
    v = (a + b * pos + c * lay + e * (kv + 2 * head) + 5 * dim) % 128
    return (v.to(torch.float32) / 128 - 0.5).to(g.dtype)


def pages_kv(tokens: Prefix, geometry: Geometry, start_page: int = 0) -> torch.Tensor:
    """KV of every page of `tokens` from page `start_page` on: [pages, layers, 2, ps, heads, dim]."""
    ps = geometry.page_size
    ends = range((start_page + 1) * ps, len(tokens) - len(tokens) % ps + 1, ps)
    pages = [page_kv(tuple(tokens[:end]), geometry) for end in ends]
    if not pages:
        return torch.empty((0, geometry.num_layers, 2, ps, geometry.num_heads, geometry.head_dim), dtype=geometry.dtype)
    return torch.stack(pages)


@lru_cache(maxsize=4096)
def state(prefix: Prefix, state_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """The recurrent (mamba) state valid for exactly `prefix` (read-only)."""
    a, b, c, _ = prefix_digest(prefix)
    v = (a + b * torch.arange(state_dim) + 3 * c) % 128
    return (v.to(torch.float32) / 128 - 0.5).to(dtype)

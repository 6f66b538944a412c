"""Pure helpers over token pages: alignment, matching, splitting, chain hashing, prefetch length.

These carry no state and no tensors, which is what lets CrossHair check their contracts.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

ROOT_HASH = 0
"""Chain hash of the (empty) root prefix."""

_MASK63 = (1 << 63) - 1


def page_align(n_tokens: int, page_size: int) -> int:
    """Largest multiple of `page_size` that is <= `n_tokens` (0 for negative input).

    pre: page_size > 0
    post: 0 <= __return__ <= max(n_tokens, 0)
    post: __return__ % page_size == 0
    post: max(n_tokens, 0) - __return__ < page_size
    """
    if n_tokens <= 0:
        return 0
    return n_tokens - n_tokens % page_size


def is_page_aligned(n_tokens: int, page_size: int) -> bool:
    """True when `n_tokens` is a whole, non-negative number of pages."""
    return n_tokens >= 0 and n_tokens % page_size == 0


def match_length(a: Sequence[int], b: Sequence[int], page_size: int) -> int:
    """Number of leading tokens `a` and `b` share, counted in whole pages.

    pre: page_size > 0
    post: __return__ % page_size == 0
    post: 0 <= __return__ <= min(len(a), len(b))
    post: list(a[:__return__]) == list(b[:__return__])
    """
    n = min(len(a), len(b))
    n -= n % page_size
    ta = a if isinstance(a, tuple) else tuple(a)
    tb = b if isinstance(b, tuple) else tuple(b)
    if ta[:n] == tb[:n]:  # the common case in a tree walk: one comparison in C
        return n
    i = 0
    while i < n and ta[i : i + page_size] == tb[i : i + page_size]:
        i += page_size
    return i


def edge_match(edge: tuple[int, ...], key: tuple[int, ...], pos: int, page_size: int) -> int:
    """`match_length(edge, key[pos:], page_size)` without copying the rest of `key`: a tree walk
    usually matches whole edges, which one slice of the edge's length settles.

    pre: page_size > 0
    pre: 0 <= pos <= len(key)
    post: __return__ == match_length(edge, key[pos:], page_size)
    """
    if key[pos : pos + len(edge)] == edge:
        n = len(edge)
        return n - n % page_size
    return match_length(edge, key[pos:], page_size)


def split_key(key: Sequence[int], at: int, page_size: int) -> tuple[Sequence[int], Sequence[int]]:
    """Split `key` into (head, tail) at token offset `at`, which must fall on a page boundary
    strictly inside the key.

    pre: page_size > 0
    pre: 0 < at < len(key)
    pre: at % page_size == 0
    post: len(__return__[0]) == at
    post: list(__return__[0]) + list(__return__[1]) == list(key)
    """
    if not (0 < at < len(key)) or at % page_size:
        raise ValueError(f"split offset {at} is not a page boundary inside a key of {len(key)}")
    return key[:at], key[at:]


def chain_hash(parent_hash: int, page_tokens: Sequence[int]) -> int:
    """Hash of one page given its parent page's hash: equal pages under different prefixes
    get different hashes, which is what makes the hash a safe L3 key."""
    payload = struct.pack(f"<q{len(page_tokens)}q", parent_hash, *page_tokens)
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little") & _MASK63


def page_hashes(parent_hash: int, tokens: Sequence[int], page_size: int) -> list[int]:
    """Chain hashes of every page of `tokens` (a whole number of pages) under `parent_hash`."""
    out: list[int] = []
    h = parent_hash
    for i in range(0, len(tokens), page_size):
        h = chain_hash(h, tokens[i : i + page_size])
        out.append(h)
    return out


def prefetch_length(requested: int, host_available: int, page_size: int, threshold: int) -> int:
    """Tokens a prefetch may fetch when the host pool can only give `host_available` tokens.

    The request is truncated to what fits, page-aligned; below `threshold` the prefetch is not
    worth starting and the answer is 0. (Bug class 2: giving up whenever the full request does
    not fit loses every partial hit.)

    pre: page_size > 0
    pre: threshold >= 0
    post: 0 <= __return__ <= max(requested, 0)
    post: __return__ % page_size == 0
    post: __return__ == 0 or __return__ >= threshold
    post: __return__ <= max(host_available, 0)
    post: (page_align(min(requested, host_available), page_size) >= max(threshold, 1)) == (__return__ > 0)
    """
    n = page_align(min(requested, host_available), page_size)
    if n < max(threshold, 1):
        return 0
    return n

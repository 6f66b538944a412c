"""Implementations under test, each carrying the contract of the refcache.pages function it stands
for (CrossHair reads contracts from the source, so the lines are repeated here; a test checks
they are exactly the originals').

- `prefetch_length_gives_up`: bug class 2 (stateful_tests.seeded_bugs.prefetch_length_gives_up)
  under `refcache.pages.prefetch_length`'s contract: CrossHair must find the counterexample.
- `chain_hash_distinguishes_parents` / `..._mutant`: a page's chain hash depends on its parent's
  (the "chain hash ignoring the parent" bug of DESIGN §4): no counterexample for the real
  `chain_hash`, one at once for the mutant.
"""

from __future__ import annotations

from collections.abc import Sequence

from refcache.pages import chain_hash, page_align

try:
    from stateful_tests.seeded_bugs import prefetch_length_gives_up as _gives_up_impl
except ImportError:  # the seeded bug's own module is the reference; this is the same rule
    def _gives_up_impl(requested: int, host_available: int, page_size: int, threshold: int) -> int:
        n = page_align(requested, page_size)
        return n if n >= max(threshold, 1) and requested <= host_available else 0


def prefetch_length_gives_up(requested: int, host_available: int, page_size: int, threshold: int) -> int:
    """Bug class 2: the whole prefetch is abandoned when the request does not fit.

    pre: page_size > 0
    pre: threshold >= 0
    post: 0 <= __return__ <= max(requested, 0)
    post: __return__ % page_size == 0
    post: __return__ == 0 or __return__ >= threshold
    post: __return__ <= max(host_available, 0)
    post: (page_align(min(requested, host_available), page_size) >= max(threshold, 1)) == (__return__ > 0)
    """
    return _gives_up_impl(requested, host_available, page_size, threshold)


def _chain_hash_ignoring_parent(parent_hash: int, page_tokens: Sequence[int]) -> int:
    return chain_hash(0, page_tokens)


def chain_hash_distinguishes_parents(parent_a: int, parent_b: int, token: int) -> bool:
    """The same page under two different parents gets two different chain hashes.

    pre: parent_a != parent_b
    pre: 0 <= parent_a < 2**62 and 0 <= parent_b < 2**62
    pre: -2**62 < token < 2**62
    post: __return__
    """
    return chain_hash(parent_a, [token, token]) != chain_hash(parent_b, [token, token])


def chain_hash_distinguishes_parents_mutant(parent_a: int, parent_b: int, token: int) -> bool:
    """The same property for a chain hash that ignores its parent.

    pre: parent_a != parent_b
    pre: 0 <= parent_a < 2**62 and 0 <= parent_b < 2**62
    pre: -2**62 < token < 2**62
    post: __return__
    """
    return _chain_hash_ignoring_parent(parent_a, [token, token]) != _chain_hash_ignoring_parent(parent_b, [token, token])

"""The fast input checks on insert/match agree with their plain definitions.

`PageAllocator.pages_of` checks slots with one byte comparison, token keys are checked by
`struct.pack`, and tree walks compare whole edges with `edge_match`: each must accept, return and
refuse (with the same message) exactly what the straightforward version does.
"""

from __future__ import annotations

from array import array

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from refcache import InvalidIndicesError, InvalidKeyError
from refcache.cache import _check_int64
from refcache.pages import edge_match, match_length
from refcache.pools import PageAllocator


def plain_pages_of(alloc: PageAllocator, indices: torch.Tensor) -> list[int]:
    """The definition: every row is one aligned page (first error wins), then every page in range."""
    ps = alloc.page_size
    rows = indices.numpy().reshape(-1, ps)
    for row in rows.tolist():
        if row[0] % ps or row != list(range(row[0], row[0] + ps)):
            raise InvalidIndicesError(f"{alloc.name}: slots {row} are not one aligned page")
    pages = [row[0] // ps for row in rows.tolist()]
    for p in pages:
        if not 0 <= p < alloc.capacity // ps:
            raise InvalidIndicesError(f"{alloc.name}: slot {p * ps} out of range [0, {alloc.capacity})")
    return pages


def outcome(fn, *args):
    try:
        return "ok", fn(*args)
    except InvalidIndicesError as e:
        return "refused", str(e)


@st.composite
def slot_lists(draw):
    ps = draw(st.sampled_from([1, 2, 4, 16]))
    n_pages = draw(st.integers(1, 6))
    pages = draw(st.lists(st.integers(-2, n_pages + 1), max_size=5))
    slots = [p * ps + o for p in pages for o in range(ps)]
    if slots and draw(st.booleans()):  # one slot nudged: unaligned, repeated or out of order
        i = draw(st.integers(0, len(slots) - 1))
        slots[i] += draw(st.sampled_from([-1, 1, ps, -ps]))
    return ps, n_pages, slots


@given(slot_lists())
def test_pages_of_agrees_with_definition(case):
    """pages_of returns the same pages, or refuses with the same message, as the plain definition."""
    ps, n_pages, slots = case
    alloc = PageAllocator("L1 KV", n_pages * ps, ps, torch.device("cpu"))
    idx = torch.tensor(slots, dtype=torch.int64)
    assert outcome(alloc.pages_of, idx) == outcome(plain_pages_of, alloc, idx)


def test_pages_of_examples():
    """Concrete refusals: unaligned, a gap inside a page, negative, past the end; strided input is read as values."""
    alloc = PageAllocator("L1 KV", 16, 4, torch.device("cpu"))
    t = lambda *s: torch.tensor(s, dtype=torch.int64)  # noqa: E731
    assert alloc.pages_of(t(4, 5, 6, 7, 0, 1, 2, 3)) == [1, 0]
    assert alloc.pages_of(t(0, 9, 1, 9, 2, 9, 3, 9)[::2]) == [0]  # a strided view
    for bad, msg in [(t(1, 2, 3, 4), "not one aligned page"), (t(0, 1, 3, 2), "not one aligned page"),
                     (t(-4, -3, -2, -1), "out of range"), (t(16, 17, 18, 19), "out of range"),
                     (t(12, 13, 14, 15, 16, 17, 18, 19), "out of range")]:
        with pytest.raises(InvalidIndicesError, match=msg):
            alloc.pages_of(bad)
    assert alloc.pages_of(t()) == []


@pytest.mark.parametrize("tokens", [[1, 2], [True, 5], [np.int64(3), 4], [2**63 - 1, -(2**63)], [],
                                    [1.0], [2**63], [-(2**63) - 1], ["a"], [None], [1, 2.5], [np.float64(1)]])
def test_token_check_matches_array(tokens):
    """_check_int64 accepts exactly what array('q') accepts, and refuses with its message."""
    def via(fn):
        try:
            fn(tuple(tokens))
            return "ok"
        except (TypeError, OverflowError) as e:
            return type(e).__name__, str(e)

    assert via(_check_int64) == via(lambda k: array("q", k))


def test_key_refusal_leaves_message(make_cache):
    """A bad token is named in the InvalidKeyError as array('q') names it."""
    cache = make_cache()
    with pytest.raises(InvalidKeyError, match="int too big to convert"):
        cache.match_prefix([1, 2, 3, 2**64])


tokens = st.lists(st.integers(0, 3), max_size=24)


@given(tokens, tokens, st.integers(0, 24), st.sampled_from([1, 2, 4]))
def test_edge_match_is_match_length_at_offset(edge, key, pos, ps):
    """edge_match(edge, key, pos) == match_length(edge, key[pos:]) for every offset."""
    pos = min(pos, len(key))
    assert edge_match(tuple(edge), tuple(key), pos, ps) == match_length(edge, key[pos:], ps)

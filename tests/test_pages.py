"""Pure page helpers of `refcache.pages`: properties (Hypothesis) plus concrete examples."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from refcache.pages import (
    ROOT_HASH,
    chain_hash,
    is_page_aligned,
    match_length,
    page_align,
    page_hashes,
    prefetch_length,
    split_key,
)

page_sizes = st.integers(min_value=1, max_value=16)
ints = st.integers(min_value=-1000, max_value=1000)
tokens = st.lists(st.integers(min_value=0, max_value=5), max_size=40)
hashes = st.integers(min_value=0, max_value=(1 << 63) - 1)


# ------------------------------------------------------------------------------ page_align
@given(ints, page_sizes)
def test_page_align_is_largest_aligned_not_above(n, ps):
    """page_align returns the largest multiple of page_size that is <= n (0 for negatives)."""
    r = page_align(n, ps)
    assert r % ps == 0
    assert 0 <= r <= max(n, 0)
    assert max(n, 0) - r < ps


@pytest.mark.parametrize("n,ps,want", [(0, 4, 0), (3, 4, 0), (4, 4, 4), (7, 4, 4), (8, 4, 8), (-5, 4, 0), (5, 1, 5)])
def test_page_align_examples(n, ps, want):
    """page_align on concrete values around page boundaries."""
    assert page_align(n, ps) == want


@given(ints, page_sizes)
def test_page_align_idempotent(n, ps):
    """Aligning an already aligned count changes nothing."""
    assert page_align(page_align(n, ps), ps) == page_align(n, ps)


# -------------------------------------------------------------------------- is_page_aligned
@given(ints, page_sizes)
def test_is_page_aligned_matches_definition(n, ps):
    """is_page_aligned is exactly 'non-negative and a multiple of page_size'."""
    assert is_page_aligned(n, ps) == (n >= 0 and n % ps == 0)
    if n >= 0:
        assert is_page_aligned(n, ps) == (page_align(n, ps) == n)


@pytest.mark.parametrize("n,ps,want", [(0, 4, True), (4, 4, True), (6, 4, False), (-4, 4, False), (3, 1, True)])
def test_is_page_aligned_examples(n, ps, want):
    """is_page_aligned on concrete values, including zero and negative multiples."""
    assert is_page_aligned(n, ps) is want


# ----------------------------------------------------------------------------- match_length
@given(tokens, tokens, page_sizes)
def test_match_length_properties(a, b, ps):
    """match_length is page-aligned, bounded, a common prefix, and maximal in whole pages."""
    m = match_length(a, b, ps)
    assert m % ps == 0
    assert 0 <= m <= min(len(a), len(b))
    assert list(a[:m]) == list(b[:m])
    nxt = m + ps
    if nxt <= min(len(a), len(b)):
        assert list(a[m:nxt]) != list(b[m:nxt]), "one more whole page also matched"


@given(tokens, page_sizes)
def test_match_length_self_is_aligned_length(a, ps):
    """A sequence matches itself over its page-aligned length."""
    assert match_length(a, a, ps) == page_align(len(a), ps)


@given(tokens, tokens, page_sizes)
def test_match_length_symmetric(a, b, ps):
    """match_length does not depend on argument order."""
    assert match_length(a, b, ps) == match_length(b, a, ps)


def test_match_length_examples():
    """A mismatch inside a page discards the whole page; a partial trailing page never counts."""
    assert match_length([1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 0, 8], 4) == 4
    assert match_length([1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6], 4) == 4
    assert match_length([1, 2, 3, 4], [9, 2, 3, 4], 4) == 0
    assert match_length([], [1, 2, 3, 4], 4) == 0
    assert match_length((1, 2, 3), [1, 2, 3], 1) == 3


# -------------------------------------------------------------------------------- split_key
@given(st.data(), page_sizes, st.integers(min_value=2, max_value=8))
def test_split_key_roundtrip(data, ps, n_pages):
    """split_key at an inner page boundary gives a head of that length and concatenates back."""
    key = tuple(data.draw(st.lists(st.integers(0, 9), min_size=n_pages * ps, max_size=n_pages * ps)))
    at = data.draw(st.integers(min_value=1, max_value=n_pages - 1)) * ps
    head, tail = split_key(key, at, ps)
    assert len(head) == at
    assert len(tail) == len(key) - at
    assert tuple(head) + tuple(tail) == key


@given(st.integers(min_value=-3, max_value=20), page_sizes)
def test_split_key_rejects_bad_offsets(at, ps):
    """split_key raises ValueError unless the offset is a page boundary strictly inside the key."""
    key = tuple(range(3 * ps))
    ok = 0 < at < len(key) and at % ps == 0
    if ok:
        head, tail = split_key(key, at, ps)
        assert tuple(head) + tuple(tail) == key
    else:
        with pytest.raises(ValueError):
            split_key(key, at, ps)


def test_split_key_examples():
    """Concrete splits; offsets 0, len(key) and mid-page are refused."""
    assert split_key((1, 2, 3, 4, 5, 6, 7, 8), 4, 4) == ((1, 2, 3, 4), (5, 6, 7, 8))
    for bad in (0, 8, 2, 6, -4):
        with pytest.raises(ValueError):
            split_key((1, 2, 3, 4, 5, 6, 7, 8), bad, 4)


# ------------------------------------------------------------------------------- chain_hash
@given(hashes, st.lists(st.integers(0, 1000), min_size=1, max_size=8))
def test_chain_hash_deterministic_and_63_bit(parent, page):
    """chain_hash is a pure function of its inputs and fits in 63 bits (non-negative int64)."""
    h = chain_hash(parent, page)
    assert h == chain_hash(parent, list(page)) == chain_hash(parent, tuple(page))
    assert 0 <= h < (1 << 63)


@given(hashes, hashes, st.lists(st.integers(0, 1000), min_size=1, max_size=8))
def test_chain_hash_depends_on_parent(p1, p2, page):
    """The same page under different parent hashes gets different hashes."""
    assume(p1 != p2)
    assert chain_hash(p1, page) != chain_hash(p2, page)


@given(hashes, st.lists(st.integers(0, 1000), min_size=1, max_size=8),
       st.lists(st.integers(0, 1000), min_size=1, max_size=8))
def test_chain_hash_depends_on_tokens(parent, a, b):
    """Different pages under the same parent get different hashes."""
    assume(a != b)
    assert chain_hash(parent, a) != chain_hash(parent, b)


def test_chain_hash_examples():
    """Concrete checks: stable value, order matters, the root hash is a valid parent."""
    assert chain_hash(ROOT_HASH, [1, 2, 3, 4]) == chain_hash(0, (1, 2, 3, 4))
    assert chain_hash(ROOT_HASH, [1, 2, 3, 4]) != chain_hash(ROOT_HASH, [4, 3, 2, 1])
    h1 = chain_hash(ROOT_HASH, [7, 7, 7, 7])
    assert chain_hash(h1, [7, 7, 7, 7]) != h1, "a repeated page must not hash like its parent"


# ------------------------------------------------------------------------------ page_hashes
@given(hashes, st.data(), page_sizes)
def test_page_hashes_chain(parent, data, ps):
    """page_hashes gives one hash per page, each chained from the previous one."""
    n_pages = data.draw(st.integers(0, 6))
    toks = data.draw(st.lists(st.integers(0, 9), min_size=n_pages * ps, max_size=n_pages * ps))
    hs = page_hashes(parent, toks, ps)
    assert len(hs) == n_pages
    prev = parent
    for i, h in enumerate(hs):
        assert h == chain_hash(prev, toks[i * ps:(i + 1) * ps])
        prev = h


@given(hashes, st.data(), page_sizes)
def test_page_hashes_compose(parent, data, ps):
    """Hashing a prefix then continuing from its last hash equals hashing everything at once."""
    n1, n2 = data.draw(st.integers(1, 4)), data.draw(st.integers(0, 4))
    toks = data.draw(st.lists(st.integers(0, 9), min_size=(n1 + n2) * ps, max_size=(n1 + n2) * ps))
    head = page_hashes(parent, toks[:n1 * ps], ps)
    tail = page_hashes(head[-1], toks[n1 * ps:], ps)
    assert head + tail == page_hashes(parent, toks, ps)


def test_page_hashes_same_page_different_prefix():
    """The same page at different depths (different prefixes) gets different hashes."""
    hs = page_hashes(ROOT_HASH, [5, 5, 5, 5] * 3, 4)
    assert len(set(hs)) == 3
    assert page_hashes(ROOT_HASH, [], 4) == []


# --------------------------------------------------------------------------- prefetch_length
@given(st.integers(-50, 200), st.integers(-50, 200), page_sizes, st.integers(0, 64))
def test_prefetch_length_contract(requested, available, ps, threshold):
    """prefetch_length truncates to the page-aligned available size; 0 only below the threshold."""
    r = prefetch_length(requested, available, ps, threshold)
    assert r % ps == 0
    assert 0 <= r <= max(requested, 0)
    assert r <= max(available, 0)
    aligned = page_align(min(requested, available), ps)
    if aligned >= max(threshold, 1):
        assert r == aligned, "a partial prefetch must not be abandoned"
    else:
        assert r == 0


@pytest.mark.parametrize("requested,available,want", [
    (32, 64, 32),   # fits: everything
    (32, 32, 32),   # exactly fits
    (32, 31, 28),   # one slot short: truncated to a page boundary, not abandoned
    (32, 13, 12),   # truncated well below the request
    (32, 8, 8),     # exactly the threshold: fetched
    (32, 7, 4),     # one page, equal to the threshold: fetched
    (32, 3, 0),     # less than a page available: nothing
])
def test_prefetch_length_examples_threshold_4(requested, available, want):
    """Concrete truncations with page_size 4, threshold 4 (boundary of the partial-fetch rule)."""
    assert prefetch_length(requested, available, 4, 4) == want


@pytest.mark.parametrize("requested,available,threshold,want", [
    (32, 8, 8, 8),    # aligned == threshold: fetched
    (32, 11, 8, 8),   # aligned down to the threshold: fetched
    (32, 7, 8, 0),    # aligned 4 < threshold: not worth it
    (6, 100, 8, 0),   # the request itself is below the threshold
    (8, 100, 8, 8),
    (3, 100, 0, 0),   # less than one page: nothing, even with threshold 0
    (4, 100, 0, 4),   # one page with threshold 0
    (0, 100, 0, 0),
    (32, 0, 0, 0),
    (32, -4, 0, 0),
    (-8, 32, 0, 0),
])
def test_prefetch_length_threshold_boundaries(requested, available, threshold, want):
    """prefetch_length returns 0 only when the page-aligned fit is below max(threshold, 1)."""
    assert prefetch_length(requested, available, 4, threshold) == want

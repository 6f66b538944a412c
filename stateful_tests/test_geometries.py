"""The other-geometry round trip: clean on every configuration, and it sees arithmetic that the
machines' own page size of 2 hides (an offset OR-ed instead of added; a length compared by
identity, which Python's shared small ints make right up to 256)."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from refcache.pools import INDEX_DTYPE, PageAllocator
from stateful_tests.geometries import GEOMETRIES, round_trip
from stateful_tests.machines import MACHINES


@pytest.mark.parametrize("name", ["full/write_back", "mamba/write_through", "swa/write_through_selective"])
def test_round_trip_is_clean(name):
    m = MACHINES[name]()
    try:
        for ps, threshold, pages in GEOMETRIES:
            assert round_trip(m.cache.config, ps, threshold, pages, seed=1) == []
    finally:
        m.teardown()


def _slots_or(self, pages):  # the bug: base | offset (the same as + while pages are a power of two wide)
    ps = self.page_size
    base = torch.tensor(pages, dtype=INDEX_DTYPE).repeat_interleave(ps) * ps
    return (base | torch.arange(ps, dtype=INDEX_DTYPE).repeat(len(pages))).to(self.index_device)


def _free_by_identity(self, pages):  # the bug: `len(set(pages)) is not len(pages)`
    if len(set(pages)) is not len(pages):
        raise ValueError("double free")
    return _free(self, pages)


_free = PageAllocator.free


def test_round_trip_sees_an_offset_or_ed_into_three_token_pages():
    m = MACHINES["full/write_through"]()
    try:
        with mock.patch.object(PageAllocator, "slots_of", _slots_or):
            with pytest.raises(Exception):  # noqa: B017 - a refusal or a disagreement, either is a detection
                assert round_trip(m.cache.config, 3, 1, 5, seed=1) == []
            assert round_trip(m.cache.config, 1, 1, 5, seed=1) == []  # one-token pages: | and + agree
    finally:
        m.teardown()


def test_round_trip_sees_lengths_compared_by_identity_past_256():
    m = MACHINES["full/write_through"]()
    try:
        with mock.patch.object(PageAllocator, "free", _free_by_identity):
            assert round_trip(m.cache.config, 1, 1, 5, seed=1) == []
            with pytest.raises(ValueError):
                round_trip(m.cache.config, 1, 1, 260, seed=1)
    finally:
        m.teardown()

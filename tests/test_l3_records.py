"""The test side's L3 record format (stateful_tests/l3_records.py): it agrees with refcache's on
intact records, every forged record is a miss, and the checked backend the machines use fails on
a decoder that serves a misplaced record or misses an intact one."""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch

import refcache.storage as storage_mod
from refcache.pages import ROOT_HASH, page_hashes
from refcache.storage import encode_page
from stateful_tests import l3_records as rec

SHAPE = (2, 2, 2, 2, 8)  # the machines' page: layers, k/v, page size, heads, head dim
DTYPE = torch.float16


def _page(i: int) -> torch.Tensor:
    return ((torch.arange(128, dtype=torch.float32).view(SHAPE) * (i + 1)) % 128 / 128 - 0.5).to(DTYPE)


@pytest.fixture
def store(tmp_path):
    st = rec.CheckedFileStorage(tmp_path / "kv", SHAPE, DTYPE, capacity_pages=12, fsync=False)
    hs = page_hashes(ROOT_HASH, [1, 1, 2, 2, 3, 3], 2)
    for i, h in enumerate(hs):
        assert st.put(h, _page(i))
    return st, hs


def _file(st, h: int) -> str:
    return f"{st.directory}/{h:016x}.page"


def test_format_agrees_with_refcache_on_intact_records():
    for h, dtype, shape in ((7, DTYPE, SHAPE), ((1 << 64) - 1, torch.float32, (16,)), (0, torch.bfloat16, (3, 4))):
        page = torch.zeros(shape, dtype=dtype) + 0.25
        built = rec.build(h, shape, rec.dtype_name(dtype), rec.page_bytes(page))
        assert built == encode_page(h, page)
        assert rec.payload_of(built, h, shape, dtype) == rec.page_bytes(page)
        assert rec.payload_of(built, h + 1 if h < 7 else h - 1, shape, dtype) is None


@pytest.mark.parametrize("kind", rec.FORGERIES)
def test_every_forgery_is_a_miss(store, kind):
    st, hs = store
    for r in (0, 1, 4, 17):  # wrong fields above and below the right value (a reshape both ways)
        h = hs[r % len(hs)]
        with open(_file(st, hs[(r + 1) % len(hs)]), "rb") as f:
            donor = f.read()
        forged = rec.forge(kind, h, SHAPE, DTYPE, rec.invert(rec.page_bytes(_page(9))), donor, r)
        with open(_file(st, h), "wb") as f:
            f.write(forged)
        assert st.get(h) is None  # the checked get raises if refcache served it
        assert h not in st  # a record that fails verification is dropped
        assert st.put(h, _page(r % len(hs)))


def test_checked_storage_fails_on_a_decoder_that_trusts_the_checksum(store):
    """A decoder checking only the length and checksum serves another key's record: caught."""
    st, hs = store

    def trusting(h, record, shape, dtype):
        body = record[:-rec.SUM_LEN]
        if len(record) != 40 + 8 * len(shape) + 128 * dtype.itemsize + 16 or rec.seal(body) != record:
            return None
        return torch.frombuffer(bytearray(body[40 + 8 * len(shape):]), dtype=torch.uint8).view(dtype).reshape(shape)

    with open(_file(st, hs[1]), "rb") as f:
        misplaced = f.read()
    with open(_file(st, hs[0]), "wb") as f:
        f.write(misplaced)
    with mock.patch.object(storage_mod, "decode_page", trusting), pytest.raises(rec.StorageDisagreement, match="not its record"):
        st.get(hs[0])


def test_checked_storage_fails_on_a_miss_of_an_intact_record(store):
    """A decoder that rejects good records turns every read into a miss: the relaxed oracle of
    faults allows that only when a fault was injected on the read."""
    st, hs = store
    with mock.patch.object(storage_mod, "decode_page", lambda *a: None):
        st.faults.inject("torn", "get")
        assert st.get(hs[0]) is None  # a fault was pending: a miss is allowed
        with pytest.raises(rec.StorageDisagreement, match="intact record"):
            st.get(hs[1])


def test_a_torn_read_of_a_torn_write_is_left_to_the_data_oracle(store):
    """Tearing twice may restore a record: a torn read is not judged by its bytes (D1 judges them)."""
    st, hs = store
    st.faults.inject("torn", "put")
    assert st.put(hs[0], _page(0))
    st.faults.inject("torn", "get")
    page = st.get(hs[0])
    assert page is None or torch.equal(page, _page(0))


def test_a_restart_orders_the_checked_files_by_write_order_not_by_name(tmp_path):
    """The machines' file L3 stamps each write with a logical time, so a restart keeps the same
    pages on every replay: here the page written last (whose name sorts first) survives a restart
    with room for one, however close together the writes came."""
    shape, dtype = (2, 4), torch.float32
    st = rec.CheckedFileStorage(tmp_path, shape, dtype, capacity_pages=2, policy="lru", fsync=False)
    st.put(0xFF, torch.ones(shape))
    st.put(0x01, torch.full(shape, 2.0))
    first, last = (os.stat(st.path(h)).st_mtime_ns for h in (0xFF, 0x01))
    assert first < last < 10**15, "write order, on a logical clock (not the wall clock's coarse ticks)"
    again = rec.CheckedFileStorage(tmp_path, shape, dtype, capacity_pages=1, policy="lru", fsync=False)
    assert 0x01 in again and 0xFF not in again

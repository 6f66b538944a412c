"""L3 storage backends: run semantics, eviction, faults, and "a miss, never wrong data"."""

from __future__ import annotations

import os
import tempfile
from collections import OrderedDict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refcache.data import expected_pages
from refcache.errors import RefCacheError, StorageError, StorageIOError
from refcache.pages import ROOT_HASH, page_hashes
from refcache.storage import FileStorage, MemoryStorage, StorageOp, decode_page, encode_page

LAYERS, PAGE, HEADS, DIM = 2, 4, 2, 8
SHAPE = (LAYERS, 2, PAGE, HEADS, DIM)
DTYPE = torch.float16


def hashes(n: int, first: int = 0) -> list[int]:
    return page_hashes(ROOT_HASH, list(range(first, first + n * PAGE)), PAGE)


def page(h: int, dtype: torch.dtype = DTYPE) -> torch.Tensor:
    return expected_pages([h], LAYERS, PAGE, HEADS, DIM, dtype)[0]


@pytest.fixture(params=["memory", "file"])
def make_store(request, tmp_path):
    def factory(capacity: int | None = 16, dtype: torch.dtype = DTYPE, policy: str = "lru", sub: str = "l3"):
        if request.param == "memory":
            return MemoryStorage(capacity if capacity is not None else 1 << 30, SHAPE, dtype, policy=policy)
        return FileStorage(tmp_path / sub, SHAPE, dtype, capacity_pages=capacity, policy=policy, fsync=False)
    return factory


def fill(store, hs):
    for h in hs:
        assert store.put(h, page(h, store.dtype))


# -- basic semantics ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_roundtrip_is_byte_exact(make_store, dtype):
    store = make_store(dtype=dtype)
    hs = hashes(3)
    fill(store, hs)
    assert len(store) == 3
    for h in hs:
        got = store.get(h)
        assert got.dtype == dtype and tuple(got.shape) == SHAPE and torch.equal(got, page(h, dtype))


def test_get_returns_a_private_copy(make_store):
    store = make_store()
    (h,) = hashes(1)
    fill(store, [h])
    store.get(h).fill_(1.0)
    assert torch.equal(store.get(h), page(h))


def test_put_accepts_a_non_contiguous_view(make_store):
    store = make_store()
    (h,) = hashes(1)
    src = page(h).transpose(0, 1).contiguous().transpose(0, 1)
    assert not src.is_contiguous()
    assert store.put(h, src) and torch.equal(store.get(h), page(h))


def test_exists_is_the_leading_run(make_store):
    store = make_store()
    h = hashes(5)
    fill(store, [h[0], h[1], h[3], h[4]])
    assert store.exists(h) == 2
    assert store.exists(h[3:]) == 2
    assert store.exists([h[2], h[0]]) == 0
    assert store.exists([]) == 0


def test_miss_delete_and_overwrite(make_store):
    store = make_store()
    a, b = hashes(2)
    assert store.get(a) is None
    fill(store, [a, a, b])
    assert len(store) == 2
    store.delete(a)
    store.delete(a)
    assert store.get(a) is None and a not in store and b in store and len(store) == 1


def test_bad_arguments_raise_storage_error(make_store):
    store = make_store()
    (h,) = hashes(1)
    for bad in (torch.zeros(3), page(h, torch.float32), [1, 2]):
        with pytest.raises(StorageError):
            store.put(h, bad)
    for bad_hash in (-1, 1 << 64, "x"):
        with pytest.raises(StorageError):
            store.get(bad_hash)
    with pytest.raises(StorageError):
        store.start_put([h], [])
    with pytest.raises(StorageError):
        make_store(policy="random")
    assert issubclass(StorageIOError, RefCacheError) and issubclass(StorageIOError, OSError)
    assert len(store) == 0


# -- capacity ----------------------------------------------------------------------------------
def test_lru_drops_least_recently_used(make_store):
    store = make_store(capacity=2)
    a, b, c = hashes(3)
    fill(store, [a, b])
    assert store.get(a) is not None
    fill(store, [c])
    assert a in store and b not in store and c in store and len(store) == 2 == store.capacity


def test_fifo_drops_first_in(make_store):
    store = make_store(capacity=2, policy="fifo")
    a, b, c = hashes(3)
    fill(store, [a, b])
    assert store.get(a) is not None
    fill(store, [c])
    assert a not in store and b in store and c in store


def test_capacity_zero_stores_nothing(make_store):
    store = make_store(capacity=0)
    (h,) = hashes(1)
    assert store.put(h, page(h)) is False and len(store) == 0 and store.get(h) is None


# -- faults ------------------------------------------------------------------------------------
def test_io_error_on_get_raises_once(make_store):
    store = make_store()
    a, b = hashes(2)
    fill(store, [a, b])
    store.faults.inject("io_error", "get", h=a)
    assert torch.equal(store.get(b), page(b))  # other hashes are unaffected
    with pytest.raises(StorageIOError):
        store.get(a)
    assert torch.equal(store.get(a), page(a))  # the rule fired once


def test_io_error_in_an_op_is_a_failed_page(make_store):
    store = make_store()
    h = hashes(3)
    fill(store, h)
    store.faults.inject("io_error", "get", h=h[1])
    op = store.start_get(h)
    assert isinstance(op, StorageOp) and op.poll()
    res = op.result()
    assert torch.equal(res[0], page(h[0])) and res[1] is None and torch.equal(res[2], page(h[2]))
    assert op.failed and set(op.errors) == {1} and isinstance(op.errors[1], StorageIOError)
    assert op.hit_length() == 1


def test_io_error_on_put_raises_and_stores_nothing(make_store):
    store = make_store()
    a, b = hashes(2)
    store.faults.inject("io_error", "put", times=None)  # every put, any hash
    for h in (a, b):
        with pytest.raises(StorageIOError):
            store.put(h, page(h))
    op = store.start_put([a], [page(a)])
    assert op.result() == [False] and op.failed
    assert len(store) == 0 and store.exists([a, b]) == 0
    store.faults.clear()
    assert store.put(a, page(a)) and torch.equal(store.get(a), page(a))


def test_slow_get_stays_pending_until_released(make_store):
    store = make_store()
    h = hashes(3)
    fill(store, h)
    store.faults.inject("slow", "get", h=h[2])
    slow, fast = store.start_get(h), store.start_get(h[:2])
    assert fast.poll() and fast.hit_length() == 2
    for _ in range(3):
        assert not slow.poll()
    with pytest.raises(StorageError):
        slow.result()
    assert store.faults.pending == 1
    assert store.faults.release(h=12345) == 0  # an unrelated hash
    assert store.faults.release(h=h[2]) == 1 and store.faults.pending == 0
    assert slow.poll() and [torch.equal(p, page(x)) for p, x in zip(slow.result(), h, strict=True)] == [True] * 3


def test_slow_read_sees_storage_at_completion(make_store):
    store = make_store()
    a, b = hashes(2)
    fill(store, [a, b])
    store.faults.inject("slow", "get")
    op = store.start_get([a, b])
    store.delete(b)
    store.faults.release()
    assert op.poll() and op.result()[1] is None and op.hit_length() == 1


def test_slow_put_lands_only_when_released(make_store):
    store = make_store()
    a, b = hashes(2)
    store.faults.inject("slow", "put", h=b)
    op = store.start_put([a, b], [page(a), page(b)])
    assert not op.poll() and len(store) == 0
    store.faults.release()
    assert op.poll() and op.result() == [True, True] and op.hit_length() == 2
    assert store.exists([a, b]) == 2


def test_cancel_completes_a_held_op_with_nothing(make_store):
    store = make_store()
    (a,) = hashes(1)
    fill(store, [a])
    store.faults.inject("slow", "get")
    op = store.start_get([a])
    assert store.faults.pending == 1
    op.cancel()
    assert op.poll() and op.result() == [None] and op.hit_length() == 0 and store.faults.pending == 0


def test_torn_read_is_a_miss_and_drops_the_page(make_store):
    store = make_store()
    a, b = hashes(2)
    fill(store, [a, b])
    store.faults.inject("torn", "get", h=a)
    assert store.get(a) is None
    assert a not in store and store.exists([a, b]) == 0 and store.stats["corrupt"] == 1
    assert torch.equal(store.get(b), page(b))


def test_torn_write_is_a_miss_on_read(make_store):
    store = make_store()
    h = hashes(3)
    store.faults.inject("torn", "put", times=None)
    fill(store, h)  # the writer cannot tell
    store.faults.clear()
    assert store.exists(h) == 3
    op = store.start_get(h)
    assert op.result() == [None, None, None] and not op.failed and op.hit_length() == 0
    assert len(store) == 0


def test_unknown_fault_is_rejected(make_store):
    with pytest.raises(ValueError):
        make_store().faults.inject("flaky")


# -- record format -----------------------------------------------------------------------------
def test_record_rejects_every_mismatch():
    a, b = hashes(2)
    rec = encode_page(a, page(a))
    assert torch.equal(decode_page(a, rec, SHAPE, DTYPE), page(a))
    assert decode_page(b, rec, SHAPE, DTYPE) is None  # wrong hash
    assert decode_page(a, rec, SHAPE, torch.bfloat16) is None  # same size, other dtype
    assert decode_page(a, rec, (LAYERS, 2, PAGE, DIM, HEADS), DTYPE) is None  # same numel, other shape
    assert decode_page(a, rec[:-1], SHAPE, DTYPE) is None
    assert decode_page(a, rec + b"\0", SHAPE, DTYPE) is None
    for i in (0, 10, len(rec) // 2, len(rec) - 1):  # magic, header, payload, checksum
        bad = bytearray(rec)
        bad[i] ^= 0x01
        assert decode_page(a, bytes(bad), SHAPE, DTYPE) is None


# -- file backend ------------------------------------------------------------------------------
def file_store(tmp_path, **kw) -> FileStorage:
    return FileStorage(tmp_path / "l3", SHAPE, DTYPE, **kw)


def test_file_names_and_no_temp_files(tmp_path):
    store = file_store(tmp_path)  # fsync on: the default
    h = hashes(6)
    fill(store, h)
    fill(store, h[:2])  # overwrite
    names = sorted(os.listdir(store.directory))
    assert names == sorted(f"{x:016x}.page" for x in h)
    assert os.path.basename(store.path(h[0])) == f"{h[0]:016x}.page"


def test_failed_write_leaves_no_temp_file(tmp_path, monkeypatch):
    store = file_store(tmp_path)
    (a,) = hashes(1)

    def broken_replace(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(StorageIOError):
        store.put(a, page(a))
    assert os.listdir(store.directory) == [] and len(store) == 0


def test_flipped_byte_is_a_miss_and_the_file_is_removed(tmp_path):
    store = file_store(tmp_path)
    a, b = hashes(2)
    fill(store, [a, b])
    raw = bytearray(open(store.path(a), "rb").read())
    raw[len(raw) // 2] ^= 0x40
    open(store.path(a), "wb").write(bytes(raw))
    assert store.get(a) is None and not os.path.exists(store.path(a)) and a not in store
    assert torch.equal(store.get(b), page(b))


def test_truncated_file_is_a_miss(tmp_path):
    store = file_store(tmp_path)
    (a,) = hashes(1)
    fill(store, [a])
    size = os.path.getsize(store.path(a))
    os.truncate(store.path(a), size - 7)
    assert store.get(a) is None and not os.path.exists(store.path(a))


def test_file_under_the_wrong_name_is_a_miss(tmp_path):
    store = file_store(tmp_path)
    a, b = hashes(2)
    fill(store, [a])
    os.replace(store.path(a), store.path(b))
    reopened = file_store(tmp_path)
    assert reopened.exists([b]) == 1
    assert reopened.get(b) is None and reopened.get(a) is None and os.listdir(reopened.directory) == []


def test_vanished_file_is_a_miss(tmp_path):
    store = file_store(tmp_path)
    a, b = hashes(2)
    fill(store, [a, b])
    os.unlink(store.path(a))
    assert store.exists([a, b]) == 2  # the index cannot know yet
    assert store.start_get([a, b]).hit_length() == 0
    assert store.exists([a, b]) == 0 and store.exists([b]) == 1


def test_survives_reopening(tmp_path):
    store = file_store(tmp_path, capacity_pages=8)
    h = hashes(4)
    fill(store, h)
    (tmp_path / "l3" / ".tmp-crashed").write_bytes(b"half a page")  # a write that never renamed
    (tmp_path / "l3" / "README").write_text("not a page")
    again = file_store(tmp_path, capacity_pages=8)
    assert len(again) == 4 and again.exists(h) == 4
    assert all(torch.equal(again.get(x), page(x)) for x in h)
    assert not (tmp_path / "l3" / ".tmp-crashed").exists() and (tmp_path / "l3" / "README").exists()


def test_reopening_with_smaller_capacity_drops_the_oldest(tmp_path):
    store = file_store(tmp_path)
    h = hashes(4)
    for i, x in enumerate(h):
        fill(store, [x])
        os.utime(store.path(x), ns=(10**18 + i, 10**18 + i))
    small = file_store(tmp_path, capacity_pages=2)
    assert len(small) == 2 and small.exists(h[2:]) == 2 and sorted(os.listdir(small.directory)) == sorted(
        f"{x:016x}.page" for x in h[2:])


def test_other_page_layout_in_the_same_directory_is_a_miss(tmp_path):
    store = file_store(tmp_path)
    (a,) = hashes(1)
    fill(store, [a])
    other = FileStorage(tmp_path / "l3", (LAYERS, 2, PAGE, HEADS, DIM * 2), DTYPE)
    assert other.exists([a]) == 1 and other.get(a) is None


# -- model check: random operations against a dict with LRU capacity --------------------------
OPS = st.lists(st.tuples(st.sampled_from(["put", "get", "delete", "tear"]), st.integers(0, 5)), max_size=40)


@settings(max_examples=40, deadline=None)
@given(ops=OPS, capacity=st.integers(1, 4), backend=st.sampled_from(["memory", "file"]))
def test_matches_an_lru_model(ops, capacity, backend):
    hs = hashes(6)
    with tempfile.TemporaryDirectory() as d:
        store = (MemoryStorage(capacity, SHAPE, DTYPE) if backend == "memory"
                 else FileStorage(d, SHAPE, DTYPE, capacity_pages=capacity, fsync=False))
        model: OrderedDict[int, None] = OrderedDict()
        for kind, i in ops:
            h = hs[i]
            if kind == "put":
                assert store.put(h, page(h))
                model[h] = None
                model.move_to_end(h)
                while len(model) > capacity:
                    model.popitem(last=False)
            elif kind == "get":
                got = store.get(h)
                assert (got is not None) == (h in model)
                if got is not None:
                    assert torch.equal(got, page(h))
                    model.move_to_end(h)
            elif kind == "delete":
                store.delete(h)
                model.pop(h, None)
            else:
                store.faults.inject("torn", "get", h=h)
                assert store.get(h) is None
                store.faults.clear()
                model.pop(h, None)
            assert list(store._index) == list(model) and store.exists(hs) == next(
                (k for k, x in enumerate(hs) if x not in model), len(hs))


def test_file_write_into_a_vanished_directory_is_a_storage_io_error():
    """Found by mutation triage: creating the temp file was outside the error handling, so a
    directory removed (or full) under the backend raised a raw FileNotFoundError that escaped
    StorageOp.poll. It must be StorageIOError, in a put and as a failed page of an op."""
    import shutil

    d = tempfile.mkdtemp(prefix="refcache-vanish-")
    s = FileStorage(d, (2, 3), torch.float16, fsync=False)
    page = torch.ones(2, 3, dtype=torch.float16)
    assert s.put(1, page)
    shutil.rmtree(d)
    with pytest.raises(StorageIOError):
        s.put(2, page)
    assert 2 not in s
    op = s.start_put([3], [page])
    assert op.poll() and op.result() == [False] and op.failed

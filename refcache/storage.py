"""L3 storage: whole KV pages keyed by their chain hash, behind one small interface.

The cache treats L3 as big, slow and unreliable. The one promise a backend makes is that a read
returns exactly the bytes written under that hash, or a miss: every page is stored as a
self-describing record (header + payload + checksum) that is re-verified on every read, so a
torn, truncated, corrupt or misplaced record turns into a miss (and is dropped), never wrong data.

Reads and writes also exist as operations completed later (`start_get` / `start_put` return a
`StorageOp`), so the cache can keep L3 transfers in flight like its other operations. The work is
done when the op is polled and not held by a fault, which lets tests decide when it lands.

Two backends: `MemoryStorage` (a dict of records) and `FileStorage` (one file per page, written
atomically). Both evict least recently used pages (or first-in with policy="fifo") when full, and
both have `faults` hooks so tests can make reads/writes fail, stall or tear.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import tempfile
from abc import ABC, abstractmethod
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from .errors import StorageError, StorageIOError

MAGIC = b"RCPG"
VERSION = 1
_HEAD = struct.Struct("<4sHHQ16sQ")  # magic, version, ndim, page hash, dtype name, payload length
_SUM_LEN = 16  # blake2b-128 over header + payload
FAULT_KINDS = ("io_error", "slow", "torn")


def _dtype_name(dtype: torch.dtype) -> bytes:
    return str(dtype).removeprefix("torch.").encode()


def _checksum(body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=_SUM_LEN).digest()


def encode_page(h: int, page: torch.Tensor) -> bytes:
    """The on-storage record of one page: header, raw payload bytes, checksum of both."""
    shape = tuple(page.shape)
    payload = page.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    head = _HEAD.pack(MAGIC, VERSION, len(shape), h, _dtype_name(page.dtype), len(payload))
    body = head + struct.pack(f"<{len(shape)}q", *shape) + payload
    return body + _checksum(body)


def decode_page(h: int, record: bytes, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """The page in `record` if it is intact and is exactly page `h` of this shape and dtype, else
    None. Every field is checked, so a record from another page, pool layout or dtype is a miss."""
    head_len = _HEAD.size + 8 * len(shape)
    nbytes = dtype.itemsize * int(torch.Size(shape).numel())
    if len(record) != head_len + nbytes + _SUM_LEN:
        return None
    body = record[:-_SUM_LEN]
    if _checksum(body) != record[-_SUM_LEN:]:
        return None
    if _HEAD.unpack_from(body) != (MAGIC, VERSION, len(shape), h, _dtype_name(dtype).ljust(16, b"\0"), nbytes):
        return None
    if struct.unpack_from(f"<{len(shape)}q", body, _HEAD.size) != shape:
        return None
    return torch.frombuffer(bytearray(body[head_len:]), dtype=torch.uint8).view(dtype).reshape(shape)


def _tear(record: bytes) -> bytes:
    """A partial write: the second half of header+payload is garbage, the checksum is intact."""
    n = len(record) - _SUM_LEN
    half = n // 2
    return record[:half] + bytes(b ^ 0xFF for b in record[half:n]) + record[n:]


@dataclass
class _Rule:
    kind: str
    op: str
    h: int | None  # None: any hash
    remaining: int | None  # None: forever


class Faults:
    """Test hooks: make the next get/put of a hash (or of any hash) fail, stall or tear.

    - "io_error": the sync call raises `StorageIOError`; in an op the page is reported failed
      (`op.errors`) and its result is None (read) / False (write).
    - "slow": an op (start_get/start_put) touching the hash stays pending until `release()`.
      Sync get/put cannot be slow and ignore these rules.
    - "torn": the record read (get) or stored (put) is partly garbage; the checksum turns it into
      a miss, and the stored record is dropped.
    """

    def __init__(self) -> None:
        self._rules: list[_Rule] = []
        self._held: list[StorageOp] = []

    def inject(self, kind: str, op: str = "get", h: int | None = None, times: int | None = 1) -> None:
        if kind not in FAULT_KINDS or op not in ("get", "put"):
            raise ValueError(f"unknown fault {kind!r} on {op!r}")
        self._rules.append(_Rule(kind, op, h, times))

    def clear(self) -> None:
        """Drop every rule (held ops stay held until released)."""
        self._rules.clear()

    def take(self, kind: str, op: str, h: int) -> bool:
        """Whether a rule fires for this access; consumes one use of the first matching rule."""
        for r in self._rules:
            if r.kind == kind and r.op == op and r.h in (None, h):
                if r.remaining is not None:
                    r.remaining -= 1
                    if r.remaining <= 0:
                        self._rules.remove(r)
                return True
        return False

    def release(self, h: int | None = None) -> int:
        """Let held ops (all, or those touching `h`) complete at their next poll; returns how many."""
        now = [op for op in self._held if h is None or h in op.hashes]
        for op in now:
            op.held = False
            self._held.remove(op)
        return len(now)

    @property
    def pending(self) -> int:
        """Ops held by a "slow" fault and not cancelled."""
        return sum(op.held for op in self._held)


class StorageOp:
    """An L3 read or write completed later: `poll()` until True, then `result()`.

    The work runs at the first poll after the op is no longer held, so a write reads its source
    page then: the caller must keep the source alive (host_ref) until poll() is True.
    A failed page (I/O error) is a None / False in the result with its error in `errors`."""

    def __init__(self, kind: str, hashes: Sequence[int], run: Callable[[int, int], object]):
        self.kind = kind
        self.hashes = list(hashes)
        self.held = False
        self.errors: dict[int, StorageIOError] = {}
        self._run = run
        self._results: list | None = None

    def poll(self) -> bool:
        if self._results is None and not self.held:
            out: list = []
            for i, h in enumerate(self.hashes):
                try:
                    out.append(self._run(i, h))
                except StorageIOError as e:
                    self.errors[i] = e
                    out.append(None if self.kind == "get" else False)
            self._results = out
        return self._results is not None

    def result(self) -> list:
        """Pages (tensor or None) for a read, stored flags for a write. Raises if still pending."""
        if not self.poll():
            raise StorageError(f"storage {self.kind} of {len(self.hashes)} pages is still pending")
        return list(self._results or [])

    def cancel(self) -> None:
        """Abandon a pending op: it completes at once with nothing read or written."""
        if self._results is None:
            self._results = [None if self.kind == "get" else False] * len(self.hashes)
            self.held = False

    @property
    def failed(self) -> bool:
        return bool(self.errors)

    def hit_length(self) -> int:
        """Leading pages that arrived (read) or were stored (write): what the cache may use."""
        n = 0
        for x in self.result():
            if x is None or x is False:
                break
            n += 1
        return n


StorageRead = StorageWrite = StorageOp


class StorageBackend(ABC):
    """Pages of one shape and dtype keyed by chain hash (an int in [0, 2**64)).

    Subclasses keep records in `_index` (hash -> what they hold, LRU order) and implement
    `_read` / `_write` / `_remove` of one record; checks, faults and eviction live here.
    Not thread-safe: the cache drives it from one thread."""

    def __init__(self, page_shape: Sequence[int], dtype: torch.dtype, capacity: int | None, policy: str = "lru"):
        if policy not in ("lru", "fifo"):
            raise StorageError(f"unknown eviction policy {policy!r}")
        if capacity is not None and capacity < 0:
            raise StorageError(f"capacity must be >= 0 pages, got {capacity}")
        self.page_shape = tuple(int(d) for d in page_shape)
        if not self.page_shape or min(self.page_shape) <= 0:
            raise StorageError(f"page shape must be non-empty with positive sizes, got {self.page_shape}")
        self.dtype = dtype
        self.capacity = capacity
        self.policy = policy
        self.faults = Faults()
        self.stats: Counter[str] = Counter()
        self._index: OrderedDict[int, object] = OrderedDict()

    @abstractmethod
    def _read(self, h: int) -> bytes | None:
        """The stored record of `h`, None when it vanished; raises StorageIOError on I/O failure."""

    @abstractmethod
    def _write(self, h: int, record: bytes) -> object:
        """Store the record; returns what `_index[h]` keeps."""

    @abstractmethod
    def _remove(self, h: int) -> None:
        """Forget the record of `h` (its index entry is dropped by the caller)."""

    # -- public interface ------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, h: object) -> bool:
        return h in self._index

    def exists(self, hashes: Iterable[int]) -> int:
        """Length of the leading run of `hashes` stored. A later get may still miss (corruption),
        so the cache must truncate at the first None it reads."""
        n = 0
        for h in hashes:
            if h not in self._index:
                break
            n += 1
        return n

    def get(self, h: int) -> torch.Tensor | None:
        """Page `h` (a fresh CPU tensor), or None on a miss. Raises StorageIOError on I/O failure."""
        self._check_hash(h)
        if h not in self._index:
            self.stats["miss"] += 1
            return None
        if self.faults.take("io_error", "get", h):
            self.stats["io_error"] += 1
            raise StorageIOError(f"injected I/O error reading page {h:016x}")
        record = self._read(h)
        if record is not None and self.faults.take("torn", "get", h):
            record = _tear(record)
        page = None if record is None else decode_page(h, record, self.page_shape, self.dtype)
        if page is None:
            self.stats["corrupt" if record is not None else "miss"] += 1
            self.delete(h)
            return None
        if self.policy == "lru":
            self._index.move_to_end(h)
        self.stats["hit"] += 1
        return page

    def put(self, h: int, page: torch.Tensor) -> bool:
        """Store page `h`, evicting old pages when full; False when nothing can be stored
        (capacity 0). Raises StorageError for a page of the wrong shape/dtype, StorageIOError
        when the write fails (the previous record of `h`, if any, is then gone)."""
        self._check_hash(h)
        self._check_page(page)
        if self.capacity == 0:
            return False
        if self.faults.take("io_error", "put", h):
            self.stats["io_error"] += 1
            self.delete(h)
            raise StorageIOError(f"injected I/O error writing page {h:016x}")
        record = encode_page(h, page)
        if self.faults.take("torn", "put", h):
            record = _tear(record)
        while self.capacity is not None and h not in self._index and len(self._index) >= self.capacity:
            self.delete(next(iter(self._index)))
            self.stats["evicted"] += 1
        try:
            self._index[h] = self._write(h, record)
        except StorageIOError:
            self.delete(h)
            raise
        self._index.move_to_end(h)
        self.stats["put"] += 1
        return True

    def delete(self, h: int) -> None:
        """Drop page `h` if stored (no error otherwise)."""
        if h in self._index:
            self._remove(h)
            del self._index[h]

    def start_get(self, hashes: Sequence[int]) -> StorageOp:
        """Read pages as an op completed later (see StorageOp); "slow" faults hold it."""
        return self._start("get", list(hashes), lambda i, h: self.get(h))

    def start_put(self, hashes: Sequence[int], pages: Sequence[torch.Tensor]) -> StorageOp:
        """Write pages as an op completed later; `pages[i]` is read when the op completes."""
        if len(hashes) != len(pages):
            raise StorageError(f"{len(hashes)} hashes for {len(pages)} pages")
        for page in pages:
            self._check_page(page)
        return self._start("put", list(hashes), lambda i, h: self.put(h, pages[i]))

    # -- helpers ---------------------------------------------------------------------------
    def _start(self, kind: str, hashes: list[int], run: Callable[[int, int], object]) -> StorageOp:
        for h in hashes:
            self._check_hash(h)
        op = StorageOp(kind, hashes, run)
        if any([self.faults.take("slow", kind, h) for h in hashes]):  # consume every matching rule
            op.held = True
            self.faults._held.append(op)
        return op

    def _check_page(self, page: object) -> None:
        if not isinstance(page, torch.Tensor) or tuple(page.shape) != self.page_shape or page.dtype != self.dtype:
            got = (tuple(page.shape), page.dtype) if isinstance(page, torch.Tensor) else type(page).__name__
            raise StorageError(f"page must be {self.page_shape} {self.dtype}, got {got}")

    @staticmethod
    def _check_hash(h: int) -> None:
        if not isinstance(h, int) or not 0 <= h < 1 << 64:
            raise StorageError(f"page hash must be an int in [0, 2**64), got {h!r}")


class MemoryStorage(StorageBackend):
    """L3 in process memory: the reference backend for tests (records as bytes, fault hooks)."""

    def __init__(self, capacity_pages: int, page_shape: Sequence[int], dtype: torch.dtype, policy: str = "lru"):
        super().__init__(page_shape, dtype, capacity_pages, policy)

    def _read(self, h: int) -> bytes | None:
        return self._index.get(h)  # type: ignore[return-value]

    def _write(self, h: int, record: bytes) -> object:
        return record

    def _remove(self, h: int) -> None:
        pass


class FileStorage(StorageBackend):
    """L3 in a directory: one file per page, `<hash as 16 hex digits>.page`.

    A write goes to a temp file in the same directory and is renamed over the target
    (os.replace is atomic), so a reader sees the old record or the new one, never half a file.
    Files that fail verification are deleted. Reopening a directory rebuilds the index from the
    files present (oldest modification first) and removes leftover temp files. One writer
    (process) per directory."""

    SUFFIX = ".page"
    TMP_PREFIX = ".tmp-"

    def __init__(self, directory: str | os.PathLike, page_shape: Sequence[int], dtype: torch.dtype,
                 capacity_pages: int | None = None, policy: str = "lru", fsync: bool = True):
        super().__init__(page_shape, dtype, capacity_pages, policy)
        self.directory = os.fspath(directory)
        self.fsync = fsync
        os.makedirs(self.directory, exist_ok=True)
        found = []
        for entry in os.scandir(self.directory):
            if entry.name.startswith(self.TMP_PREFIX):
                os.unlink(entry.path)  # a write that never reached its rename
                continue
            stem = entry.name.removesuffix(self.SUFFIX)
            if entry.name.endswith(self.SUFFIX) and len(stem) == 16 and all(c in "0123456789abcdef" for c in stem):
                found.append((entry.stat().st_mtime_ns, int(stem, 16)))
        for _, h in sorted(found):
            self._index[h] = None
        while self.capacity is not None and len(self._index) > self.capacity:
            self.delete(next(iter(self._index)))

    def path(self, h: int) -> str:
        return os.path.join(self.directory, f"{h:016x}{self.SUFFIX}")

    def _read(self, h: int) -> bytes | None:
        try:
            with open(self.path(h), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StorageIOError(f"reading {self.path(h)}: {e}") from e

    def _write(self, h: int, record: bytes) -> object:
        tmp = None
        try:  # creating the temp file fails too when the directory is gone or full
            fd, tmp = tempfile.mkstemp(prefix=self.TMP_PREFIX, dir=self.directory)
            with os.fdopen(fd, "wb") as f:
                f.write(record)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, self.path(h))
        except OSError as e:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
            raise StorageIOError(f"writing {self.path(h)}: {e}") from e
        return None

    def _remove(self, h: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(h))

"""L3 records as the test side knows them, and the storage faults that need them.

The on-storage format is the one refcache/storage.py documents (module doc and `_HEAD`): a header
`<4sHHQ16sQ` (magic b"RCPG", version 1, number of dimensions, page hash, dtype name NUL-padded to
16 bytes, payload length), one int64 per dimension, the raw payload, then a blake2b-128 digest of
everything before it. It is written and read here with struct and hashlib alone, never with
refcache's encoder or decoder, because record validation is what the checks below judge:

- `forge` builds records that are intact (the checksum is right, or the file is only cut short or
  run long) but are not the record of the page they are filed under: another key's file copied
  over it (misplaced), a record naming another page, another page size, another dtype, a header
  field off either way. `payload_of` is the format's rule for what a read of page `h` may accept.
- `CheckedFileStorage` is refcache's FileStorage with every `get` judged against the file it reads:
  it must return exactly the payload of the file when the file is an intact record of that page
  and no injected fault may spoil the read (a read must achieve that), and a miss otherwise (a
  misplaced or stale record is never served). The relaxed oracle of storage faults stays: a read
  may bring nothing, never wrong data.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import struct

import torch

from refcache.errors import StorageError
from refcache.storage import FileStorage

MAGIC = b"RCPG"
VERSION = 1
HEAD = struct.Struct("<4sHHQ16sQ")  # magic, version, ndim, page hash, dtype name, payload length
SUM_LEN = 16
# Intact-but-wrong records, and files cut short or run long ("_sealed": with a checksum recomputed
# over the cut or extended body, so only the length tells)
FORGERIES = ("misplaced", "hash", "magic", "version", "ndim", "dtype", "nbytes", "shape", "page_size",
             "truncated", "extended", "truncated_sealed", "extended_sealed")
_DTYPES_2 = (b"bfloat16", b"int16", b"float16", b"uint16")  # same itemsize, names on both sides of "float16"


class StorageDisagreement(AssertionError):
    """An L3 read disagrees with the record it read (a Disagreement of the machines)."""


def dtype_name(dtype: torch.dtype) -> bytes:
    return str(dtype).removeprefix("torch.").encode()


def seal(body: bytes) -> bytes:
    return body + hashlib.blake2b(body, digest_size=SUM_LEN).digest()


def build(h: int, shape: tuple[int, ...], dtype: bytes, payload: bytes, *, magic: bytes = MAGIC,
          version: int = VERSION, ndim: int | None = None, nbytes: int | None = None) -> bytes:
    """A sealed record; every header field may be given a value of its own."""
    head = HEAD.pack(magic, version, len(shape) if ndim is None else ndim, h, dtype,
                     len(payload) if nbytes is None else nbytes)
    return seal(head + struct.pack(f"<{len(shape)}q", *shape) + payload)


def parse(record: bytes) -> tuple[int, tuple[int, ...], bytes, bytes] | None:
    """(hash, shape, dtype name, payload) of a well-formed record (any shape), else None."""
    if len(record) < HEAD.size + SUM_LEN:
        return None
    body = record[:-SUM_LEN]
    if hashlib.blake2b(body, digest_size=SUM_LEN).digest() != record[-SUM_LEN:]:
        return None
    magic, version, ndim, h, name, nbytes = HEAD.unpack_from(body)
    if magic != MAGIC or version != VERSION or len(body) != HEAD.size + 8 * ndim + nbytes:
        return None
    shape = struct.unpack_from(f"<{ndim}q", body, HEAD.size)
    return h, shape, name.rstrip(b"\0"), body[HEAD.size + 8 * ndim:]


def payload_of(record: bytes | None, h: int, shape: tuple[int, ...], dtype: torch.dtype) -> bytes | None:
    """The payload a read of page `h` (this shape and dtype) may return from `record`, or None:
    only an intact record naming exactly this page, shape, dtype and length is page `h`."""
    p = parse(record) if record is not None else None
    if p is None or p[0] != h or p[1] != tuple(shape) or p[2] != dtype_name(dtype):
        return None
    n = dtype.itemsize
    for d in shape:
        n *= d
    return p[3] if len(p[3]) == n else None


def forge(kind: str, h: int, shape: tuple[int, ...], dtype: torch.dtype, payload: bytes,
          donor: bytes | None, r: int) -> bytes:
    """A record for the file of page `h` that a read must not accept. `payload` is what the forged
    record carries (wrong data for `h`), `donor` another page's record (for "misplaced"), `r` picks
    the direction of a wrong field (above or below the right value) and where a file is cut."""
    name = dtype_name(dtype)
    up = r % 2 == 0
    if kind == "misplaced" and donor is not None and payload_of(donor, h, shape, dtype) is None:
        rec = donor
    elif kind in ("misplaced", "hash"):  # a record naming another page: another key, or a stale page
        rec = build(h ^ (1 << (r % 64)), shape, name, payload)
    elif kind == "magic":
        rec = build(h, shape, name, payload, magic=b"RCPH" if up else b"RCPF")
    elif kind == "version":
        rec = build(h, shape, name, payload, version=VERSION + 1 if up else VERSION - 1)
    elif kind == "ndim":
        rec = build(h, shape, name, payload, ndim=len(shape) + 1 if up else len(shape) - 1)
    elif kind == "dtype":
        others = [d for d in _DTYPES_2 if d != name] if dtype.itemsize == 2 else [b"int8" if up else b"bool"]
        rec = build(h, shape, others[r % len(others)], payload)
    elif kind == "nbytes":
        rec = build(h, shape, name, payload, nbytes=len(payload) + dtype.itemsize * (1 if up else -1))
    elif kind == "shape":  # the same number of elements in another layout
        rec = build(h, _reshaped(shape, r), name, payload)
    elif kind == "page_size":  # a record from a pool of pages twice as long (dimension 2: tokens)
        axis = 2 if len(shape) > 2 else 0
        rec = build(h, shape[:axis] + (2 * shape[axis],) + shape[axis + 1:], name, payload + payload)
    else:
        good = build(h, shape, name, payload)
        body = good[:-SUM_LEN]
        cut = 1 + r % (len(body) - 1)
        rec = {"truncated": good[: len(good) - 1 - r % (len(good) - 1)],
               "extended": good + bytes([r % 256]) * (1 + r % 7),
               "truncated_sealed": seal(body[:cut]),
               "extended_sealed": seal(body + bytes([r % 256]) * (1 + r % 7))}[kind]
    assert payload_of(rec, h, shape, dtype) is None, f"forged {kind} record is a valid record of the page"
    return rec


def _reshaped(shape: tuple[int, ...], r: int) -> tuple[int, ...]:
    """`shape` with one even dimension halved and another doubled (same numel); a one-dimension
    shape gains a dimension instead."""
    pairs = [(i, j) for i in range(len(shape)) for j in range(len(shape)) if i != j and shape[j] % 2 == 0]
    if not pairs:
        return (1, *shape) if r % 2 else (*shape, 1)
    i, j = pairs[r % len(pairs)]
    out = list(shape)
    out[i], out[j] = out[i] * 2, out[j] // 2
    return tuple(out)


def page_bytes(page: torch.Tensor) -> bytes:
    return page.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def invert(payload: bytes) -> bytes:
    return bytes(b ^ 0xFF for b in payload)


_TICKS = itertools.count(1)


def stamp(path: str) -> None:
    """Give a page file the next tick of a logical clock as its modification time. A restart
    orders its index by modification time: with wall-clock times, files written within one clock
    tick order by name, so a run's restarts (and its findings) would differ from replay to replay."""
    t = next(_TICKS) * 1000
    os.utime(path, ns=(t, t))


class CheckedFileStorage(FileStorage):
    """FileStorage whose reads are judged against the files (see the module doc). The file of page
    `h` is `<h as 16 hex digits>.page` in the directory (FileStorage's documented layout). Each file
    it writes is stamped with a logical time (`stamp`), so restarts replay the same."""

    def _write(self, h: int, record: bytes) -> object:
        out = super()._write(h, record)
        stamp(self.path(h))
        return out

    def get(self, h: int) -> torch.Tensor | None:
        path = os.path.join(self.directory, f"{h:016x}.page") if isinstance(h, int) and h >= 0 else None
        record = None
        if path is not None:
            try:
                with open(path, "rb") as f:
                    record = f.read()
            except FileNotFoundError:
                pass
        want = payload_of(record, h, self.page_shape, self.dtype)
        # a fault injected for this read may make it fail or miss: the relaxed oracle. A torn read
        # also changes the bytes judged (tearing a record torn by a write may even restore it), so
        # what it serves is left to D1, which checks the page's bytes by its token prefix.
        spoiled = any(r.op == "get" and r.kind in ("io_error", "torn") and r.h in (None, h) for r in self.faults._rules)
        torn = any(r.op == "get" and r.kind == "torn" and r.h in (None, h) for r in self.faults._rules)
        stored = h in self
        try:
            page = super().get(h)
        except StorageError:
            raise
        except Exception as e:
            raise StorageDisagreement(f"L3 get of page {h:016x} raised {type(e).__name__}: {e} "
                                      f"(its file: {_describe(record, h, self)})") from e
        if page is not None and not torn:
            if want is None:
                raise StorageDisagreement(f"L3 served page {h:016x} from a file that is not its record "
                                          f"({_describe(record, h, self)}): a misplaced, stale or forged record")
            if tuple(page.shape) != self.page_shape or page.dtype != self.dtype or page_bytes(page) != want:
                raise StorageDisagreement(f"L3 served page {h:016x} as {tuple(page.shape)} {page.dtype}, not the "
                                          "payload of its record")
        elif want is not None and stored and not spoiled:
            raise StorageDisagreement(f"L3 missed page {h:016x}: it is stored, its file is an intact record of it "
                                      "and no fault was injected on the read")
        return page


def _describe(record: bytes | None, h: int, st: FileStorage) -> str:
    if record is None:
        return "none"
    p = parse(record)
    if p is None:
        return f"{len(record)} bytes, not a well-formed record"
    return (f"a record of page {p[0]:016x} {p[1]} {p[2].decode(errors='replace')}, {len(p[3])} payload bytes; "
            f"wanted {h:016x} {st.page_shape} {dtype_name(st.dtype).decode()}")

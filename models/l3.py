"""What L3 must hold, from the writes and losses the driver saw — never from the backend's index.

A page prefix is *sure* (written with no fault that could touch the write, not deleted since, and
too recent for the backend's LRU to have dropped it), *maybe* (a write a fault may have spoiled or
that is still in flight, a record a read may have dropped, a corrupt file a restart may index), or
absent. A prefetch's hit length is then bounded: at least the leading run of sure pages, at most
the leading run of sure-or-maybe pages. Without faults and with room, the bounds meet.

A restart that comes while a store is still writing leaves two writers on one directory: the old
backend finishes the write into a file the new index does not list (the next restart finds it),
and its own LRU may delete the file of any page the new index holds. The model then trusts no
page it was sure of, and keeps such pages as ones a later restart may index.

LRU, without following the backend's order: a page is safe from its backend's eviction while
fewer than `capacity` other pages may have been touched (written or read) since it was last
certainly written (or read back by the driver); reads in flight count as touches at every step.
"""

from __future__ import annotations

from collections.abc import Iterable

Prefix = tuple[int, ...]


class L3Model:
    """The model's own view of one L3 backend (page prefix -> sure / maybe)."""

    def __init__(self, capacity: int | None):
        self.capacity = capacity
        self.sure: set[Prefix] = set()
        self.maybe: set[Prefix] = set()
        self.refreshed: dict[Prefix, int] = {}  # last step a page was certainly written or read back
        self.touched: dict[Prefix, int] = {}  # last step a page may have been written or read
        self.clock = 0
        self.put_faults = False  # a write fault was injected: any later write may be lost or torn
        self.get_tears = False  # a torn-read fault was injected: any later read may drop its record
        self.corrupt: set[Prefix] = set()  # records a read drops (forged files)
        self.orphans: set[Prefix] = set()  # files a replaced backend may have written: a restart may index them

    # ----------------------------------------------------------------------------- events
    def tick(self, reading: Iterable[Prefix] = ()) -> None:
        """One step passed; `reading` are the pages of reads and writes still in flight."""
        self.clock += 1
        for p in reading:
            self._touch(p)

    def write(self, pages: Iterable[Prefix], landed: bool = True) -> None:
        """Pages written (or, `landed=False`, a write started that may land later)."""
        for p in pages:
            self._touch(p)
            if landed and not self.put_faults:
                self.sure.add(p)
                self.maybe.discard(p)
                self.corrupt.discard(p)
                self.orphans.discard(p)
                self.refreshed[p] = self.clock
            elif self.put_faults:  # a failed write drops the old record too
                self._doubt(p)
            elif p not in self.sure:  # in flight: it may land any time (an old record stays)
                self.maybe.add(p)

    def faulted_in_flight(self, pages: Iterable[Prefix]) -> None:
        """A write fault was armed while writes of `pages` were in flight: when they run they may
        fail, and a failed write drops the old record too."""
        for p in pages:
            self._doubt(p)

    def stale_writes(self, pages: Iterable[Prefix]) -> None:
        """Writes of `pages` are in flight through a backend a restart replaced: each may land in a
        file the current index lacks, and the old backend's eviction may delete any file."""
        for p in list(self.sure):
            self._doubt(p)
        for p in pages:
            self._touch(p)
            self.orphans.add(p)

    def read(self, pages: Iterable[Prefix]) -> None:
        """Pages a prefetch may read now or later (a read refreshes nothing the model relies on)."""
        for p in pages:
            self._touch(p)
            if (self.get_tears or p in self.corrupt) and p in self.sure:
                self._doubt(p)

    def read_back(self, p: Prefix, present: bool) -> None:
        """The driver read `p` itself, with no fault armed: what it saw is what L3's index holds. A
        miss on a forged page leaves it forged: the file stays when the index lacked it, and a
        restart may index it again."""
        self._touch(p)
        self.maybe.discard(p)
        if present:
            self.corrupt.discard(p)
            self.sure.add(p)
            self.refreshed[p] = self.clock
        else:
            self.sure.discard(p)

    def lost(self, p: Prefix) -> None:
        """The record of `p` was deleted behind the cache's back."""
        self.sure.discard(p)
        self.maybe.discard(p)
        self.corrupt.discard(p)

    def forged(self, p: Prefix) -> None:
        """The file of `p` now holds a record a read rejects (and drops); a restart may index it."""
        self._doubt(p)
        self.corrupt.add(p)

    def reopened(self) -> None:
        """The backend rebuilt its index from its files: the LRU order among them is unknown, and
        a forged file, or one a replaced backend wrote, may be indexed again."""
        self.maybe |= (self.corrupt | self.orphans) - self.sure
        for p in self.sure | self.maybe:
            self._touch(p)

    # -------------------------------------------------------------------------- predictions
    def bounds(self, pages: list[Prefix]) -> tuple[int, int]:
        """(at least, at most) how many leading `pages` the backend holds."""
        lo = 0
        while lo < len(pages) and self.certain(pages[lo]):
            lo += 1
        hi = 0
        while hi < len(pages) and (pages[hi] in self.sure or pages[hi] in self.maybe):
            hi += 1
        return lo, hi

    def certain(self, p: Prefix) -> bool:
        """The backend holds `p`: sure, and too recent for its LRU to have dropped it."""
        return p in self.sure and self._lru_safe(p)

    def _lru_safe(self, p: Prefix) -> bool:
        if self.capacity is None:
            return True
        since = self.refreshed.get(p)
        if since is None:
            return False
        return sum(1 for q, t in self.touched.items() if q != p and t >= since) < self.capacity

    def _touch(self, p: Prefix) -> None:
        self.touched[p] = self.clock

    def _doubt(self, p: Prefix) -> None:
        self.sure.discard(p)
        self.maybe.add(p)

"""The model's own memory of use: when each cached page prefix was last used, and how often.

A cache keeps access stamps and hit counts of its own; a bug can stop refreshing them, refresh
the wrong nodes or miscount, and an oracle that reads them back agrees with any such bug. The
model instead records use from the operations it saw (DESIGN §2): a match uses the pages of its
matched path, an insert every page of its key, a terminated prefetch the pages it hung under its
anchor. Hits count the same way (a match hits its path; an insert hits the pages already on
device). Where the spec leaves the answer open, the last use is an interval [lo, hi] and hits a
range: an LRU choice is wrong only when the victim was certainly used after a survivor, and a
selective backup is due only when the hits certainly reached the threshold.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

Prefix = tuple[int, ...]


@dataclass
class Recency:
    clock: int = 0
    last: dict[Prefix, tuple[int, int]] = field(default_factory=dict)  # page -> (earliest, latest) last use
    hits: dict[Prefix, tuple[int, int]] = field(default_factory=dict)  # page -> (fewest, most) hits

    def tick(self) -> int:
        """One operation; the uses it records share this time (they tie)."""
        self.clock += 1
        return self.clock

    def use(self, pages: Iterable[Prefix], hit: bool = False) -> None:
        """`pages` were certainly used now (and hit, if `hit`)."""
        for p in pages:
            self.last[p] = (self.clock, self.clock)
            if hit:
                lo, hi = self.hits.get(p, (0, 0))
                self.hits[p] = (lo + 1, hi + 1)

    def maybe_use(self, pages: Iterable[Prefix], hit: bool = False) -> None:
        """`pages` may or may not have been used (and hit) now."""
        for p in pages:
            lo, _ = self.last.get(p, (0, 0))
            self.last[p] = (lo, self.clock)
            if hit:
                lo, hi = self.hits.get(p, (0, 0))
                self.hits[p] = (lo, hi + 1)

    def keep(self, cached: Iterable[Prefix]) -> None:
        """Forget pages no longer cached (a page cached again starts afresh: no hits, used when it
        is inserted); a page the model did not see arrive is used at an unknown time."""
        cached = set(cached)
        for d in (self.last, self.hits):
            for p in [p for p in d if p not in cached]:
                del d[p]
        for p in cached - self.last.keys():
            self.last[p] = (0, self.clock)

    def used_after(self, a: Prefix, b: Prefix) -> bool:
        """`a` was certainly last used after `b` (so LRU must choose `b` first)."""
        return self.last.get(a, (0, self.clock))[0] > self.last.get(b, (0, self.clock))[1]

    def certainly_hit(self, p: Prefix, n: int) -> bool:
        return self.hits.get(p, (0, 0))[0] >= n

    def possibly_hit(self, p: Prefix, n: int) -> bool:
        return self.hits.get(p, (0, 0))[1] >= n

    def lru_errors(self, chosen: Iterable[Prefix], stayed: Iterable[Prefix], what: str) -> list[str]:
        """Each chosen page must be no more recent than any candidate that stayed (ties either way)."""
        stayed = list(stayed)
        v = []
        for c in chosen:
            for s in stayed:
                if self.used_after(c, s):
                    v.append(f"{what} {c} (last used at {self.last[c]}) before {s}, last used earlier "
                             f"(at {self.last[s]}): not least recently used")
        return v[:3]

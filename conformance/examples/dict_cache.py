"""A tiny device-only prefix cache and its conformance adapter: the worked example of docs/adapter.md.

`DictCache` keeps one entry per cached *page prefix* (a token tuple ending on a page boundary),
so there are no nodes to split. It is prefix-closed, counts locks along the path, stamps what
an operation used, and evicts unlocked leaves least recently used first.

    pytest --refcache-target conformance.examples.dict_cache:make_target --refcache-budget 10
    pytest --refcache-target conformance.examples.dict_cache:make_buggy_target   # fails: evicts a locked page
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from conformance import Inserted, Match, SlotBook, Target, TargetError, TargetInfo
from models.abstract import Model, Page, Prefix


@dataclass
class Entry:
    slots: list[int]  # the page's KV slots
    stamp: int = 0  # last operation that used it
    lock: int = 0  # locks held at or below this page
    children: set = field(default_factory=set)


class DictCache:
    """The cache under test. `free` is the KV allocator it shares with its caller."""

    def __init__(self, page_size: int, free: SlotBook, forget_locks: bool = False):
        self.ps, self.kv, self.forget_locks = page_size, free, forget_locks
        self.pages: dict[Prefix, Entry] = {}
        self.clock = 0

    def prefixes(self, tokens: list[int]) -> list[Prefix]:
        t = tuple(tokens)
        return [t[: i + self.ps] for i in range(0, len(t) - len(t) % self.ps, self.ps)]

    def match(self, tokens: list[int]) -> list[Prefix]:
        """The cached page prefixes of `tokens`, longest run from the start; stamps them."""
        self.clock += 1
        path = []
        for p in self.prefixes(tokens):
            if p not in self.pages:
                break
            self.pages[p].stamp = self.clock
            path.append(p)
        return path

    def insert(self, tokens: list[int], slots: list[int]) -> int:
        """Cache `tokens` with their `slots`; returns how many leading tokens were cached already."""
        self.clock += 1
        cached = 0
        for i, p in enumerate(self.prefixes(tokens)):
            if p in self.pages:
                cached = len(p)
            else:
                self.pages[p] = Entry(slots[i * self.ps:(i + 1) * self.ps])
                if len(p) > self.ps:
                    self.pages[p[:-self.ps]].children.add(p)
            self.pages[p].stamp = self.clock
        return cached

    def lock(self, p: Prefix, delta: int) -> None:
        for q in self.prefixes(list(p)):
            if q in self.pages:
                self.pages[q].lock += delta

    def evict(self, n_tokens: int) -> list[int]:
        """Drop unlocked leaves, least recently used first, until `n_tokens` are freed; their slots."""
        freed: list[int] = []
        while len(freed) < n_tokens:
            leaves = [p for p, e in self.pages.items() if not e.children and (self.forget_locks or not e.lock)]
            if not leaves:
                break
            p = min(leaves, key=lambda q: self.pages[q].stamp)
            freed += self.pages.pop(p).slots
            if len(p) > self.ps:
                self.pages[p[:-self.ps]].children.discard(p)
        return freed


class DictCacheTarget(Target):
    """The adapter: the conformance machine's operations in terms of DictCache."""

    def __init__(self, forget_locks: bool = False):
        name = "dict-cache-buggy" if forget_locks else "dict-cache"
        self.info = TargetInfo(name, page_size=2, device_tokens=16)
        self.book = SlotBook(16, 2, reserve_first_page=False)  # records what each slot holds (D1, R1)
        self.cache = DictCache(2, self.book, forget_locks)

    def alloc(self, tokens: list[int]) -> torch.Tensor:
        short = len(tokens) - self.book.available_size()
        if short > 0:
            self.book.free(torch.tensor(self.cache.evict(short), dtype=torch.int64))
        slots = self.book.alloc(len(tokens))
        if slots is None:
            raise TargetError(f"{len(tokens)} slots wanted, {self.book.available_size()} free")
        self.book.write(slots, tokens)
        return slots

    def insert(self, tokens: list[int], kv: torch.Tensor) -> Inserted:
        cached = self.cache.insert(tokens, kv.tolist())
        self.book.take(kv[cached:].tolist())
        self.book.free(kv[:cached])  # the caller's copies of pages the cache already had
        return Inserted(cached)

    def match(self, tokens: list[int]) -> Match:
        path = self.cache.match(tokens)
        n = len(path[-1]) if path else 0
        slots = [s for p in path for s in self.cache.pages[p].slots]
        return Match(device_len=n, best_len=n, node=path[-1] if path else (), device_indices=slots)

    def alive(self, node: Prefix) -> bool:
        return node == () or node in self.cache.pages

    def node_prefix(self, node: Prefix) -> Prefix:
        return node

    def lock(self, node: Prefix) -> Prefix:
        self.cache.lock(node, +1)
        return node

    def locked_prefix(self, lock: Prefix) -> Prefix:
        return lock

    def unlock(self, lock: Prefix) -> None:
        self.cache.lock(lock, -1)

    def evict(self, n_tokens: int) -> int:
        slots = self.cache.evict(n_tokens)
        self.book.free(torch.tensor(slots, dtype=torch.int64))
        return len(slots)

    def abstract(self) -> Model:
        return Model(self.info.page_size, None, 0, {p: Page(dev=True, host=False, lock=e.lock, stamp=e.stamp)
                                                   for p, e in self.cache.pages.items()})

    def check(self) -> list[str]:
        tree = [s for e in self.cache.pages.values() for s in e.slots]
        v = self.book.account(tree)
        v += [f"{p}: cached without its parent" for p in self.cache.pages
              if len(p) > self.info.page_size and p[:-self.info.page_size] not in self.cache.pages]
        return v


def make_target() -> DictCacheTarget:
    """The factory `--refcache-target` names: a fresh cache per test case."""
    return DictCacheTarget()


def make_buggy_target() -> DictCacheTarget:
    """The same cache with a seeded bug: eviction ignores locks."""
    return DictCacheTarget(forget_locks=True)

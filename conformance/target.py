"""The target interface: what the conformance machine drives, for refcache, SGLang's and vLLM's
caches, and yours. Public and stable (exported by `conformance`; docs/adapter.md says what each
operation must mean and walks through a complete adapter).

A target is one prefix cache behind a small, uniform surface. It declares what it supports
(`TargetInfo`): operations beyond the core four, the sidecar component, whether its lock counts
and its recency stamps can be read back. Its abstraction function, `abstract()`, maps its state
onto `models.abstract.Model`, the one oracle that judges every target.

The request cycle is split the way a serving engine splits it: `alloc` (a forward pass takes
KV slots, evicting if it must) and then `insert` (the tree takes the slots it does not already
hold; the target frees the duplicates by its own convention). So the model can predict what
insert finds after whatever the allocation evicted.

`SlotBook` is the KV allocator the SGLang adapters give their trees: it records, for every
slot handed out, the exact token prefix it holds, so every match and every tree value can be
checked byte-for-byte (D1 here: a slot holds the prefix the tree says it does) and every slot is
accounted for (R1 here: free, held by the caller, or held by the tree, exactly once).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from models.abstract import Model, Prefix

CORE_OPS = frozenset({"insert", "match", "lock", "unlock", "evict"})


@dataclass(frozen=True)
class TargetInfo:
    """What a target is and what the machine may ask of it."""

    name: str
    page_size: int
    sidecar: str | None = None  # None | "mamba"
    ops: frozenset = CORE_OPS  # plus "evict_mamba" / "load_back" where supported
    exact_locks: bool = True  # lock counts readable; else only locked / unlocked
    stamps: bool = True  # recency stamps readable, so eviction order can be judged
    host: bool = False  # has a host tier (L2) the machine lets it fill and drain on its own
    sglang: str | None = None  # the sglang version it needs, if any
    device_tokens: int = 16
    mamba_slots: int = 0
    allow: frozenset = frozenset()  # explained divergences the machine does not judge (see KNOWN)
    notes: str = ""


@dataclass
class Match:
    """A match as the machine compares it: lengths in tokens; `node` is an opaque handle.
    `last_host_len` is None where the target has no host tier (then it is not compared)."""

    device_len: int
    best_len: int
    node: Any
    device_indices: list[int] = field(default_factory=list)
    last_host_len: int | None = None
    host_hit: int = 0
    mamba_host_hit: int = 0  # the match end's mamba state must come from host (where a target says so)


@dataclass
class Inserted:
    """What insert did: `cached_len` leading tokens were already on the device (their slots stay
    the caller's); `mamba_used` whether the tree took the mamba slot."""

    cached_len: int
    mamba_used: bool | None = None  # None: no mamba component


class TargetError(Exception):
    """The target refused an operation the caller may legitimately attempt (pool exhausted)."""


class Target(ABC):
    """One cache under test. Handles returned by `match`/`lock` are opaque to the machine."""

    info: TargetInfo

    @abstractmethod
    def alloc(self, tokens: list[int]) -> Any:
        """Take KV slots (and a mamba slot) for `tokens` and write their contents, evicting if
        needed; raise TargetError if even eviction cannot make room."""

    @abstractmethod
    def insert(self, tokens: list[int], kv: Any) -> Inserted:
        """Insert `tokens` with the slots from `alloc`; free what the tree did not take."""

    @abstractmethod
    def match(self, tokens: list[int]) -> Match:
        """The longest cached prefix of `tokens`; makes the pages it used the most recently used."""

    @abstractmethod
    def alive(self, node: Any) -> bool:
        """Whether `node` (a handle from `match`) is still attached to the tree."""

    @abstractmethod
    def node_prefix(self, node: Any) -> Prefix:
        """The token prefix `node` ends (() for the root), unchanged by splits."""

    @abstractmethod
    def lock(self, node: Any) -> Any:
        """Lock `node`'s path; returns the handle to pass to `unlock`."""

    @abstractmethod
    def locked_prefix(self, lock: Any) -> Prefix:
        """The prefix a `lock` handle actually locked (() when it locked nothing)."""

    @abstractmethod
    def unlock(self, lock: Any) -> None:
        """Release one lock taken by `lock`: one less on every page of the locked path."""

    @abstractmethod
    def evict(self, n_tokens: int) -> int:
        """Evict at least `n_tokens` device tokens if possible; returns tokens freed."""

    def evict_mamba(self, n: int) -> int:
        """Free up to `n` device mamba states (op "evict_mamba"); returns states freed."""
        raise NotImplementedError

    def load_back(self, tokens: list[int]) -> int | None:
        """Match `tokens`, load the best match end's missing device data from host (op "load_back"),
        let it complete; returns the device match length afterwards, or None when the target declined."""
        raise NotImplementedError

    @abstractmethod
    def abstract(self) -> Model:
        """The abstraction function: this target's state as the abstract model."""

    def data_ok(self, tokens: list[int], m: Match) -> bool:
        """D1: the device slots a match served hold exactly the matched prefix."""
        return self.book.holds(m.device_indices, tokens)

    def check(self) -> list[str]:
        """The target's own consistency checks (its sanity checks, slot accounting, data)."""
        return []

    def close(self) -> None:  # noqa: B027 (optional hook; most targets hold nothing to release)
        """Release what the target holds (most hold nothing)."""


class SlotBook:
    """A page-granular KV slot allocator that remembers what every slot holds.

    `content[s]` is the token prefix (a tuple ending with the token at slot `s`) written there;
    `caller` are slots handed out by `alloc` and not yet inserted or freed."""

    def __init__(self, capacity: int, page_size: int, reserve_first_page: bool = True):
        self.page_size = ps = page_size
        self.size = capacity
        first = 1 if reserve_first_page else 0  # slot 0 is the padding slot in sglang's pools
        self.free_pages = list(range(first, capacity // ps + first))
        self.all_slots = {p * ps + i for p in self.free_pages for i in range(ps)}
        self.content: dict[int, tuple] = {}
        self.caller: set[int] = set()
        self.device = torch.device("cpu")
        self.errors: list[str] = []

    # --- the allocator surface sglang's trees call
    def available_size(self) -> int:
        return len(self.free_pages) * self.page_size

    def alloc(self, n: int) -> torch.Tensor | None:
        k = -(-n // self.page_size)
        if k > len(self.free_pages):
            return None
        pages, self.free_pages = self.free_pages[:k], self.free_pages[k:]
        slots = [p * self.page_size + i for p in pages for i in range(self.page_size)][:n]
        self.caller.update(slots)
        return torch.tensor(slots, dtype=torch.int64)

    def free_segment(self, indices: torch.Tensor, start_pos: int = 0) -> None:
        self.free(indices)

    def free(self, indices: torch.Tensor) -> None:
        slots = [int(s) for s in indices.tolist()]
        if not slots:
            return
        ps = self.page_size
        pages = sorted({s // ps for s in slots})
        if len(slots) != len(pages) * ps or len(set(slots)) != len(slots):
            self.errors.append(f"free of a partial page or repeated slots: {slots}")
        for p in pages:
            if p in self.free_pages:
                self.errors.append(f"double free of page {p} (slots {slots})")
                return
        self.free_pages.extend(pages)
        for s in slots:
            self.content.pop(s, None)
            self.caller.discard(s)

    # --- the driver's side
    def write(self, slots: torch.Tensor, tokens: list[int]) -> None:
        for i, s in enumerate(slots.tolist()):
            self.content[int(s)] = tuple(tokens[: i + 1])

    def take(self, slots) -> None:
        """The tree took these slots from the caller."""
        self.caller.difference_update(int(s) for s in slots)

    def holds(self, slots, tokens) -> bool:
        """D1: slot i holds exactly the prefix tokens[:i+1]."""
        return all(self.content.get(int(s)) == tuple(tokens[: i + 1]) for i, s in enumerate(slots))

    def account(self, tree_slots: list[int]) -> list[str]:
        """R1: every slot is free, held by the caller, or held by the tree, exactly once."""
        v = list(self.errors)
        self.errors.clear()
        ps = self.page_size
        free = {p * ps + i for p in self.free_pages for i in range(ps)}
        tree = list(tree_slots)
        if len(set(tree)) != len(tree):
            dup = sorted({s for s in tree if tree.count(s) > 1})
            v.append(f"R1: slots held twice by the tree: {dup[:8]}")
        tree_set = set(tree)
        for name, a, b in (("free and tree", free, tree_set), ("free and caller", free, self.caller),
                           ("caller and tree", self.caller, tree_set)):
            both = a & b
            if both:
                v.append(f"R1: slots both {name}: {sorted(both)[:8]}")
        lost = self.all_slots - free - self.caller - tree_set
        if lost:
            v.append(f"R1: slots leaked (neither free, nor the caller's, nor in the tree): {sorted(lost)[:8]}")
        return v

"""The invariant registry: each invariant of DESIGN §3 declared once, with its id, a sentence a
reviewer understands, the Python predicate (the very function in `refcache.invariants.CHECKS`
that `HiCache.check_invariants()` and the stateful machines run — not a copy), its Z3 encoding
where it is structural (`properties.encodings`), and the bug classes it guards against.

The bug catalogue (DESIGN §4) is here too: classes 1-5 (seeded in stateful_tests/seeded_bugs.py)
and the ten further bugs such caches have had, each with the invariants that catch it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from refcache.invariants import CHECKS, Check

from .encodings import ENCODINGS, LEMMAS


@dataclass(frozen=True)
class Bug:
    id: str
    title: str
    invariants: tuple[str, ...]
    seeded: tuple[str, ...] = ()  # keys of stateful_tests.seeded_bugs.SEEDED_BUGS (or its class-2 length rule)
    z3_mutant: str | None = None  # bug name the Z3 transitions understand (properties.transitions)
    upstream: str = ""  # where it happened (facts only: repository, PR, seed file)


BUGS: dict[str, Bug] = {b.id: b for b in [
    Bug("class1", "prefetch terminated after its KV pages arrived while its mamba pool transfer was still in flight",
        ("X2", "X3"), ("class1_terminate_with_pool_in_flight",), upstream="sgl-project/sglang PR #27366 (seeds/000)"),
    Bug("class2", "L2 allocation failure during a prefetch abandons the whole prefetch instead of truncating it",
        (), ("class2_prefetch_gives_up_when_l2_is_short",), upstream="sgl-project/sglang PR #26945 (seeds/001)"),
    Bug("class3", "resolving a transfer's indices mutates the pool-transfer record a node holds",
        ("X1", "R1"), ("class3_resolve_mutates_record",), upstream="sgl-project/sglang PR #23427 (seeds/002)"),
    Bug("class4", "load-back anchored at the last host node instead of best_match_node; lock of a host-only bottom",
        ("T6", "T1", "T2"), ("class4_load_back_at_last_host", "class4_lock_host_only_bottom"),
        upstream="sgl-project/sglang PR #25088 (seeds/003)"),
    Bug("class5", "tombstone cascade ignores host_ref and deletes a node in-flight work still uses", ("T3",),
        ("class5_cascade_ignores_host_ref",), upstream="sgl-project/sglang PR #23696 (seeds/004)"),
    Bug("lock-leak", "lock not released when an operation aborts or fails to allocate", ("T2",),
        z3_mutant="mutant_lock_leak_on_fail"),
    Bug("split-double-free", "double free after a node split (the op keeps only the lower half)", ("R1", "T1"),
        z3_mutant="mutant_split_forgets_op"),
    Bug("stale-lru", "stale LRU entry after demotion (eviction set not re-derived)", ("R3", "T4"),
        z3_mutant="mutant_demote_without_touch"),
    Bug("size-drift", "evictable-size drift (a lock change not accounted)", ("R2",),
        z3_mutant="mutant_lock_without_touch"),
    Bug("writeback-unbacked", "write-back evicting a node before its backup completed", ("T4", "T2"),
        z3_mutant="mutant_writeback_drops_early"),
    Bug("hash-no-parent", "chain hash ignoring the parent's hash (equal pages under different prefixes collide)",
        ("S1",)),
    Bug("tp-hit-length", "TP ranks disagreeing on a prefetch hit length (the next collective hangs)", ("X3",)),
    Bug("swapped-gather", "swapped pages in a gather/scatter", ("D1",)),
    Bug("free-l2-under-load", "freeing L2 data while a load-back reads it", ("T3",),
        z3_mutant="mutant_host_evict_ignores_ref"),
    Bug("cascade-locked", "cascade deletion through a locked parent", ("T2", "S2"), z3_mutant="mutant_cascade_ignores_lock"),
]}


@dataclass(frozen=True)
class Invariant:
    id: str
    title: str
    statement: str
    group: str
    structural: bool  # has a Z3 encoding

    @property
    def predicate(self) -> Check:
        """The Python check over a snapshot: refcache.invariants.CHECKS[id], the one the cache runs."""
        return CHECKS[self.id]

    @property
    def z3(self) -> Callable | None:
        """The Z3 encoding over `symbolic.State` (None when the invariant is not structural)."""
        return ENCODINGS.get(self.id)

    @property
    def bugs(self) -> tuple[Bug, ...]:
        return tuple(b for b in BUGS.values() if self.id in b.invariants)


def _inv(id_: str, group: str, title: str, statement: str) -> Invariant:
    return Invariant(id_, title, statement, group, id_ in ENCODINGS)


INVARIANTS: dict[str, Invariant] = {i.id: i for i in [
    _inv("S1", "Structure", "well-formed tree",
         "Every key is a whole number of pages, each child is filed under its first page, parent and child links "
         "agree, and each page hash chains from its parent's."),
    _inv("S2", "Structure", "no empty nodes",
         "Every node except the root holds KV on the device or the host, or has children: no empty node, no orphan."),
    _inv("T1", "Tiers", "device closure",
         "If a node's KV is on the device, so is its parent's: device data is always a prefix of a path."),
    _inv("T2", "Tiers", "locks",
         "A locked node is on the device, a parent is locked at least as often as its child, and each lock count "
         "equals the locks held at or below the node."),
    _inv("T3", "Tiers", "host references",
         "A node referenced by in-flight host-side work stays in the tree with an exact reference count, and the L2 "
         "data a load-back reads is not freed."),
    _inv("T4", "Tiers", "eviction candidates",
         "Only unlocked device leaves that may drop their copy are offered for L1 eviction, and only unreferenced "
         "host-only leaves for L2 eviction."),
    _inv("T5", "Tiers", "mamba states",
         "A mamba state sits only beside its tier's full KV, and a caller-locked node keeps the state it had."),
    _inv("T6", "Tiers", "load-back anchor",
         "A load-back starts from a node every component accepts as a match end (mamba state present, SWA window "
         "intact on L1 or L2)."),
    _inv("R1", "Resources", "slot ownership",
         "Every L1, L2 and state slot is free or has exactly one owner (a node, an in-flight operation or a caller), "
         "and free plus owned equals capacity."),
    _inv("R2", "Resources", "kept sizes",
         "The evictable and protected sizes the cache keeps equal the sums over the tree, per component and tier."),
    _inv("R3", "Resources", "eviction sets",
         "The eviction sets hold exactly the nodes that are evictable."),
    _inv("X1", "Transfers", "records intact",
         "Pool-transfer records are never mutated by an operation; a node's L2 state record keeps host indices."),
    _inv("X2", "Transfers", "termination",
         "An operation ends only when its KV part and every pool transfer are done, or it was aborted and released "
         "everything."),
    _inv("X3", "Transfers", "liveness",
         "Every in-flight part is known to the executor, so every prefetch reaches a terminal state and no wait "
         "is on an event nobody will signal."),
    _inv("D1", "Data", "bytes",
         "Every page and state served from L1 or L2 holds exactly the bytes written for that prefix."),
]}

LEMMA_STATEMENTS: dict[str, str] = {name: " ".join((f.__doc__ or "").split()) for name, f in LEMMAS.items()}


def check_registry() -> list[str]:
    """Problems with the registry: every predicate of refcache.invariants is declared here, once."""
    problems = []
    if set(INVARIANTS) != set(CHECKS):
        problems.append(f"registry {sorted(INVARIANTS)} != refcache.invariants.CHECKS {sorted(CHECKS)}")
    problems += [f"encoding {k} has no invariant" for k in ENCODINGS if k not in INVARIANTS]
    problems += [f"bug {b.id} names unknown invariant {i}" for b in BUGS.values() for i in b.invariants if i not in INVARIANTS]
    return problems

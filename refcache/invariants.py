"""The invariants of DESIGN §3 as predicates over a `Snapshot`.

Each predicate is written once, here; `HiCache.check_invariants`, the stateful suite and the
invariant registry in `properties/` all call these same functions. A predicate returns the
violations it finds, each naming the invariant, the node (or op/pool) and what is wrong.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from .pages import ROOT_HASH, chain_hash
from .snapshot import NodeSnap, Snapshot

HOST_RECORD_FORM = ("torch.int64", "cpu")


@dataclass(frozen=True)
class Violation:
    invariant: str
    message: str
    node: int | None = None

    def __str__(self) -> str:
        where = f" (node {self.node})" if self.node is not None else ""
        return f"{self.invariant}{where}: {self.message}"


Check = Callable[[Snapshot], list[Violation]]


def _non_root(s: Snapshot) -> list[NodeSnap]:
    return [n for n in s.nodes.values() if n.parent is not None]


def _parent(s: Snapshot, n: NodeSnap) -> NodeSnap:
    return s.nodes[n.parent]


def _subtree_counts(s: Snapshot, targets: Counter) -> Counter:
    """For a multiset of target nodes, how many targets lie at or below each node."""
    out: Counter = Counter()
    for nid, k in targets.items():
        while nid is not None and nid in s.nodes:
            out[nid] += k
            nid = s.nodes[nid].parent
    return out


# ---------------------------------------------------------------------------- structure
def s1_structure(s: Snapshot) -> list[Violation]:
    """Keys are whole pages; children keyed by first page; links agree; hashes chain."""
    v, ps = [], s.page_size
    for n in s.nodes.values():
        for first, cid in n.children:
            c = s.nodes.get(cid)
            if c is None:
                v.append(Violation("S1", f"child {cid} is not in the tree", n.id))
            elif c.parent != n.id:
                v.append(Violation("S1", f"child {cid} names parent {c.parent}", n.id))
            elif c.key[:ps] != first:
                v.append(Violation("S1", f"child {cid} is keyed by {first} but starts with {c.key[:ps]}", n.id))
        if n.parent is None:
            continue
        if not n.key or len(n.key) % ps:
            v.append(Violation("S1", f"key of {len(n.key)} tokens is not a non-empty whole number of pages", n.id))
            continue
        p = s.nodes.get(n.parent)
        if p is None or (n.key[:ps], n.id) not in p.children:
            v.append(Violation("S1", f"parent {n.parent} does not have this node as a child", n.id))
            continue
        h = p.hashes[-1] if p.hashes else ROOT_HASH
        want = []
        for i in range(0, len(n.key), ps):
            h = chain_hash(h, n.key[i : i + ps])
            want.append(h)
        if tuple(want) != n.hashes:
            v.append(Violation("S1", "page hashes do not chain from the parent's", n.id))
    if set(s.nodes) != set(s.registered):
        v.append(Violation("S1", f"registered but unreachable: {sorted(set(s.registered) - set(s.nodes))}; "
                                 f"reachable but unregistered: {sorted(set(s.nodes) - set(s.registered))}"))
    return v


def s2_holds_data(s: Snapshot) -> list[Violation]:
    """Every non-root node holds data in L1 or L2, or is an interior node with children."""
    return [Violation("S2", "node with no data and no children", n.id)
            for n in _non_root(s) if n.device is None and n.host is None and not n.children]


# -------------------------------------------------------------------------------- tiers
def t1_device_closure(s: Snapshot) -> list[Violation]:
    """A node with device KV has a parent with device KV (root excepted)."""
    return [Violation("T1", f"on device but parent {n.parent} is not", n.id) for n in _non_root(s)
            if n.device is not None and n.parent != s.root and _parent(s, n).device is None]


def t2_locks(s: Snapshot) -> list[Violation]:
    """Locked implies on device; lock_ref(parent) >= lock_ref(child); counts match their holders."""
    v = []
    holders = Counter(s.caller_locks)
    holders.update(op.locked for op in s.ops if op.locked is not None)
    expected = _subtree_counts(s, holders)
    for n in _non_root(s):
        if n.lock_ref and n.device is None:
            v.append(Violation("T2", f"lock_ref={n.lock_ref} but not on device", n.id))
        if n.parent != s.root and _parent(s, n).lock_ref < n.lock_ref:
            v.append(Violation("T2", f"lock_ref={n.lock_ref} exceeds parent's {_parent(s, n).lock_ref}", n.id))
        if n.lock_ref != expected[n.id]:
            v.append(Violation("T2", f"lock_ref={n.lock_ref} but {expected[n.id]} locks are held at or below it", n.id))
    return v


def t3_host_refs(s: Snapshot) -> list[Violation]:
    """Host-referenced nodes are attached, counted exactly, and keep the L2 data in use."""
    v = []
    holders = Counter(op.host_refed for op in s.ops if op.host_refed is not None)
    holders.update(s.extra.get("host_ref_holders", {}))
    for nid in holders:
        if nid not in s.nodes:
            v.append(Violation("T3", "host-referenced node is no longer attached to the tree", nid))
    expected = _subtree_counts(s, holders)
    for n in _non_root(s):
        if n.host_ref != expected[n.id]:
            v.append(Violation("T3", f"host_ref={n.host_ref} but {expected[n.id]} references are held at or below it", n.id))
    for op in s.ops:
        if op.kind == "load":
            for nid, _, host in op.segments:
                n = s.nodes.get(nid)
                if n is None or n.host != host:
                    v.append(Violation("T3", f"load {op.id} reads L2 slots the node no longer holds", nid))
    return v


def t4_evictable(s: Snapshot) -> list[Violation]:
    """Eviction candidates are evictable: L1 from unlocked device leaves; L2 from host-only,
    unreferenced leaves."""
    v = []
    for nid in s.device_leaves:
        n = s.nodes.get(nid)
        if (n is None or n.lock_ref or n.device is None or any(c.device is not None for c in s.children(nid))
                or (n.host is None and n.host_ref)):
            v.append(Violation("T4", "in the L1 eviction set but not an unlocked device leaf it may drop", nid))
    for nid in s.host_leaves:
        n = s.nodes.get(nid)
        if n is None or n.host is None or n.device is not None or n.host_ref or n.children:
            v.append(Violation("T4", "in the L2 eviction set but not a host-only unreferenced leaf", nid))
    return v


def t5_mamba(s: Snapshot) -> list[Violation]:
    """A mamba state sits only beside the full KV of its tier; a caller-locked node keeps it."""
    if s.sidecar != "mamba":
        return []
    v = []
    for n in _non_root(s):
        if n.mamba is not None and n.device is None:
            v.append(Violation("T5", "device mamba state without device KV", n.id))
        if n.mamba_host is not None and n.host is None:
            v.append(Violation("T5", "host mamba state without host KV", n.id))
    for nid in s.locked_with_state:
        n = s.nodes.get(nid)
        if n is not None and n.mamba is None:
            v.append(Violation("T5", "locked node lost the mamba state it had when locked", nid))
    return v


def window_ok(s: Snapshot, node_id: int, tiers: str) -> bool:
    """SWA window ending at `node_id` intact on device ('device') or on either tier ('any')."""
    covered, nid = 0, node_id
    while nid is not None and s.nodes[nid].parent is not None and covered < s.swa_window:
        n = s.nodes[nid]
        if not (n.swa or (tiers == "any" and n.swa_host)):
            return False
        covered += len(n.key)
        nid = n.parent
    return True


def valid_end(s: Snapshot, node_id: int, tiers: str) -> bool:
    """Every component accepts the node as a match end (mirrors `HiCache.valid_end`)."""
    n = s.nodes.get(node_id)
    if n is None:
        return False
    if n.parent is None:
        return True
    if n.device is None and (tiers == "device" or n.host is None):
        return False
    if s.sidecar == "mamba":
        return n.mamba is not None or (tiers == "any" and n.mamba_host is not None)
    if s.sidecar == "swa":
        return window_ok(s, node_id, tiers)
    return True


def t6_load_anchor(s: Snapshot) -> list[Violation]:
    """Load-back starts from a node every component accepts as a match end."""
    return [Violation("T6", f"load {op.id} is anchored at a node that is not a valid match end", op.anchor)
            for op in s.ops if op.kind == "load" and not valid_end(s, op.anchor, "any")]


# ---------------------------------------------------------------------------- resources
def _owners(s: Snapshot) -> dict[str, Counter]:
    ps = s.page_size
    own = {k: Counter() for k in s.pools}

    def add(pool: str, slots, step: int) -> None:
        if slots is not None and pool in own:
            for i in range(0, len(slots), step):
                own[pool][slots[i] // step] += 1

    for n in _non_root(s):
        add("device_kv", n.device, ps)
        add("host_kv", n.host, ps)
        add("device_state", None if n.mamba is None else (n.mamba,), 1)
        add("host_state", None if n.mamba_host is None else (n.mamba_host,), 1)
    for op in s.ops:
        for pool, slots in op.owned:
            add(pool, slots, ps if pool.endswith("_kv") else 1)
    own["device_kv"].update(s.caller_pages)
    if "device_state" in own:
        own["device_state"].update(s.caller_states)
    return own


def r1_slots(s: Snapshot) -> list[Violation]:
    """Each slot is free or owned by exactly one node, op or caller; free + owned = capacity; L3
    holds no more pages than its capacity."""
    v = []
    for name, owned in _owners(s).items():
        p = s.pools[name]
        shared = sorted(k for k, c in owned.items() if c > 1)
        if shared:
            v.append(Violation("R1", f"{p.name}: pages {shared} have more than one owner"))
        if set(owned) != set(p.allocated_pages):
            v.append(Violation("R1", f"{p.name}: allocated but unowned (leak) {sorted(set(p.allocated_pages) - set(owned))}; "
                                     f"owned but not allocated {sorted(set(owned) - set(p.allocated_pages))}"))
        if set(p.free_pages) & set(p.allocated_pages) or len(p.free_pages) + len(p.allocated_pages) != p.capacity // p.page_size:
            v.append(Violation("R1", f"{p.name}: free and allocated pages do not partition the pool"))
    for name, (stored, capacity) in s.storage.items():
        if capacity is not None and not 0 <= stored <= capacity:
            v.append(Violation("R1", f"{name}: {stored} pages stored, capacity {capacity}"))
    if s.sidecar == "swa":
        used = sum(len(n.key) for n in _non_root(s) if n.swa)
        loading = sum(len(s.nodes[nid].key) for op in s.ops if op.kind == "load" for nid in op.swa_nodes if nid in s.nodes)
        if used + loading + s.caller_swa > s.swa_capacity or s.caller_swa < 0:
            v.append(Violation("R1", f"SWA tokens over capacity: {used} in nodes + {loading} loading + "
                                     f"{s.caller_swa} reserved > {s.swa_capacity}"))
    return v


def r2_sizes(s: Snapshot) -> list[Violation]:
    """Evictable and protected sizes equal the sums they summarize, per component and tier."""
    if s.sizes == s.derived_sizes:
        return []
    keys = sorted(set(s.sizes) | set(s.derived_sizes))
    diff = {k: (s.sizes.get(k, 0), s.derived_sizes.get(k, 0)) for k in keys
            if s.sizes.get(k, 0) != s.derived_sizes.get(k, 0)}
    return [Violation("R2", f"kept sizes differ from the tree's (kept, actual): {diff}")]


def r3_leaf_sets(s: Snapshot) -> list[Violation]:
    """The eviction sets hold exactly the evictable nodes."""
    v = []
    for name, kept, want in (("L1", s.device_leaves, s.derived_device_leaves),
                             ("L2", s.host_leaves, s.derived_host_leaves)):
        for nid in sorted(want - kept):
            v.append(Violation("R3", f"evictable from {name} but missing from its eviction set", nid))
        for nid in sorted(kept - want):
            v.append(Violation("R3", f"in the {name} eviction set but not evictable", nid))
    return v


# ---------------------------------------------------------------------------- transfers
def x1_records(s: Snapshot) -> list[Violation]:
    """Pool-transfer records are never mutated; a node's L2 record keeps host indices."""
    v = [Violation("X1", f"operation {op.id} ({op.kind}) had its pool-transfer records mutated")
         for op in s.ops if not op.records_intact]
    v += [Violation("X1", f"L2 mamba record holds {n.mamba_host_form}, not host indices {HOST_RECORD_FORM}", n.id)
          for n in _non_root(s) if n.mamba_host_form is not None and n.mamba_host_form != HOST_RECORD_FORM]
    return v


def x2_termination(s: Snapshot) -> list[Violation]:
    """An operation ends only when every part is done: nothing still copies for a finished op, and
    a prefetch is never terminated while one of its pool transfers is in flight."""
    live = {op.id for op in s.ops}
    v = [Violation("X2", f"operation {i} was finished while the executor still runs parts of it")
         for i in sorted(s.executor_pending - live)]
    v += [Violation("X2", f"prefetch {op.id} was terminated while its pool transfer {p!r} is in flight", op.anchor)
          for op in s.ops if op.state == "draining" and not op.aborted
          for p, st in op.parts[op.kv_parts:] if st == "pending"]
    return v


def x3_liveness(s: Snapshot) -> list[Violation]:
    """Every in-flight part is known to the executor, so someone will signal it."""
    return [Violation("X3", f"operation {op.id} waits on part {p!r} the executor does not know")
            for op in s.ops for p, st in op.parts if st == "unknown"]


# --------------------------------------------------------------------------------- data
def d1_data(s: Snapshot) -> list[Violation]:
    """Every L1/L2 page and state holds exactly the bytes written for its prefix."""
    v = []
    for n in _non_root(s):
        if n.data_ok is None:
            continue
        for ok, what in zip(n.data_ok, ("L1 pages", "L2 pages", "mamba state"), strict=False):
            if not ok:
                v.append(Violation("D1", f"{what} do not hold the bytes written for this prefix", n.id))
    return v


CHECKS: dict[str, Check] = {
    "S1": s1_structure, "S2": s2_holds_data, "T1": t1_device_closure, "T2": t2_locks,
    "T3": t3_host_refs, "T4": t4_evictable, "T5": t5_mamba, "T6": t6_load_anchor,
    "R1": r1_slots, "R2": r2_sizes, "R3": r3_leaf_sets, "X1": x1_records,
    "X2": x2_termination, "X3": x3_liveness, "D1": d1_data,
}


def check_all(s: Snapshot, only: list[str] | None = None) -> list[Violation]:
    """Run every check (or those in `only`) and return all violations."""
    out: list[Violation] = []
    for name, fn in CHECKS.items():
        if only is None or name in only:
            out.extend(fn(s))
    return out

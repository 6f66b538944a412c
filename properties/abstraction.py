"""From a concrete `refcache.snapshot()` to the bounded state of `properties.symbolic` (Python
values), and a canonical form to compare such states whatever slots new nodes and ops took.

Slots are numbered so that every parent precedes its children in *each* of the snapshots given
(the cache never moves a node above its ancestor: a split inserts a node between parent and
child, so one order fits a before and an after snapshot). Slot 0 is the root.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from refcache.invariants import HOST_RECORD_FORM
from refcache.snapshot import Snapshot

from .symbolic import (
    BACKUP,
    DRAIN,
    FLIGHT,
    KC,
    LOAD,
    MAMBA,
    NODE_BOOL,
    NODE_INT,
    NONE,
    OP_BOOL,
    OP_INT,
    OP_NODE,
    PREFETCH,
    PY,
    STORE,
    SWA,
    State,
    contrib,
)

KIND_IDS = {"backup": BACKUP, "load": LOAD, "prefetch": PREFETCH, "store": STORE}
PHASE_IDS = {"in_flight": FLIGHT, "draining": DRAIN}


@dataclass
class SlotMap:
    """Node id <-> slot and op id <-> op slot, shared by the snapshots of one step."""

    root: int
    slot_of: dict[int, int]
    op_slot: dict[int, int]
    N: int
    M: int

    @property
    def id_of(self) -> dict[int, int]:
        return {v: k for k, v in self.slot_of.items()}


def slot_map(*snaps: Snapshot, spare_ops: int = 2) -> SlotMap:
    """Slots for every node of the snapshots, parents first in each of them."""
    root = snaps[0].root
    edges: dict[int, set[int]] = {}
    for s in snaps:
        for n in s.nodes.values():
            edges.setdefault(n.id, set())
            if n.parent is not None:
                edges[n.id].add(n.parent)
    order, state = [], {}

    def visit(i):
        if state.get(i) == 2:
            return
        if state.get(i) == 1:
            raise ValueError(f"the snapshots disagree on the order of node {i} and its ancestors")
        state[i] = 1
        for p in sorted(edges.get(i, ())):
            visit(p)
        state[i] = 2
        order.append(i)

    for i in sorted(edges):
        visit(i)
    slot_of = {root: 0}
    for i in order:
        if i != root:
            slot_of[i] = len(slot_of)
    op_ids = sorted({op.id for s in snaps for op in s.ops})
    return SlotMap(root, slot_of, {i: k for k, i in enumerate(op_ids)}, len(slot_of), len(op_ids) + spare_ops)


def abstract(snap: Snapshot, m: SlotMap) -> State:
    """The snapshot as a symbolic.State of Python values under slot map `m` (a backup's
    demote-on-done flag is not in the snapshot: False here, see drift.py)."""
    N, M = m.N, m.M
    n = {f: [False] * N for f in NODE_BOOL + KC}
    n.update({f: [0] * N for f in NODE_INT})
    n["alive"][0] = True
    ps = snap.page_size
    for node in snap.nodes.values():
        if node.parent is None:
            continue
        j = m.slot_of[node.id]
        n["alive"][j] = True
        n["par"][j] = m.slot_of[node.parent]
        n["ln"][j] = len(node.key) // ps
        n["dev"][j] = node.device is not None
        n["host"][j] = node.host is not None
        n["mdev"][j] = node.mamba is not None
        n["mhost"][j] = node.mamba_host is not None
        n["swa"][j], n["swah"][j] = node.swa, node.swa_host
        n["lock"][j], n["href"][j] = node.lock_ref, node.host_ref
        n["recok"][j] = node.mamba_host_form in (None, HOST_RECORD_FORM)
    for nid, c in snap.caller_locks.items():
        if nid in m.slot_of and nid != m.root:
            n["clk"][m.slot_of[nid]] = c
    for nid in snap.locked_with_state:
        if nid in m.slot_of:
            n["lws"][m.slot_of[nid]] = True
    for nid in snap.device_leaves:
        if nid in m.slot_of:
            n["kdev"][m.slot_of[nid]] = True
    for nid in snap.host_leaves:
        if nid in m.slot_of:
            n["khost"][m.slot_of[nid]] = True
    o = {f: [False] * M for f in OP_BOOL}
    o.update({f: [0] * M for f in OP_INT})
    on = {f: [[False] * N for _ in range(M)] for f in OP_NODE}
    sidecar = snap.sidecar
    cfg = {"side": {None: NONE, "mamba": MAMBA, "swa": SWA}[sidecar], "W": max(1, snap.swa_window // ps),
           "wb": snap.write_policy == "write_back"}
    s = State(N, M, n, o, on, cfg)
    kc = [contrib(PY, s, j) for j in range(N)]  # sizes are kept as totals: R2 is the predicate's to judge
    for f_i, f in enumerate(KC):
        n[f] = [kc[j][f_i] for j in range(N)]

    def ref(nid):
        return 0 if nid is None or nid == m.root else m.slot_of.get(nid, 0)

    for op in snap.ops:
        k = m.op_slot[op.id]
        o["act"][k] = True
        o["kind"][k] = KIND_IDS[op.kind]
        o["phase"][k] = PHASE_IDS.get(op.state, FLIGHT)
        o["lk"][k], o["hr"][k], o["an"][k] = ref(op.locked), ref(op.host_refed), ref(op.anchor)
        for nid, _, _ in op.segments:
            on["seg"][k][ref(nid)] = True
        for nid in op.swa_nodes:
            on["swn"][k][ref(nid)] = True
        o["pool"][k] = bool(op.pool_transfers)
        kv, pool = op.parts[:op.kv_parts], op.parts[op.kv_parts:]
        o["kvp"][k] = any(st == "pending" for _, st in kv)
        o["kvf"][k] = any(st == "failed" for _, st in kv)
        o["plp"][k] = any(st == "pending" for _, st in pool)
        o["plf"][k] = any(st == "failed" for _, st in pool)
        o["intact"][k] = op.records_intact
        o["abort"][k] = op.aborted
    for row in on.values():
        for r in row:
            r[0] = False
    return State(N, M, n, o, on, cfg)


def canon(s: State, before_alive: frozenset[int]) -> Counter:
    return Counter(r for _, r in records(s, before_alive))


def records(s: State, before_alive: frozenset[int]) -> list[tuple[tuple, tuple]]:
    """(("node"|"op", slot), record) for every attached node, detached node with stale entries, and
    op. Node references are by identity: a slot alive in the before state stands for that node;
    any other attached slot is described by its parent and length (so new nodes compare equal
    whatever free slot they took). Op records do not name their slot."""
    memo: dict[int, object] = {}

    def ref(j):
        if j == 0:
            return "root"
        if j in before_alive:
            return ("n", j)
        if j not in memo:
            memo[j] = None  # guard against cycles in corrupt states
            memo[j] = ("new", ref(s.par[j]) if s.alive[j] else "detached", s.ln[j])
        return memo[j]

    recs = []
    for j in range(1, s.N):
        if s.alive[j]:
            recs.append((("node", j), (ref(j), ref(s.par[j]), s.ln[j]) + tuple(
                s.n[f][j] for f in ("dev", "host", "mdev", "mhost", "swa", "swah", "lock", "href", "clk", "lws",
                                    "recok", "kdev", "khost"))))
        elif s.kdev[j] or s.khost[j] or s.clk[j] or s.lws[j]:
            recs.append((("node", j), (ref(j), "detached", s.kdev[j], s.khost[j], s.clk[j], s.lws[j])))
    for k in range(s.M):
        if s.act[k]:
            recs.append((("op", k), ("op", s.kind[k], s.phase[k], ref(s.lk[k]) if s.lk[k] else None,
                                     ref(s.hr[k]) if s.hr[k] else None, ref(s.an[k]) if s.an[k] else None,
                                     frozenset(ref(j) for j in range(1, s.N) if s.seg[k][j]),
                                     frozenset(ref(j) for j in range(1, s.N) if s.swn[k][j]),
                                     s.pool[k], s.kvp[k], s.kvf[k], s.plp[k], s.plf[k], s.intact[k], s.abort[k])))
    return recs

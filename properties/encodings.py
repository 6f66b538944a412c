"""Z3 encodings of the structural invariants of DESIGN §3, plus the strengthening lemmas that
make their conjunction inductive (facts the code relies on without naming them: what an
in-flight operation of each kind looks like, that sidecar flags exist only in their config).

Each encoding is a function (backend, state) -> formula over `symbolic.State`, stated for the
attached nodes exactly as the Python predicate in refcache/invariants.py states it for a
snapshot (where the two differ, the docstring says how). They also evaluate on Python values,
which is how drift.py checks concrete snapshots against them.
"""

from __future__ import annotations

from collections.abc import Callable

from .symbolic import (
    BACKUP,
    DRAIN,
    FLIGHT,
    KC,
    LOAD,
    MAMBA,
    PREFETCH,
    PREP,
    STORE,
    SWA,
    State,
    anc,
    anc_x,
    contrib,
    devev,
    has_child,
    has_dev_child,
    hostev,
    nodes,
    valid_end_any,
)


def _ops(s: State):
    return range(s.M)


def _at(b, arr, x):
    return b.sel(arr, x)


def s1_tree(b, s: State):
    """Every attached node's parent is attached and numbered before it: parent/child links agree
    and nothing is orphaned (keys and hashes are data: the predicate and CrossHair check them)."""
    return b.And(*[b.Implies(s.alive[j], b.And(s.par[j] >= 0, s.par[j] < j, _at(b, s.alive, s.par[j])))
                   for j in nodes(s)])


def s2_holds_data(b, s: State):
    """An attached node has full KV on L1 or L2, or children."""
    hc = has_child(b, s)
    return b.And(*[b.Implies(s.alive[j], b.Or(s.dev[j], s.host[j], hc[j])) for j in nodes(s)])


def t1_device_closure(b, s: State):
    """A node on device has its parent on device (root excepted)."""
    return b.And(*[b.Implies(b.And(s.alive[j], s.dev[j], s.par[j] != 0), _at(b, s.dev, s.par[j])) for j in nodes(s)])


def _lock_holders(b, s: State, j):
    return s.clk[j] + b.Sum([b.If(b.And(s.act[k], s.lk[k] == j), 1, 0) for k in _ops(s)])


def _href_holders(b, s: State, j):
    return b.Sum([b.If(b.And(s.act[k], s.hr[k] == j), 1, 0) for k in _ops(s)])


def _children_sum(b, s: State, fld: str, j):
    return b.Sum([b.If(b.And(s.alive[c], s.par[c] == j), s.n[fld][c], 0) for c in range(j + 1, s.N)])


def t2_locks(b, s: State):
    """Locked implies on device; lock_ref(parent) >= lock_ref(child); lock_ref = locks held at or
    below the node (callers' and operations')."""
    out = []
    for j in nodes(s):
        out.append(b.Implies(s.alive[j], b.And(
            b.Implies(s.lock[j] > 0, s.dev[j]),
            b.Implies(s.par[j] != 0, _at(b, s.lock, s.par[j]) >= s.lock[j]),
            s.lock[j] == _lock_holders(b, s, j) + _children_sum(b, s, "lock", j))))
    return b.And(*out)


def t3_host_refs(b, s: State):
    """A host-referenced node is attached; host_ref = references held at or below it; the nodes
    an in-flight load reads keep their L2 data."""
    out = [b.Implies(b.And(s.act[k], s.hr[k] != 0), _at(b, s.alive, s.hr[k])) for k in _ops(s)]
    for j in nodes(s):
        out.append(b.Implies(s.alive[j], s.href[j] == _href_holders(b, s, j) + _children_sum(b, s, "href", j)))
        out += [b.Implies(b.And(s.act[k], s.kind[k] == LOAD, s.seg[k][j]), b.And(s.alive[j], s.host[j])) for k in _ops(s)]
    return b.And(*out)


def t4_evictable(b, s: State):
    """The kept L1 eviction set holds only unlocked device leaves that may drop their copy; the
    kept L2 set only host-only, unreferenced, childless nodes."""
    hc, hdc = has_child(b, s), has_dev_child(b, s)
    out = []
    for j in nodes(s):
        out.append(b.Implies(s.kdev[j], b.And(s.alive[j], s.lock[j] == 0, s.dev[j], b.Not(hdc[j]),
                                              b.Or(s.host[j], s.href[j] == 0))))
        out.append(b.Implies(s.khost[j], b.And(s.alive[j], s.host[j], b.Not(s.dev[j]), s.href[j] == 0, b.Not(hc[j]))))
    return b.And(*out)


def t5_mamba(b, s: State):
    """Mamba: a state on a tier sits beside that tier's full KV; a caller-locked node that had a
    state keeps it."""
    return b.Implies(s.side == MAMBA, b.And(*[b.Implies(s.alive[j], b.And(
        b.Implies(s.mdev[j], s.dev[j]), b.Implies(s.mhost[j], s.host[j]), b.Implies(s.lws[j], s.mdev[j])))
        for j in nodes(s)]))


def t6_load_anchor(b, s: State):
    """Every load is anchored at a node every component accepts as a match end (mamba: a state
    on some tier; swa: the window intact on L1 or L2)."""
    ve = valid_end_any(b, s)
    return b.And(*[b.Implies(b.And(s.act[k], s.kind[k] == LOAD), _at(b, ve, s.an[k])) for k in _ops(s)])


def r1_ownership(b, s: State):
    """Abstract slot ownership: an in-flight op's destination is owned by no node (a load's nodes
    are not on L1, a backup's not on L2, nor their states), and no two ops write the same node.
    (free + owned = capacity is counted by the predicate over real slot numbers.)"""
    out = []
    for k in _ops(s):
        load = b.And(s.act[k], s.kind[k] == LOAD)
        bk = b.And(s.act[k], s.kind[k] == BACKUP)
        out.append(b.Implies(b.And(load, s.pool[k]), b.Not(_at(b, s.mdev, s.an[k]))))
        out.append(b.Implies(b.And(bk, s.pool[k]), b.Not(_at(b, s.mhost, s.lk[k]))))
        for j in nodes(s):
            out.append(b.Implies(b.And(load, s.seg[k][j]), b.Not(s.dev[j])))
            out.append(b.Implies(b.And(bk, s.seg[k][j]), b.Not(s.host[j])))
            for k2 in range(k + 1, s.M):
                out.append(b.Not(b.And(s.act[k], s.act[k2], s.seg[k][j], s.seg[k2][j])))
    return b.And(*out)


def r2_sizes(b, s: State):
    """Each node's kept contribution to the evictable/protected sizes equals what its fields give
    (per node, hence per component and tier; a detached node contributes nothing)."""
    out = []
    for j in nodes(s):
        for f, v in zip(KC, contrib(b, s, j), strict=True):
            out.append(s.n[f][j] == v)
    return b.And(*out)


def r3_leaf_sets(b, s: State):
    """The kept eviction sets are exactly the evictable nodes."""
    dv, hv = devev(b, s), hostev(b, s)
    return b.And(*[b.And(s.kdev[j] == dv[j], s.khost[j] == hv[j]) for j in nodes(s)])


def x1_records(b, s: State):
    """No in-flight op had its pool-transfer records mutated; every node's L2 mamba record holds
    host indices."""
    return b.And(*[b.Implies(s.act[k], s.intact[k]) for k in _ops(s)],
                 *[b.Implies(b.And(s.alive[j], s.mhost[j]), s.recok[j]) for j in nodes(s)])


def x2_termination(b, s: State):
    """A prefetch the request stopped waiting for (draining, not aborted) has no pool transfer in flight."""
    return b.And(*[b.Not(b.And(s.act[k], s.kind[k] == PREFETCH, s.phase[k] == DRAIN, b.Not(s.abort[k]),
                               s.pool[k], s.plp[k])) for k in _ops(s)])


ENCODINGS: dict[str, Callable] = {
    "S1": s1_tree, "S2": s2_holds_data, "T1": t1_device_closure, "T2": t2_locks, "T3": t3_host_refs,
    "T4": t4_evictable, "T5": t5_mamba, "T6": t6_load_anchor, "R1": r1_ownership, "R2": r2_sizes,
    "R3": r3_leaf_sets, "X1": x1_records, "X2": x2_termination,
}


# ---------------------------------------------------------------------------------- lemmas
def l_config(b, s: State):
    """Sidecar flags exist only in their configuration."""
    out = []
    for j in nodes(s):
        out.append(b.Implies(s.side != MAMBA, b.And(b.Not(s.mdev[j]), b.Not(s.mhost[j]), b.Not(s.lws[j]))))
        out.append(b.Implies(s.side != SWA, b.And(b.Not(s.swa[j]), b.Not(s.swah[j]))))
        out.append(b.Implies(b.And(s.alive[j], s.swa[j]), s.dev[j]))
        out.append(b.Implies(b.And(s.alive[j], s.swah[j]), s.host[j]))
    for k in _ops(s):
        out.append(b.Implies(b.And(s.act[k], s.pool[k]), s.side == MAMBA))
        out += [b.Implies(b.And(s.act[k], s.swn[k][j]), s.side == SWA) for j in nodes(s)]
    return b.And(*out)


def l_callers(b, s: State):
    """Caller locks sit on attached nodes; 'locked with state' only while a caller lock is held."""
    return b.And(*[b.And(b.Implies(s.clk[j] > 0, s.alive[j]), b.Implies(s.lws[j], s.clk[j] > 0)) for j in nodes(s)])


def l_ops(b, s: State):
    """The shape of each in-flight operation kind (what its constructor in refcache builds and
    what the protections it holds keep true)."""
    out = []
    for k in _ops(s):
        act, kind, ph = s.act[k], s.kind[k], s.phase[k]
        seg, swn, lk, hr, an = s.seg[k], s.swn[k], s.lk[k], s.hr[k], s.an[k]
        no_nodes = b.And(*[b.And(b.Not(seg[j]), b.Not(swn[j])) for j in nodes(s)])
        refs_attached = b.And(*[b.Implies(b.Or(seg[j], swn[j]), s.alive[j]) for j in nodes(s)],
                              b.Implies(lk != 0, _at(b, s.alive, lk)))
        # backup: lk is the node; segments are it and the split-off uppers above it, all on L1 only
        # a write-back eviction's backup is prepared for an unlocked device leaf (only evictions run meanwhile)
        wb_prep = b.And(_at(b, s.lock, lk) == 1, _at(b, s.href, lk) == 0, b.Not(_at(b, has_dev_child(b, s), lk)))
        backup = b.And(ph != DRAIN, lk != 0, hr == 0, an == 0, b.Not(s.abort[k]), _at(b, seg, lk), refs_attached,
                       b.Implies(b.And(ph == PREP, s.demote[k]), wb_prep),
                       *[b.Implies(seg[j], b.And(anc_x(b, s, lk, j), s.dev[j], b.Not(s.host[j]))) for j in nodes(s)],
                       *[b.Implies(swn[j], seg[j]) for j in nodes(s)],
                       b.Implies(s.pool[k], _at(b, s.mdev, lk)),
                       b.Implies(ph == PREP, b.And(b.Not(s.pool[k]), *[b.Not(swn[j]) for j in nodes(s)])))
        # load: anchor an (host-referenced), lk the first device node above it (or root); the
        # segments are exactly the nodes strictly between, all L2-only
        ve_state = b.And(_at(b, s.mdev, an), lk == an)
        load = b.And(ph != DRAIN, an != 0, hr == an, b.Not(s.abort[k]), refs_attached, _at(b, s.alive, an),
                     b.Or(lk == 0, *[b.And(lk == i, anc_x(b, s, an, i)) for i in nodes(s)]),
                     *[seg[j] == b.And(anc_x(b, s, an, j), b.Not(anc_x(b, s, lk, j))) for j in nodes(s)],
                     *[b.Implies(seg[j], b.And(b.Not(s.dev[j]), s.host[j])) for j in nodes(s)],
                     *[b.Implies(swn[j], b.And(anc_x(b, s, an, j), b.Or(seg[j], s.dev[j]))) for j in nodes(s)],
                     b.Implies(s.pool[k], b.And(b.Not(_at(b, s.mdev, an)), _at(b, s.mhost, an))),
                     b.Implies(b.And(s.side == MAMBA, b.Not(s.pool[k])), ve_state))
        anchor_data = b.Or(an == 0, b.And(_at(b, s.alive, an), b.Or(_at(b, s.dev, an), _at(b, s.host, an))))
        prefetch = b.And(lk == 0, no_nodes, b.Implies(ph != DRAIN, b.And(hr == an, anchor_data)), b.Implies(ph == DRAIN, hr == 0),
                         b.Implies(s.abort[k], ph == DRAIN), s.intact[k])
        store = b.And(ph == FLIGHT, lk == 0, an != 0, hr == an, no_nodes, b.Not(s.abort[k]), s.intact[k],
                      _at(b, s.alive, an), _at(b, s.host, an))
        parts = b.And(b.Implies(ph == PREP, b.And(b.Not(s.kvp[k]), b.Not(s.kvf[k]), b.Not(s.plp[k]), b.Not(s.plf[k]),
                                                  s.intact[k])),
                      b.Implies(b.Not(s.pool[k]), b.And(b.Not(s.plp[k]), b.Not(s.plf[k]))),
                      b.Not(b.And(s.plp[k], s.plf[k])),
                      b.Implies(b.Or(kind == BACKUP, kind == LOAD), b.Not(b.And(s.kvp[k], s.kvf[k]))))
        out.append(b.Implies(act, b.And(parts,
                                        b.Implies(kind == BACKUP, backup), b.Implies(kind == LOAD, load),
                                        b.Implies(kind == PREFETCH, prefetch), b.Implies(kind == STORE, store))))
    return b.And(*out)


def l_dead(b, s: State):
    """A free slot carries no caller lock and is referenced by no operation."""
    out = []
    for j in nodes(s):
        out.append(b.Implies(b.Not(s.alive[j]), b.And(s.clk[j] == 0, b.Not(s.lws[j]))))
    for k in _ops(s):
        out.append(b.Implies(b.And(s.act[k], s.kind[k] != PREFETCH, s.an[k] != 0), _at(b, s.alive, s.an[k])))
    return b.And(*out)


def l_busy(b, s: State):
    """Two backups/loads never work on the same node (HiCache._busy maps a node to one op)."""
    def nodes_of(k, j):
        return b.And(s.act[k], b.Or(s.kind[k] == BACKUP, s.kind[k] == LOAD), b.Or(s.seg[k][j], s.swn[k][j], s.an[k] == j))
    return b.And(*[b.Not(b.And(nodes_of(k, j), nodes_of(k2, j))) for k in _ops(s) for k2 in range(k + 1, s.M)
                   for j in nodes(s)])


LEMMAS: dict[str, Callable] = {"L-config": l_config, "L-callers": l_callers, "L-ops": l_ops, "L-busy": l_busy,
                               "L-dead": l_dead}
"""Strengthening lemmas: proved inductive together with the invariants (and reported as such)."""


def all_formulas() -> dict[str, Callable]:
    return {**ENCODINGS, **LEMMAS}


def conjunction(b, s: State):
    return b.And(*[f(b, s) for f in all_formulas().values()])


__all__ = ["ENCODINGS", "LEMMAS", "all_formulas", "conjunction", "anc"]

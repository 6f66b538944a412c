"""Each transition of the cache as a relation over `symbolic.State`, transcribed from refcache.

A transition is a function (backend, state, choices, bug) -> (guard, next state). `choices` are
the nondeterministic inputs (which node, which op slot, whether an allocation succeeded);
`bug` names a seeded bug of stateful_tests/seeded_bugs.py whose changed behaviour the function
then follows. The same function is evaluated on Z3 terms (proofs) and on Python values (drift).

Granularity follows the code: an API call that allocates is split at the allocation, because
eviction runs there while the op being prepared already holds its lock / host reference (phase
PREP); e.g. `load_back` = load_begin, any evictions, then load_submit (or load_fail on
PoolExhausted). One eviction step is one victim with its cascade. Every `book.touch` of the code
is a `touch` here, at the same point, so R2/R3/T4 prove the touches suffice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import z3

from .symbolic import (
    BACKUP,
    DRAIN,
    FLIGHT,
    KC,
    LOAD,
    MAMBA,
    NONE,
    PREFETCH,
    PREP,
    STORE,
    SWA,
    State,
    anc,
    anc_x,
    busy,
    contrib,
    devev,
    has_child,
    hostev,
    lock_target,
    noprep,
    path,
    pathlen,
    set_at,
    tomb,
    valid_end_any,
)

BUG1 = "class1_terminate_with_pool_in_flight"
BUG3 = "class3_resolve_mutates_record"
BUG4_LOAD = "class4_load_back_at_last_host"
BUG4_LOCK = "class4_lock_host_only_bottom"
BUG5 = "class5_cascade_ignores_host_ref"
# mutants: further bugs of DESIGN §4 that exist only here, to show the proofs are not vacuous
MUT_LOCK_LEAK = "mutant_lock_leak_on_fail"
MUT_SPLIT = "mutant_split_forgets_op"
MUT_DEMOTE = "mutant_demote_without_touch"
MUT_LOCK_TOUCH = "mutant_lock_without_touch"
MUT_WB_EARLY = "mutant_writeback_drops_early"
MUT_HOST_REF = "mutant_host_evict_ignores_ref"
MUT_CASCADE_LOCK = "mutant_cascade_ignores_lock"


# ------------------------------------------------------------------------------ choices
class Z3Choices:
    """Choices as fresh Z3 variables; their domains go into `constraints`."""

    def __init__(self, prefix: str, N: int, M: int):
        self.prefix, self.N, self.M = prefix, N, M
        self.vars: dict[str, z3.ExprRef] = {}
        self.constraints: list = []

    def _int(self, name, lo, hi):
        v = z3.Int(f"{self.prefix}.{name}")
        self.vars[name] = v
        self.constraints.append(v >= lo)
        if hi is not None:
            self.constraints.append(v < hi)
        return v

    def node(self, name):
        return self._int(name, 1, self.N)

    def any_node(self, name):
        return self._int(name, 0, self.N)

    def op(self, name):
        return self._int(name, 0, self.M)

    def length(self, name):
        return self._int(name, 1, None)

    def flag(self, name):
        v = z3.Bool(f"{self.prefix}.{name}")
        self.vars[name] = v
        return v


class PyChoices:
    """Concrete choices (drift checks enumerate them)."""

    def __init__(self, values: dict):
        self.values = values

    def node(self, name):
        return self.values[name]

    any_node = op = length = flag = node


# ------------------------------------------------------------------------- state updates
def touch(b, s: State, conds: list) -> State:
    """Bookkeeping.touch of every slot j with conds[j] (and of its parent): kept eviction-set
    membership and size contribution re-derived from the current fields."""
    upd = [False] * s.N
    for j in range(1, s.N):
        upd[j] = b.Or(conds[j], *[b.And(conds[c], s.alive[c], s.par[c] == j) for c in range(j + 1, s.N)])
    dv, hv = devev(b, s), hostev(b, s)
    kc = {f: list(s.n[f]) for f in KC}
    for j in range(1, s.N):
        for f, v in zip(KC, contrib(b, s, j), strict=True):
            kc[f][j] = b.If(upd[j], v, s.n[f][j])
    return s.replace(kdev=[b.If(upd[j], dv[j], s.kdev[j]) for j in range(s.N)],
                     khost=[b.If(upd[j], hv[j], s.khost[j]) for j in range(s.N)], **kc)


def touch_x(b, s: State, x) -> State:
    return touch(b, s, [False] + [x == j for j in range(1, s.N)])


def forget(b, s: State, x) -> State:
    """Bookkeeping.forget: a detached node's kept entries are taken back."""
    return s.replace(kdev=set_at(b, s.kdev, x, False), khost=set_at(b, s.khost, x, False),
                     **{f: set_at(b, s.n[f], x, False) for f in KC})


def add_path(b, s: State, fld: str, x, d: int, do_touch: bool = True) -> State:
    """HiCache._add_lock / _add_host_ref: +d on x.path_to_root(), then touch that path."""
    conds = [path(b, s, x, j) for j in range(s.N)]
    s = s.replace(**{fld: [s.n[fld][j] + b.If(conds[j], d, 0) for j in range(s.N)]})
    return touch(b, s, conds) if do_touch else s


def set_node(b, s: State, x, **vals) -> State:
    return s.replace(**{f: set_at(b, s.n[f], x, v) for f, v in vals.items()})


def set_op(b, s: State, o, **vals) -> State:
    upd = {}
    for f, v in vals.items():
        if f in s.on:
            upd[f] = [[b.If(o == k, v[j], s.on[f][k][j]) for j in range(s.N)] for k in range(s.M)]
        else:
            upd[f] = set_at(b, s.o[f], o, v)
    return s.replace(**upd)


def drop_device(b, s: State, x, do_touch: bool = True) -> State:
    """HiCache._drop_device: full KV, SWA KV and the mamba state leave L1; touch."""
    s = set_node(b, s, x, dev=False, swa=False, mdev=False)
    return touch_x(b, s, x) if do_touch else s


def drop_host(b, s: State, x) -> State:
    return set_node(b, s, x, host=False, mhost=False, swah=False)


def delete_one(b, s: State, x, bug) -> State:
    """HiCache._delete without its final cascade."""
    s = b.when(b.sel(s.dev, x), lambda s: drop_device(b, s, x), s)
    s = drop_host(b, s, x)
    p = b.sel(s.par, x)
    s = set_node(b, s, x, alive=False)
    s = forget(b, s, x)
    return touch_x(b, s, p)


def cascade_eligible(b, s: State, bug) -> list:
    hc, bz = has_child(b, s), busy(b, s)
    return [False] + [b.And(s.alive[j], b.Not(hc[j]), True if bug == MUT_CASCADE_LOCK else s.lock[j] == 0,
                            True if bug == BUG5 else s.href[j] == 0,  # class 5: host_ref ignored
                            b.Not(bz[j]), tomb(b, s, j)) for j in range(1, s.N)]


def cascade(b, s: State, x, bug) -> State:
    """HiCache._cascade(x): delete x while it is a childless tombstone nobody needs, then its
    parent, and so on (unrolled to the tree height)."""
    cur, active = x, True
    for _ in range(s.N - 1):
        cond = b.And(active, b.sel(cascade_eligible(b, s, bug), cur))
        if cond is False:
            break
        nxt = b.sel(s.par, cur)
        c = cur
        s = b.when(cond, lambda s, c=c: delete_one(b, s, c, bug), s)
        active, cur = cond, nxt
    return s


def delete(b, s: State, x, bug) -> State:
    """HiCache._delete(x): remove x, then cascade from its parent."""
    p = b.sel(s.par, x)
    s = delete_one(b, s, x, bug)
    return cascade(b, s, p, bug)


def new_node(b, s: State, u, parent, length, **vals) -> State:
    """A fresh slot u becomes a node under `parent` (no data unless given)."""
    base = dict(alive=True, par=parent, ln=length, dev=False, host=False, mdev=False, mhost=False, swa=False,
                swah=False, lock=0, href=0, clk=0, lws=False, recok=True)
    base.update(vals)
    return set_node(b, s, u, **base)


def fresh_slot(b, s: State, u, above):
    """u is a free slot numbered after `above` (so parents keep smaller numbers)."""
    return b.And(b.Not(b.sel(s.alive, u)), u > above)


def op_free(b, s: State, o):
    return b.Not(b.sel(s.act, o))


def op_is(b, s: State, o, kind, phase):
    return b.And(b.sel(s.act, o), b.sel(s.kind, o) == kind, b.sel(s.phase, o) == phase)


def new_op(b, s: State, o, kind, phase, lk=0, hr=0, an=0, seg=None, swn=None, pool=False, demote=False) -> State:
    return set_op(b, s, o, act=True, kind=kind, phase=phase, lk=lk, hr=hr, an=an,
                  seg=seg or [False] * s.N, swn=swn or [False] * s.N, pool=pool, kvp=phase != PREP,
                  kvf=False, plp=b.And(pool, phase != PREP), plf=False, intact=True, demote=demote, abort=False)


def finish(b, s: State, o) -> State:
    """HiCache._finish: the op leaves cache.ops; its lock and host reference are released."""
    lk, hr = b.sel(s.lk, o), b.sel(s.hr, o)
    s = set_op(b, s, o, act=False)
    s = b.when(lk != 0, lambda s: add_path(b, s, "lock", lk, -1), s)
    return b.when(hr != 0, lambda s: add_path(b, s, "href", hr, -1), s)


def op_row(b, s: State, f: str, o) -> list:
    return [b.sel([s.on[f][k][j] for k in range(s.M)], o) for j in range(s.N)]


def pending(b, s: State, o):
    return b.Or(b.sel(s.kvp, o), b.And(b.sel(s.pool, o), b.sel(s.plp, o)))


# --------------------------------------------------------------------------- transitions
def t_insert(b, s, ch, bug):
    """HiCache.insert(path of d [+ a new leaf u]): adopt the caller's KV for nodes on the path
    not on device (stop, taking nothing more, at a node a load is bringing), add the leaf, give
    the end node the caller's mamba slot, touch what was passed."""
    d, leaf, u, L = ch.any_node("d"), ch.flag("leaf"), ch.node("u"), ch.length("L")
    g = b.And(noprep(b, s), b.sel(s.alive, d), b.Or(leaf, d != 0), b.Implies(leaf, fresh_slot(b, s, u, d)))
    if b.skip(g):
        return g, s
    bz = busy(b, s)
    on = [path(b, s, d, j) for j in range(s.N)]
    stop = [b.And(on[j], b.Not(s.dev[j]), bz[j]) for j in range(s.N)]
    adopt = [False] + [b.And(on[j], b.Not(s.dev[j]), b.Not(bz[j]),
                             *[b.Not(b.And(stop[k], anc(b, s, j, k))) for k in range(1, j)]) for j in range(1, s.N)]
    stopped = b.Or(*stop)
    s1 = s.replace(dev=[b.Or(s.dev[j], adopt[j]) for j in range(s.N)],
                   swa=[b.If(adopt[j], s.side == SWA, s.swa[j]) for j in range(s.N)])

    def rest(s):
        s = b.when(leaf, lambda s: new_node(b, s, u, d, L, dev=True, swa=s.side == SWA), s)
        end = b.If(leaf, u, d)
        give = b.And(s.side == MAMBA, b.Not(b.sel(s.mdev, end)), b.sel(s.dev, end), b.Not(b.sel(busy(b, s), end)))
        s = b.when(give, lambda s: set_node(b, s, end, mdev=True), s)
        return touch(b, s, [False] + [b.Or(on[j], b.And(leaf, u == j)) for j in range(1, s.N)])

    return g, b.when(b.Not(stopped), rest, s1)


def t_split(b, s, ch, bug):
    """HiCache._split(c, at) (match_prefix / insert / prefetch ending inside c): a new upper
    node u takes the first `a` pages, copies tiers, SWA flags, lock and host counts; c keeps
    its mamba state; the op moving c moves u too; touch(upper, child)."""
    c, u, a = ch.node("c"), ch.node("u"), ch.length("a")
    p = b.sel(s.par, c)
    ln = b.sel(s.ln, c)
    g = b.And(noprep(b, s), b.sel(s.alive, c), a < ln, b.Not(b.sel(s.alive, u)), u > p, u < c)
    if b.skip(g):
        return g, s
    s2 = new_node(b, s, u, p, a, dev=b.sel(s.dev, c), host=b.sel(s.host, c), swa=b.sel(s.swa, c),
                  swah=b.sel(s.swah, c), lock=b.sel(s.lock, c), href=b.sel(s.href, c))
    s2 = set_node(b, s2, c, par=u, ln=ln - a)
    if bug != MUT_SPLIT:  # the mutant leaves the upper half out of the op that moves c
        on = {}
        for f in ("seg", "swn"):
            on[f] = [[b.If(u == j, b.sel(s.on[f][k], c), s.on[f][k][j]) for j in range(s.N)] for k in range(s.M)]
        s2 = s2.replace(**on)
    return g, touch(b, s2, [False] + [b.Or(u == j, c == j) for j in range(1, s.N)])


def t_lock(b, s, ch, bug):
    """HiCache.lock(x): the deepest node at or above x on device gets a caller lock."""
    x = ch.node("x")
    if b.skip(b.And(noprep(b, s), b.sel(s.alive, x))):
        return False, s
    t = x if bug == BUG4_LOCK else lock_target(b, s, x)  # class 4: a host-only bottom is locked itself

    def do(s):
        s = set_node(b, s, t, clk=b.sel(s.clk, t) + 1, lws=b.Or(b.sel(s.lws, t), b.sel(s.mdev, t)))
        return add_path(b, s, "lock", t, +1, do_touch=bug != MUT_LOCK_TOUCH)

    return b.And(noprep(b, s), b.sel(s.alive, x)), b.when(t != 0, do, s)


def t_unlock(b, s, ch, bug):
    """HiCache.unlock(t): release one caller lock."""
    t = ch.node("t")
    g = b.And(noprep(b, s), b.sel(s.alive, t), b.sel(s.clk, t) > 0)
    if b.skip(g):
        return g, s
    left = b.sel(s.clk, t) - 1
    s = set_node(b, s, t, clk=left, lws=b.And(b.sel(s.lws, t), left > 0))
    return g, add_path(b, s, "lock", t, -1)


def _victim(b, s, x):
    return b.And(b.sel(s.alive, x), b.sel(devev(b, s), x))


def _tries_writeback(b, s, x):
    return b.And(s.wb, b.Not(b.sel(busy(b, s), x)))


def t_evict_demote(b, s, ch, bug):
    """HiCache._evict_one on a device leaf with L2 data: drop its L1 values, cascade from it."""
    x = ch.node("x")
    g = b.And(_victim(b, s, x), b.sel(s.host, x))
    if b.skip(g):
        return g, s
    return g, cascade(b, drop_device(b, s, x, do_touch=bug != MUT_DEMOTE), x, bug)


def t_evict_interior(b, s, ch, bug):
    """... a device leaf without L2 data whose children are host-only: it keeps the tree shape."""
    x = ch.node("x")
    g = b.And(_victim(b, s, x), b.Not(b.sel(s.host, x)), b.sel(has_child(b, s), x), b.Not(_tries_writeback(b, s, x)))
    if b.skip(g):
        return g, s
    return g, drop_device(b, s, x)


def t_evict_delete(b, s, ch, bug):
    """... a childless device leaf without L2 data: deleted, cascading up."""
    x = ch.node("x")
    g = b.And(_victim(b, s, x), b.Not(b.sel(s.host, x)), b.Not(b.sel(has_child(b, s), x)),
              b.Not(_tries_writeback(b, s, x)))
    if b.skip(g):
        return g, s
    return g, delete(b, s, x, bug)


def _backup_begin(b, s, x, o, demote):
    s = add_path(b, s, "lock", x, +1)  # keep x while L2 room is made
    return new_op(b, s, o, BACKUP, PREP, lk=x, seg=[False] + [x == j for j in range(1, s.N)], demote=demote)


def t_evict_writeback(b, s, ch, bug):
    """... under write-back, an unbacked leaf is first backed up (demoted when it completes)."""
    x, o = ch.node("x"), ch.op("o")
    g = b.And(_victim(b, s, x), b.Not(b.sel(s.host, x)), _tries_writeback(b, s, x), op_free(b, s, o))
    if b.skip(g):
        return g, s
    s = _backup_begin(b, s, x, o, True)
    return g, drop_device(b, s, x) if bug == MUT_WB_EARLY else s


def t_evict_host(b, s, ch, bug):
    """HiCache.evict_host step: a node of the kept L2 eviction set is deleted, cascading up."""
    x = ch.node("x")
    if bug == MUT_HOST_REF:  # the mutant's L2 candidates ignore host references
        g = b.And(b.sel(s.alive, x), b.sel(s.host, x), b.Not(b.sel(s.dev, x)), b.Not(b.sel(has_child(b, s), x)))
    else:
        g = b.And(b.sel(s.khost, x), b.sel(s.alive, x), b.Not(b.sel(has_child(b, s), x)),
                  b.sel(s.lock, x) == 0, b.sel(s.href, x) == 0)  # _delete's assertion
    if b.skip(g):
        return g, s
    return g, delete(b, s, x, bug)


def _evict_sidecar_effect(b, s, x):
    s = s.replace(mdev=set_at(b, s.mdev, x, b.And(b.sel(s.mdev, x), s.side != MAMBA)),
                  swa=set_at(b, s.swa, x, b.And(b.sel(s.swa, x), s.side != SWA)))
    return touch_x(b, s, x)


def t_evict_sidecar(b, s, ch, bug):
    """HiCache._evict_sidecar on a node that is not device-evictable: only its mamba state / SWA
    KV leaves L1 (an interior tombstone)."""
    x = ch.node("x")
    holds = b.Or(b.And(s.side == MAMBA, b.sel(s.mdev, x)), b.And(s.side == SWA, b.sel(s.swa, x)))
    g = b.And(b.sel(s.alive, x), b.sel(s.lock, x) == 0, holds, b.Not(b.sel(busy(b, s), x)),
              b.Not(b.sel(devev(b, s), x)))
    if b.skip(g):
        return g, s
    return g, _evict_sidecar_effect(b, s, x)


def t_cascade(b, s, ch, bug):
    """HiCache._cascade(x) on any attached node (as _release and write-back demotion call it)."""
    x = ch.node("x")
    if b.skip(b.sel(s.alive, x)):
        return False, s
    return b.sel(s.alive, x), cascade(b, s, x, bug)


def t_backup_begin(b, s, ch, bug):
    """HiCache.write_backup(x) (also write-through / selective): lock x, then make L2 room."""
    x, o = ch.node("x"), ch.op("o")
    g = b.And(noprep(b, s), op_free(b, s, o), b.sel(s.alive, x), b.sel(s.dev, x), b.Not(b.sel(s.host, x)),
              b.Not(b.sel(busy(b, s), x)))
    if b.skip(g):
        return g, s
    return g, _backup_begin(b, s, x, o, False)


def _submit_intact(b, pool, bug):
    return b.Not(pool) if bug == BUG3 else True  # class 3: resolve mutates the records in place


def t_backup_submit(b, s, ch, bug):
    """... L2 slots allocated: the op (KV + the mamba state as a pool transfer when an L2 state
    slot could be had) is submitted; its nodes become busy."""
    o, slot_ok = ch.op("o"), ch.flag("slot_ok")
    x = b.sel(s.lk, o)
    g = op_is(b, s, o, BACKUP, PREP)
    if b.skip(g):
        return g, s
    pool = b.And(s.side == MAMBA, b.sel(s.mdev, x), slot_ok)
    swn = [False] + [b.And(x == j, s.swa[j]) for j in range(1, s.N)]
    return g, set_op(b, s, o, phase=FLIGHT, pool=pool, swn=swn, kvp=True, kvf=False, plp=pool, plf=False,
                     intact=_submit_intact(b, pool, bug))


def t_backup_fail(b, s, ch, bug):
    """... L2 could not make room (PoolExhaustedError): the lock is released; under write-back
    eviction _evict_one goes on with the node (drop or delete)."""
    o = ch.op("o")
    x = b.sel(s.lk, o)
    demote = b.sel(s.demote, o)
    s2 = add_path(b, set_op(b, s, o, act=False), "lock", x, -1)

    def go_on(s):
        return b.when(b.sel(has_child(b, s), x), lambda s: drop_device(b, s, x),
                      b.when(b.Not(b.sel(has_child(b, s), x)), lambda s: delete(b, s, x, bug), s))

    return op_is(b, s, o, BACKUP, PREP), b.when(demote, go_on, s2)


def t_load_begin(b, s, ch, bug):
    """HiCache.load_back(x): x must be a valid match end (class 4 variant: the last host node,
    unchecked); the path from x up to the first device node must be on L2; lock that device
    node, host-reference x, then make L1 room."""
    x, o = ch.node("x"), ch.op("o")
    top = lock_target(b, s, x)
    on = [False] + [b.And(anc_x(b, s, x, j), b.Not(anc_x(b, s, top, j))) for j in range(1, s.N)]
    if bug == BUG4_LOAD:  # match's last_host_node: x and everything above it hold data
        anchor_ok = b.And(*[b.Implies(anc_x(b, s, x, j), b.Or(s.dev[j], s.host[j])) for j in range(1, s.N)])
    else:
        anchor_ok = b.sel(valid_end_any(b, s), x)
    need_state = b.And(s.side == MAMBA, b.Not(b.sel(s.mdev, x)))
    pl = pathlen(b, s)
    px = b.sel(pl, x)
    swn = [False] + [b.And(s.side == SWA, anc_x(b, s, x, j), px - pl[j] < s.W, b.Not(s.swa[j])) for j in range(1, s.N)]
    bz = busy(b, s)
    g = b.And(noprep(b, s), op_free(b, s, o), b.sel(s.alive, x), anchor_ok,
              *[b.Implies(on[j], s.host[j]) for j in range(1, s.N)],
              *[b.Not(b.And(b.Or(on[j], swn[j], x == j), bz[j])) for j in range(1, s.N)],
              b.Or(*on, need_state, *swn))
    if b.skip(g):
        return g, s
    s = b.when(top != 0, lambda s: add_path(b, s, "lock", top, +1), s)
    s = add_path(b, s, "href", x, +1)
    return g, new_op(b, s, o, LOAD, PREP, lk=top, hr=x, an=x, seg=on, swn=swn, pool=need_state)


def t_load_submit(b, s, ch, bug):
    """... L1 (and a state slot) allocated: the load is submitted; its nodes become busy."""
    o = ch.op("o")
    pool = b.sel(s.pool, o)
    return op_is(b, s, o, LOAD, PREP), set_op(b, s, o, phase=FLIGHT, kvp=True, kvf=False, plp=pool, plf=False,
                                              intact=_submit_intact(b, pool, bug))


def t_load_fail(b, s, ch, bug):
    """... L1 could not make room: lock and host reference are released."""
    o = ch.op("o")
    if bug == MUT_LOCK_LEAK:  # the mutant forgets the lock (keeps releasing the host reference)
        return op_is(b, s, o, LOAD, PREP), finish(b, set_op(b, s, o, lk=0), o)
    return op_is(b, s, o, LOAD, PREP), finish(b, s, o)


def t_part_done(b, s, ch, bug):
    """The executor completes a part: the KV part (a prefetch/store has one per page: some may
    still be pending) or the pool transfer."""
    o, pool_part, more = ch.op("o"), ch.flag("pool_part"), ch.flag("more")
    many = b.Or(b.sel(s.kind, o) == PREFETCH, b.sel(s.kind, o) == STORE)
    g = b.And(b.sel(s.act, o), b.sel(s.phase, o) != PREP,
              b.If(pool_part, b.And(b.sel(s.pool, o), b.sel(s.plp, o)), b.sel(s.kvp, o)))
    if b.skip(g):
        return g, s
    s = set_op(b, s, o, kvp=b.If(pool_part, b.sel(s.kvp, o), b.And(more, many)),
               plp=b.And(b.sel(s.plp, o), b.Not(pool_part)))
    return g, s


def t_part_fail(b, s, ch, bug):
    """The executor fails a part (a copy error, an L3 miss)."""
    o, pool_part, more = ch.op("o"), ch.flag("pool_part"), ch.flag("more")
    many = b.Or(b.sel(s.kind, o) == PREFETCH, b.sel(s.kind, o) == STORE)
    g = b.And(b.sel(s.act, o), b.sel(s.phase, o) != PREP,
              b.If(pool_part, b.And(b.sel(s.pool, o), b.sel(s.plp, o)), b.sel(s.kvp, o)))
    if b.skip(g):
        return g, s
    s = set_op(b, s, o, kvp=b.If(pool_part, b.sel(s.kvp, o), b.And(more, many)),
               kvf=b.Or(b.sel(s.kvf, o), b.Not(pool_part)),
               plp=b.And(b.sel(s.plp, o), b.Not(pool_part)), plf=b.Or(b.sel(s.plf, o), pool_part))
    return g, s


def _settled_ok(b, s, o):
    pool = b.sel(s.pool, o)
    return b.And(b.Not(b.sel(s.kvp, o)), b.Not(b.And(pool, b.sel(s.plp, o))))


def _failed(b, s, o):
    return b.Or(b.sel(s.kvf, o), b.And(b.sel(s.pool, o), b.sel(s.plf, o)))


def t_poll_ack(b, s, ch, bug):
    """HiCache.poll -> _ack of a backup or load whose parts all completed: values move to the
    nodes (a backup's pool transfer record becomes the node's L2 mamba record), then _finish,
    touch, and a write-back backup's node is demoted and cascaded."""
    o = ch.op("o")
    kind = b.sel(s.kind, o)
    g = b.And(noprep(b, s), b.sel(s.act, o), b.sel(s.phase, o) == FLIGHT, b.Or(kind == BACKUP, kind == LOAD),
              _settled_ok(b, s, o), b.Not(_failed(b, s, o)))
    if b.skip(g):
        return g, s
    seg, swn = op_row(b, s, "seg", o), op_row(b, s, "swn", o)
    pool, lk, an = b.sel(s.pool, o), b.sel(s.lk, o), b.sel(s.an, o)
    isb = kind == BACKUP
    s2 = s.replace(host=[b.Or(s.host[j], b.And(isb, seg[j])) for j in range(s.N)],
                   swah=[b.Or(s.swah[j], b.And(isb, swn[j])) for j in range(s.N)],
                   dev=[b.Or(s.dev[j], b.And(b.Not(isb), seg[j])) for j in range(s.N)],
                   swa=[b.Or(s.swa[j], b.And(b.Not(isb), swn[j])) for j in range(s.N)])
    s2 = b.when(b.And(isb, pool), lambda s: set_node(b, s, lk, mhost=True, recok=b.sel(s.intact, o)), s2)
    s2 = b.when(b.And(b.Not(isb), pool), lambda s: set_node(b, s, an, mdev=True), s2)
    s2 = finish(b, s2, o)
    s2 = touch(b, s2, [False] + [b.Or(seg[j], swn[j]) for j in range(1, s.N)])
    demote = b.And(isb, b.sel(s.demote, o), b.sel(s2.alive, lk), b.sel(devev(b, s2), lk))
    s2 = b.when(demote, lambda s: cascade(b, drop_device(b, s, lk), lk, bug), s2)
    return g, s2


def t_poll_release(b, s, ch, bug):
    """HiCache.poll -> _release of a backup or load with a failed part: its slots are freed,
    lock and host reference released, its segments touched and cascaded. (Segments form a
    chain released top-down, so only the deepest one can be childless when its turn comes.)"""
    o = ch.op("o")
    kind = b.sel(s.kind, o)
    g = b.And(noprep(b, s), b.sel(s.act, o), b.sel(s.phase, o) == FLIGHT, b.Or(kind == BACKUP, kind == LOAD),
              _settled_ok(b, s, o), _failed(b, s, o))
    if b.skip(g):
        return g, s
    seg = op_row(b, s, "seg", o)
    deepest = b.If(kind == BACKUP, b.sel(s.lk, o), b.sel(s.an, o))
    s2 = finish(b, s, o)
    s2 = touch(b, s2, [False] + seg[1:])
    go = b.And(b.sel(seg, deepest), b.sel(s2.alive, deepest))
    return g, b.when(go, lambda s: cascade(b, s, deepest, bug), s2)


def t_prefetch_begin(b, s, ch, bug):
    """HiCache.prefetch(rid, x, tokens): x (the last host node, or the root) is host-referenced
    while L2 room is made."""
    x, o = ch.any_node("x"), ch.op("o")
    g = b.And(noprep(b, s), op_free(b, s, o), b.sel(s.alive, x),
              b.Or(x == 0, b.sel(s.dev, x), b.sel(s.host, x)))
    if b.skip(g):
        return g, s
    s = b.when(x != 0, lambda s: add_path(b, s, "href", x, +1), s)
    return g, new_op(b, s, o, PREFETCH, PREP, hr=x, an=x)


def t_prefetch_submit(b, s, ch, bug):
    """... L2 allocated: page reads and (mamba, state in L3, L2 slot had) the state read."""
    o, state = ch.op("o"), ch.flag("state")
    pool = b.And(s.side == MAMBA, state)
    return op_is(b, s, o, PREFETCH, PREP), set_op(b, s, o, phase=FLIGHT, pool=pool, kvp=True, kvf=False,
                                                  plp=pool, plf=False)


def t_prefetch_fail(b, s, ch, bug):
    """... L2 exhausted even after truncation: the anchor's host reference is released."""
    o = ch.op("o")
    return op_is(b, s, o, PREFETCH, PREP), finish(b, s, o)


def _detach(b, s, o):
    """_detach_prefetch + _drain: drop the anchor's reference; finish once nothing is pending."""
    hr = b.sel(s.hr, o)
    s = b.when(hr != 0, lambda s: add_path(b, s, "href", hr, -1), s)
    s = set_op(b, s, o, hr=0, phase=DRAIN)
    return b.when(_settled_ok(b, s, o), lambda s: set_op(b, s, o, act=False), s)


def t_prefetch_terminate(b, s, ch, bug):
    """prefetch_progress -> _terminate_prefetch: allowed by policy and (clean code) no pool
    transfer in flight. The leading pages that arrived hang under the anchor: data-less nodes on
    the way take their L2 pages, a new host-only leaf u under d holds the rest; with all pages and
    the state arrived, the end node takes the pool transfer record as its L2 mamba record."""
    o, got, d, leaf, u, L = ch.op("o"), ch.flag("got"), ch.any_node("d"), ch.flag("leaf"), ch.node("u"), ch.length("L")
    x = b.sel(s.an, o)
    pool, plp, plf = b.sel(s.pool, o), b.sel(s.plp, o), b.sel(s.plf, o)
    full = b.And(b.Not(b.sel(s.kvp, o)), b.Not(b.sel(s.kvf, o)))
    g = b.And(noprep(b, s), op_is(b, s, o, PREFETCH, FLIGHT), b.Implies(full, got),
              True if bug == BUG1 else b.Not(b.And(pool, plp)),  # class 1: the pool transfer is not waited for
              b.Implies(got, b.sel(s.alive, d)),
              b.Implies(got, b.And(_is_desc(b, s, d, x), b.Or(d != x, leaf))),
              b.Implies(b.And(got, leaf), fresh_slot(b, s, u, d)))
    if b.skip(g):
        return g, s
    on = [False] + [b.And(got, b.Not(x == j), anc_x(b, s, d, j), _desc_of(b, s, j, x))
                    for j in range(1, s.N)]
    take = [False] + [b.And(on[j], b.Not(s.dev[j]), b.Not(s.host[j])) for j in range(1, s.N)]
    s2 = s.replace(host=[b.Or(s.host[j], take[j]) for j in range(s.N)],
                   swah=[b.If(take[j], s.side == SWA, s.swah[j]) for j in range(s.N)])
    s2 = b.when(b.And(got, leaf), lambda s: new_node(b, s, u, d, L, host=True, swah=s.side == SWA), s2)
    s2 = touch(b, s2, [False] + [b.Or(take[j], b.And(got, leaf, u == j)) for j in range(1, s.N)])
    end = b.If(leaf, u, d)
    hand = b.And(got, full, pool, b.Not(b.sel(s2.mhost, end)), b.sel(s2.host, end), b.Not(plp), b.Not(plf))
    s2 = b.when(hand, lambda s: touch_x(b, set_op(b, set_node(b, s, end, mhost=True, recok=True), o, pool=False),
                                        end), s2)
    return g, _detach(b, s2, o)


def _is_desc(b, s, d, x):
    """d is a descendant-or-self of x (both possibly symbolic)."""
    if not b.symbolic:
        return anc(b, s, d, x)
    return b.Or(*[b.And(d == i, x == j, anc(b, s, i, j)) for i in range(s.N) for j in range(i + 1)])


def _desc_of(b, s, j: int, x):
    """Slot j is a descendant-or-self of the (possibly symbolic) x."""
    if not b.symbolic:
        return anc(b, s, j, x)
    return b.Or(*[b.And(x == k, anc(b, s, j, k)) for k in range(j + 1)])


def t_prefetch_abort(b, s, ch, bug):
    """HiCache.abort_prefetch: the request is gone; release the anchor, drain."""
    o = ch.op("o")
    g = b.And(noprep(b, s), op_is(b, s, o, PREFETCH, FLIGHT))
    if b.skip(g):
        return g, s
    return g, _detach(b, set_op(b, s, o, abort=True), o)


def t_prefetch_drain(b, s, ch, bug):
    """HiCache.poll -> _drain of a detached prefetch whose reads have all settled."""
    o = ch.op("o")
    g = b.And(noprep(b, s), op_is(b, s, o, PREFETCH, DRAIN), _settled_ok(b, s, o))
    if b.skip(g):
        return g, s
    return g, set_op(b, s, o, act=False)


def t_store_begin(b, s, ch, bug):
    """HiCache.write_backup_storage(x): host-reference x while its L2 pages (and state) go to L3."""
    x, o, state = ch.node("x"), ch.op("o"), ch.flag("state")
    g = b.And(noprep(b, s), op_free(b, s, o), b.sel(s.alive, x), b.sel(s.host, x), b.Not(b.sel(busy(b, s), x)))
    if b.skip(g):
        return g, s
    s = add_path(b, s, "href", x, +1)
    pool = b.And(s.side == MAMBA, b.sel(s.mhost, x), state)
    return g, new_op(b, s, o, STORE, FLIGHT, hr=x, an=x, pool=pool)


def t_store_finish(b, s, ch, bug):
    """HiCache.poll -> _finish of a store whose writes settled."""
    o = ch.op("o")
    g = b.And(noprep(b, s), b.sel(s.act, o), b.sel(s.kind, o) == STORE, _settled_ok(b, s, o))
    if b.skip(g):
        return g, s
    return g, finish(b, s, o)


@dataclass(frozen=True)
class Transition:
    name: str
    fn: Callable
    choices: tuple[tuple[str, str], ...]  # (name, domain): node, any_node, op, flag, length
    api: str  # the HiCache call (or the step inside one) it is
    in_prep: bool = False  # may run while an op is being prepared (eviction inside an allocation)

    @property
    def doc(self) -> str:
        return " ".join((self.fn.__doc__ or "").split())


_N, _A, _O, _F, _L = "node", "any_node", "op", "flag", "length"
TRANSITIONS: dict[str, Transition] = {t.name: t for t in [
    Transition("insert", t_insert, (("d", _A), ("leaf", _F), ("u", _N), ("L", _L)), "insert"),
    Transition("split", t_split, (("c", _N), ("u", _N), ("a", _L)), "match_prefix"),
    Transition("lock", t_lock, (("x", _N),), "lock"),
    Transition("unlock", t_unlock, (("t", _N),), "unlock"),
    Transition("evict_demote", t_evict_demote, (("x", _N),), "evict", True),
    Transition("evict_interior", t_evict_interior, (("x", _N),), "evict", True),
    Transition("evict_delete", t_evict_delete, (("x", _N),), "evict", True),
    Transition("evict_writeback", t_evict_writeback, (("x", _N), ("o", _O)), "evict", True),
    Transition("evict_host", t_evict_host, (("x", _N),), "evict_host", True),
    Transition("evict_sidecar", t_evict_sidecar, (("x", _N),), "evict_mamba/evict_swa", True),
    Transition("cascade", t_cascade, (("x", _N),), "_cascade (inside evict/poll)", True),
    Transition("backup_begin", t_backup_begin, (("x", _N), ("o", _O)), "write_backup"),
    Transition("backup_submit", t_backup_submit, (("o", _O), ("slot_ok", _F)), "write_backup", True),
    Transition("backup_fail", t_backup_fail, (("o", _O),), "write_backup", True),
    Transition("load_begin", t_load_begin, (("x", _N), ("o", _O)), "load_back"),
    Transition("load_submit", t_load_submit, (("o", _O),), "load_back", True),
    Transition("load_fail", t_load_fail, (("o", _O),), "load_back", True),
    Transition("part_done", t_part_done, (("o", _O), ("pool_part", _F), ("more", _F)), "executor.complete"),
    Transition("part_fail", t_part_fail, (("o", _O), ("pool_part", _F), ("more", _F)), "executor.fail"),
    Transition("poll_ack", t_poll_ack, (("o", _O),), "poll"),
    Transition("poll_release", t_poll_release, (("o", _O),), "poll"),
    Transition("prefetch_begin", t_prefetch_begin, (("x", _A), ("o", _O)), "prefetch"),
    Transition("prefetch_submit", t_prefetch_submit, (("o", _O), ("state", _F)), "prefetch", True),
    Transition("prefetch_fail", t_prefetch_fail, (("o", _O),), "prefetch", True),
    Transition("prefetch_terminate", t_prefetch_terminate,
               (("o", _O), ("got", _F), ("d", _A), ("leaf", _F), ("u", _N), ("L", _L)), "prefetch_progress"),
    Transition("prefetch_abort", t_prefetch_abort, (("o", _O),), "abort_prefetch"),
    Transition("prefetch_drain", t_prefetch_drain, (("o", _O),), "poll"),
    Transition("store_begin", t_store_begin, (("x", _N), ("o", _O), ("state", _F)), "write_backup_storage"),
    Transition("store_finish", t_store_finish, (("o", _O),), "poll"),
]}

BUG_TRANSITIONS: dict[str, tuple[str, ...]] = {
    BUG1: ("prefetch_terminate",),
    BUG3: ("backup_submit", "load_submit"),
    BUG4_LOAD: ("load_begin",),
    BUG4_LOCK: ("lock",),
    BUG5: ("cascade", "evict_demote", "evict_delete", "evict_host", "poll_ack", "poll_release", "backup_fail"),
}
"""The transitions whose code each seeded bug changes (the others are unaffected by it)."""

MUTANT_TRANSITIONS: dict[str, tuple[str, ...]] = {
    MUT_LOCK_LEAK: ("load_fail",),
    MUT_SPLIT: ("split",),
    MUT_DEMOTE: ("evict_demote",),
    MUT_LOCK_TOUCH: ("lock",),
    MUT_WB_EARLY: ("evict_writeback",),
    MUT_HOST_REF: ("evict_host",),
    MUT_CASCADE_LOCK: ("cascade",),
}

SIDE_NAMES = {NONE: "full", MAMBA: "mamba", SWA: "swa"}

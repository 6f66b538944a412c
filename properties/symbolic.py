"""The cache as bounded state over a backend: Z3 terms (for proofs) or plain Python values (for
checking concrete steps of the stateful suite against the very same relation, see drift.py).

A state has N node slots (slot 0 is the root, always attached) and M operation slots. A node's
parent has a smaller slot number, so ancestry is a finite formula; a tree of n <= N nodes can
always be numbered that way, so no tree is left out. Per node: attached, parent, length in pages,
tier flags (full KV on device/host, mamba state on device/host, SWA KV on device/host),
lock_ref, host_ref, caller locks held on it, whether a caller locked it with a state (T5),
whether its L2 mamba record still holds host indices (X1), and the *kept* bookkeeping (eviction
set membership and size contribution as last derived by `Bookkeeping.touch`, R2/R3/T4).
Per operation: in cache.ops, phase (0 preparing inside the API call, 1 in flight, 2 draining),
kind, the nodes it locks / host-references / anchors at, its segments and SWA nodes, whether it
has a pool transfer, the executor status of its KV part and pool part, records intact (X1),
demote-on-done, aborted. Config: sidecar (0 none, 1 mamba, 2 swa), SWA window (pages), write-back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import z3

NODE_BOOL = ("alive", "dev", "host", "mdev", "mhost", "swa", "swah", "lws", "recok", "kdev", "khost")
KC = ("c_dev", "c_host", "c_mdev", "c_mhost", "c_swa", "c_swah", "c_dprot", "c_hprot")
NODE_INT = ("par", "ln", "lock", "href", "clk")
OP_BOOL = ("act", "pool", "kvp", "kvf", "plp", "plf", "intact", "demote", "abort")
OP_INT = ("phase", "kind", "lk", "hr", "an")
OP_NODE = ("seg", "swn")

BACKUP, LOAD, PREFETCH, STORE = 0, 1, 2, 3
KINDS = {BACKUP: "backup", LOAD: "load", PREFETCH: "prefetch", STORE: "store"}
PREP, FLIGHT, DRAIN = 0, 1, 2
NONE, MAMBA, SWA = 0, 1, 2
SIDECARS = {NONE: None, MAMBA: "mamba", SWA: "swa"}


# ------------------------------------------------------------------------------- backends
class PyBackend:
    """Concrete evaluation: the relation computed on plain bools and ints."""

    symbolic = False
    T, F = True, False

    @staticmethod
    def If(c, a, b):
        return a if c else b

    @staticmethod
    def And(*xs):
        return all(xs)

    @staticmethod
    def Or(*xs):
        return any(xs)

    @staticmethod
    def Not(x):
        return not x

    @staticmethod
    def Implies(a, b):
        return (not a) or b

    @staticmethod
    def Sum(xs):
        return sum(xs)

    @staticmethod
    def sel(arr, x):
        return arr[x]

    @staticmethod
    def when(cond, fn, s):
        return fn(s) if cond else s

    @staticmethod
    def skip(guard) -> bool:
        """Concrete evaluation need not compute the successor of a disabled transition."""
        return not guard


class Z3Backend:
    """Symbolic evaluation: every result is a Z3 term (Python constants are folded away)."""

    symbolic = True
    T, F = True, False

    @staticmethod
    def If(c, a, b):
        if isinstance(c, bool):
            return a if c else b
        if a is b:
            return a
        if isinstance(a, bool) and isinstance(b, bool):
            if a == b:
                return a
            return c if a else z3.Not(c)
        return z3.If(c, a, b)

    @staticmethod
    def And(*xs):
        out = []
        for x in xs:
            if x is False:
                return False
            if x is not True:
                out.append(x)
        if not out:
            return True
        return out[0] if len(out) == 1 else z3.And(*out)

    @staticmethod
    def Or(*xs):
        out = []
        for x in xs:
            if x is True:
                return True
            if x is not False:
                out.append(x)
        if not out:
            return False
        return out[0] if len(out) == 1 else z3.Or(*out)

    @staticmethod
    def Not(x):
        return (not x) if isinstance(x, bool) else z3.Not(x)

    @classmethod
    def Implies(cls, a, b):
        return cls.Or(cls.Not(a), b)

    @staticmethod
    def Sum(xs):
        xs = [x for x in xs if not (isinstance(x, int) and x == 0)]
        if not xs:
            return 0
        return xs[0] if len(xs) == 1 else z3.Sum(*xs)

    @classmethod
    def sel(cls, arr, x):
        if isinstance(x, int):
            return arr[x]
        res = arr[0]
        for j in range(1, len(arr)):
            res = cls.If(x == j, arr[j], res)
        return res

    @staticmethod
    def skip(guard) -> bool:
        return guard is False

    @classmethod
    def when(cls, cond, fn, s):
        if isinstance(cond, bool):
            return fn(s) if cond else s
        return merge(cls, cond, fn(s), s)


PY = PyBackend()
Z3 = Z3Backend()


def eq(x, j):
    """x == j for a node/op reference that may be a Python int or a Z3 term."""
    return x == j


# ---------------------------------------------------------------------------------- state
_OWN = frozenset({"N", "M", "n", "o", "on", "cfg", "memo"})


@dataclass
class State:
    N: int
    M: int
    n: dict  # node field -> list over slots
    o: dict  # op field -> list over op slots
    on: dict  # op x node field -> list over ops of lists over slots
    cfg: dict  # side, W, wb
    memo: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        # every field of the parts as a plain attribute: the drift check reads millions of them,
        # and __getattr__'s search through four dicts was most of its time (n wins, as there)
        d = self.__dict__
        for part in (self.cfg, self.on, self.o, self.n):
            d.update((k, v) for k, v in part.items() if k not in _OWN)

    def __getattr__(self, name):
        d = self.__dict__
        for part in ("n", "o", "on", "cfg"):
            if name in d.get(part, {}):
                return d[part][name]
        raise AttributeError(name)

    def replace(self, **fields) -> State:
        """A new state with some fields replaced (memoised ancestry kept when parents are)."""
        n, o, on, cfg = dict(self.n), dict(self.o), dict(self.on), dict(self.cfg)
        for k, v in fields.items():
            for part in (n, o, on, cfg):
                if k in part:
                    part[k] = v
                    break
            else:
                raise KeyError(k)
        memo = {}
        if "par" not in fields:  # ancestry depends on parent links only; path length on lengths too
            memo = {k: v for k, v in self.memo.items() if k == "anc" or (k == "plen" and "ln" not in fields)}
        return State(self.N, self.M, n, o, on, cfg, memo)


def merge(b, c, s1: State, s2: State) -> State:
    """Fieldwise If(c, s1, s2)."""
    if s1 is s2:
        return s1

    def m(a, d):
        if a is d:
            return a
        return [b.If(c, x, y) for x, y in zip(a, d, strict=True)]

    n = {k: m(s1.n[k], s2.n[k]) for k in s1.n}
    o = {k: m(s1.o[k], s2.o[k]) for k in s1.o}
    on = {k: [m(x, y) for x, y in zip(s1.on[k], s2.on[k], strict=True)] if s1.on[k] is not s2.on[k] else s1.on[k]
          for k in s1.on}
    cfg = {k: b.If(c, s1.cfg[k], s2.cfg[k]) for k in s1.cfg}
    memo = {}
    if s1.n["par"] is s2.n["par"] and "anc" in s1.memo:
        memo["anc"] = s1.memo["anc"]
    return State(s1.N, s1.M, n, o, on, cfg, memo)


def fresh_state(N: int, M: int, prefix: str) -> State:
    """A state of fresh Z3 variables."""
    n = {}
    for f in NODE_BOOL + KC:
        n[f] = [z3.Bool(f"{prefix}.{f}[{j}]") for j in range(N)]
    for f in NODE_INT:
        n[f] = [z3.Int(f"{prefix}.{f}[{j}]") for j in range(N)]
    o = {f: [z3.Bool(f"{prefix}.{f}<{k}>") for k in range(M)] for f in OP_BOOL}
    o.update({f: [z3.Int(f"{prefix}.{f}<{k}>") for k in range(M)] for f in OP_INT})
    on = {f: [[z3.Bool(f"{prefix}.{f}<{k}>[{j}]") for j in range(N)] for k in range(M)] for f in OP_NODE}
    cfg = {"side": z3.Int(f"{prefix}.side"), "W": z3.Int(f"{prefix}.W"), "wb": z3.Bool(f"{prefix}.wb")}
    # the root is fixed: attached, its own parent, no data of its own, never counted
    for f in NODE_BOOL + KC:
        n[f][0] = f == "alive"
    for f in NODE_INT:
        n[f][0] = 0
    return State(N, M, n, o, on, cfg)


def types(b, s: State):
    """Domains of the fields (asserted for the pre-state; kept by construction in transitions)."""
    c = [s.side >= 0, s.side <= 2, s.W >= 1]
    for j in range(1, s.N):
        c += [s.par[j] >= 0, s.par[j] < j, s.ln[j] >= 1, s.lock[j] >= 0, s.href[j] >= 0, s.clk[j] >= 0]
    for k in range(s.M):
        c += [s.phase[k] >= 0, s.phase[k] <= 2, s.kind[k] >= 0, s.kind[k] <= 3]
        for f in ("lk", "hr", "an"):
            c += [s.o[f][k] >= 0, s.o[f][k] < s.N]
    return b.And(*c)


# ------------------------------------------------------------------------------- helpers
def nodes(s: State):
    return range(1, s.N)


def anc(b, s: State, i: int, j: int):
    """Slot j is an ancestor-or-self of slot i along parent links (i, j concrete)."""
    table = s.memo.setdefault("anc", {})
    key = (i, j)
    if key in table:
        return table[key]
    if i == j:
        r = True
    elif j > i or i == 0:
        r = False
    elif not b.symbolic:
        r = anc(b, s, s.par[i], j)
    else:
        r = b.Or(*[b.And(s.par[i] == k, anc(b, s, k, j)) for k in range(j, i)])
    table[key] = r
    return r


def anc_x(b, s: State, x, j: int):
    """j is an ancestor-or-self of the (possibly symbolic) slot x."""
    if isinstance(x, int):
        return anc(b, s, x, j)
    return b.Or(*[b.And(x == i, anc(b, s, i, j)) for i in range(j, s.N)])


def path(b, s: State, x, j: int):
    """j is on `x.path_to_root()`: x attached, j non-root ancestor-or-self (a detached node's is empty)."""
    if j == 0:
        return False
    return b.And(b.sel(s.alive, x), anc_x(b, s, x, j))


def child(b, s: State, c: int, j):
    return b.And(s.alive[c], s.par[c] == j)


def vec(s: State, name: str, fn):
    """Per-slot derived values, memoised on the state."""
    if name not in s.memo:
        s.memo[name] = [fn(j) for j in range(s.N)]
    return s.memo[name]


def has_child(b, s: State):
    return vec(s, "has_child", lambda j: b.Or(*[child(b, s, c, j) for c in range(j + 1, s.N)]))


def has_dev_child(b, s: State):
    return vec(s, "has_dev_child", lambda j: b.Or(*[b.And(child(b, s, c, j), s.dev[c]) for c in range(j + 1, s.N)]))


def devev(b, s: State):
    """bookkeeping.device_evictable, derived from the current fields."""
    hdc = has_dev_child(b, s)
    return vec(s, "devev", lambda j: False if j == 0 else b.And(
        s.alive[j], s.lock[j] == 0, s.dev[j], b.Not(hdc[j]), b.Or(s.host[j], s.href[j] == 0)))


def hostev(b, s: State):
    """bookkeeping.host_evictable."""
    hc = has_child(b, s)
    return vec(s, "hostev", lambda j: False if j == 0 else b.And(
        s.alive[j], s.host[j], b.Not(s.dev[j]), s.href[j] == 0, b.Not(hc[j])))


def contrib(b, s: State, j: int) -> tuple:
    """bookkeeping.contribution as presence flags (protected-ness normalised to present data)."""
    if j == 0:
        return (False,) * len(KC)
    a = s.alive[j]
    dev_any = b.Or(s.dev[j], s.mdev[j], s.swa[j])
    host_any = b.Or(s.host[j], s.mhost[j], s.swah[j])
    return (b.And(a, s.dev[j]), b.And(a, s.host[j]), b.And(a, s.mdev[j]), b.And(a, s.mhost[j]),
            b.And(a, s.swa[j]), b.And(a, s.swah[j]), b.And(a, s.lock[j] > 0, dev_any),
            b.And(a, b.Or(s.href[j] > 0, s.dev[j]), host_any))


def tomb(b, s: State, j):
    """HiCache.is_tombstone (j concrete)."""
    return b.Or(b.And(s.side == MAMBA, b.Not(s.mdev[j]), b.Not(s.mhost[j])),
                b.And(s.side == SWA, b.Not(s.swa[j]), b.Not(s.swah[j])),
                b.And(s.side == NONE, b.Not(s.dev[j]), b.Not(s.host[j])))


def busy(b, s: State):
    """Node ids in HiCache._busy: nodes of submitted backups/loads (segments, SWA nodes, anchor)."""
    def one(j):
        if j == 0:
            return False
        return b.Or(*[b.And(s.act[k], s.phase[k] != PREP, b.Or(s.kind[k] == BACKUP, s.kind[k] == LOAD),
                            b.Or(s.seg[k][j], s.swn[k][j], s.an[k] == j)) for k in range(s.M)])
    return vec(s, "busy", one)


def pathlen(b, s: State):
    """Tokens (in pages) from a node up to the root, the node included."""
    if "plen" not in s.memo:
        pl = [0]
        for j in range(1, s.N):
            pl.append(s.ln[j] + b.sel(pl, s.par[j]) if b.symbolic else s.ln[j] + pl[s.par[j]])
        s.memo["plen"] = pl
    return s.memo["plen"]


def window_ok_any(b, s: State, j: int):
    """SWA window ending at j intact on device or host (HiCache._window_ok(node, 'any'))."""
    pl = pathlen(b, s)
    return b.And(*[b.Implies(b.And(anc(b, s, j, k), pl[j] - pl[k] < s.W), b.Or(s.swa[k], s.swah[k]))
                   for k in range(1, j + 1)])


def valid_end_any(b, s: State):
    """HiCache.valid_end(node, 'any') for every slot (False for a detached one)."""
    def one(j):
        if j == 0:
            return True
        return b.And(s.alive[j], b.Or(s.dev[j], s.host[j]),
                     b.Implies(s.side == MAMBA, b.Or(s.mdev[j], s.mhost[j])),
                     b.Implies(s.side == SWA, window_ok_any(b, s, j)))
    return vec(s, "valid_end", one)


def lock_target(b, s: State, x):
    """The node `HiCache.lock(x)` locks (and load_back's `top`): walking up from x, the first
    node on device, or the root."""
    if not b.symbolic:
        n = x
        while n != 0 and not s.dev[n]:
            n = s.par[n]
        return n
    terms = []
    for k in range(s.N):
        below_ok = b.And(*[b.Implies(b.And(anc_x(b, s, x, j), anc(b, s, j, k)), b.Not(s.dev[j]))
                           for j in range(k + 1, s.N)])
        terms.append(b.And(anc_x(b, s, x, k), True if k == 0 else s.dev[k], below_ok))
    res = 0
    for k in range(s.N):  # the deepest k satisfying it (the walk stops at the first)
        res = b.If(terms[k], k, res)
    return res


def noprep(b, s: State):
    """No operation is being prepared (API calls are not reentrant)."""
    return b.And(*[b.Not(b.And(s.act[k], s.phase[k] == PREP)) for k in range(s.M)])


def set_at(b, arr: list, x, val) -> list:
    """arr with slot x (concrete or symbolic) set to val."""
    if isinstance(x, int):
        out = list(arr)
        out[x] = val
        return out
    return [b.If(x == j, val, arr[j]) for j in range(len(arr))]


def set_where(b, arr: list, conds: list, val) -> list:
    return [b.If(c, val, a) for a, c in zip(arr, conds, strict=True)]

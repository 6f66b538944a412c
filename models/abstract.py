"""The abstract cache of DESIGN §5: what is cached, on which tier, who holds it — no tensors, no nodes.

State. The cache is a set of *page prefixes* (token tuples ending on a page boundary). Node
boundaries are an implementation detail (a split changes no page prefix), so the model is
per page: for each cached page prefix, its full-KV tiers (device, host), its sidecar data
(a mamba state for exactly that prefix on L1/L2; SWA KV on L1/L2), its lock and host
reference counts. In-flight operations are the pages they move.

Transitions. Each operation of §2 is a relation between two abstract states:
- `predict_*` say what a result must be (match lengths, insert's cached length, lock target,
  prefetch length);
- `frame` says which pages may gain or lose which data in a step (`Allowed`), and that locked
  pages never lose device data nor referenced pages their host data;
- `check_evict` / `check_evict_host` accept any LRU order the spec allows (ties either way),
  judged by the model's own recency (`models.recency`), never by the cache's stamps;
- `models.effects` says what a step must achieve (allocations that must succeed, backups due,
  load-backs that must start, operations poll must finish), `models.contents` what every page
  must hold (a function of its token prefix).
`abstract(snapshot)` is the abstraction function from `refcache.snapshot()` onto this state. The
snapshot's access stamps are kept in `Page.stamp` only for targets whose recency the model cannot
follow (conformance); the refcache machines never read them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

Prefix = tuple[int, ...]


@dataclass(frozen=True)
class Page:
    """One cached page prefix."""

    dev: bool
    host: bool
    mamba: bool = False  # L1 recurrent state valid for exactly this prefix
    mamba_host: bool = False
    swa: bool = False
    swa_host: bool = False
    lock: int = 0
    host_ref: int = 0
    stamp: int = 0  # implementation's last-access stamp (not part of equality checks)

    def data(self) -> tuple:
        return (self.dev, self.host, self.mamba, self.mamba_host, self.swa, self.swa_host)


@dataclass(frozen=True)
class AbsOp:
    id: int
    kind: str  # backup | load | prefetch | store
    pages: frozenset  # page prefixes whose full KV it moves
    anchor: Prefix | None
    locked: Prefix | None
    host_refed: Prefix | None


@dataclass
class Model:
    page_size: int
    sidecar: str | None
    window: int
    pages: dict[Prefix, Page] = field(default_factory=dict)
    ops: dict[int, AbsOp] = field(default_factory=dict)

    # ------------------------------------------------------------------ structure helpers
    def page_prefixes(self, tokens) -> list[Prefix]:
        ps = self.page_size
        t = tuple(tokens)
        return [t[: i + ps] for i in range(0, len(t) - len(t) % ps, ps)]

    def children(self, p: Prefix) -> list[Prefix]:
        n = len(p) + self.page_size
        return [q for q in self.pages if len(q) == n and q[: len(p)] == p]

    def device_leaf(self, p: Prefix) -> bool:
        return self.pages[p].dev and not any(self.pages[c].dev for c in self.children(p))

    def dev_evictable(self, p: Prefix) -> bool:
        """An unlocked device leaf that may lose its device KV: it demotes to its L2 copy, or,
        with none, it is deleted, which a host reference forbids (T3)."""
        g = self.pages[p]
        return self.device_leaf(p) and g.lock == 0 and (g.host or g.host_ref == 0)

    def host_leaf(self, p: Prefix) -> bool:
        g = self.pages[p]
        return g.host and not g.dev and g.host_ref == 0 and not self.children(p)

    def tokens_in(self, pages, tier: str) -> int:
        return self.page_size * sum(1 for p in pages if getattr(self.pages[p], tier))

    # ----------------------------------------------------------------- match-end rules (§2)
    def valid_end(self, p: Prefix, tiers: str) -> bool:
        """Every component accepts `p` as a match end (device only, or device or host)."""
        if not p:
            return True
        g = self.pages[p]
        if not g.dev and (tiers == "device" or not g.host):
            return False
        if self.sidecar == "mamba":
            return g.mamba or (tiers == "any" and g.mamba_host)
        if self.sidecar == "swa":
            q = p
            while q and len(p) - len(q) < self.window:
                h = self.pages[q]
                if not (h.swa or (tiers == "any" and h.swa_host)):
                    return False
                q = q[: -self.page_size]
        return True

    def predict_match(self, tokens) -> tuple[int, int, int, int]:
        """(device length, last_host length, best_match length, host_hit_length) for `tokens`."""
        path = []
        for p in self.page_prefixes(tokens):
            g = self.pages.get(p)
            if g is None or not (g.dev or g.host):
                break
            path.append(p)
        last_dev = max((len(p) for p in path if self.pages[p].dev and self.valid_end(p, "device")), default=0)
        best = max((len(p) for p in path if self.valid_end(p, "any")), default=0)
        last_host = len(path[-1]) if path else 0
        return last_dev, last_host, best, best - last_dev

    def predict_cached(self, tokens) -> int:
        """Leading tokens of `tokens` already on device (insert's `cached_len`)."""
        n = 0
        for p in self.page_prefixes(tokens):
            if p not in self.pages or not self.pages[p].dev:
                break
            n = len(p)
        return n

    def predict_lock_target(self, p: Prefix) -> Prefix:
        """lock() locks the deepest prefix at or above `p` that is on device."""
        while p and not self.pages[p].dev:
            p = p[: -self.page_size]
        return p

    def busy(self) -> set:
        """Pages a backup or load-back in flight works on (their values change on acknowledgement);
        prefetch and storage writes only read or reference."""
        return {q for op in self.ops.values() if op.kind in ("backup", "load")
                for q in op.pages | ({op.anchor} if op.anchor else set())}

    def host_evictable_tokens(self, anchor: Prefix) -> int:
        """L2 tokens host eviction could free once `anchor`'s path is host-referenced: host-only
        pages with no reference (their subtrees are host-only and unreferenced too)."""
        path = set(self.page_prefixes(anchor))
        return self.page_size * sum(1 for p, g in self.pages.items()
                                    if g.host and not g.dev and g.host_ref == 0 and p not in path)

    def predict_prefetch(self, stored: int, free_host: int, anchor: Prefix, threshold: int) -> int:
        """Tokens a prefetch fetches when storage holds `stored` leading tokens past `anchor` and
        L2 has `free_host` free: all of them if L2 can make room, else the page-aligned part that
        fits (bug class 2 gives up instead); nothing below the threshold."""
        floor = max(threshold, 1)
        if stored < floor:
            return 0
        room = free_host + self.host_evictable_tokens(anchor)
        n = stored if stored <= room else room - room % self.page_size
        return n if n >= floor else 0

    # -------------------------------------------------------- state the model derives itself
    def wellformed(self, caller_locks: Counter) -> list[str]:
        """Prefix-closed; locks = caller locks (as the driver counts them) + op locks at or below;
        host refs = op references at or below."""
        v = []
        locks, refs = Counter(caller_locks), Counter()
        for op in self.ops.values():
            if op.locked:
                locks[op.locked] += 1
            if op.host_refed:
                refs[op.host_refed] += 1
        for p, g in self.pages.items():
            if len(p) > self.page_size and p[: -self.page_size] not in self.pages:
                v.append(f"{p}: cached but its parent prefix is not")
            want_l = sum(k for q, k in locks.items() if q[: len(p)] == p)
            want_r = sum(k for q, k in refs.items() if q[: len(p)] == p)
            if g.lock != want_l:
                v.append(f"{p}: lock={g.lock}, but {want_l} locks are held at or below it")
            if g.host_ref != want_r:
                v.append(f"{p}: host_ref={g.host_ref}, but {want_r} references are held at or below it")
        for q in locks:
            if q and q not in self.pages:
                v.append(f"{q}: a lock is held on a prefix that is no longer cached")
        return v


# ------------------------------------------------------------------------ transitions
@dataclass
class Allowed:
    """What one step may change. Anything not allowed here is a disagreement with the model."""

    gain_dev: frozenset = frozenset()  # pages that may become device-resident (insert, load ack)
    gain_host: frozenset = frozenset()  # pages that may gain L2 data (backup ack, prefetch termination)
    gain_side: frozenset = frozenset()  # pages that may gain a sidecar value (mamba/swa), either tier
    gain_host_side: frozenset = frozenset()  # pages that may gain a host sidecar value only (a backup of it)
    evict_dev: bool = False  # unlocked device data (and device sidecar values) may go: eviction, cascades
    evict_host: bool = False  # unreferenced host data may go: host eviction, cascades
    ops_finish: bool = False  # poll: locks and references of finishing ops are released
    lock_delta: dict | None = None  # exact lock change per page, when the step touches no op


def frame(before: Model, after: Model, allowed: Allowed) -> list[str]:
    v = []
    side = ("mamba", "mamba_host", "swa", "swa_host")
    for p in set(before.pages) | set(after.pages):
        b, a = before.pages.get(p), after.pages.get(p)
        if b is None:
            if p not in allowed.gain_dev | allowed.gain_host:
                v.append(f"{p}: appeared in a step that inserts nothing there")
            b = Page(False, False)
        a = a or Page(False, False)
        if a.dev and not b.dev and p not in allowed.gain_dev:
            v.append(f"{p}: gained device KV")
        if a.host and not b.host and p not in allowed.gain_host:
            v.append(f"{p}: gained host KV")
        for s in side:
            may = p in allowed.gain_side or (s.endswith("_host") and p in allowed.gain_host_side)
            if getattr(a, s) and not getattr(b, s) and not may:
                v.append(f"{p}: gained {s}")
        lost_dev = b.dev and not a.dev
        lost_host = b.host and not a.host
        lost_dev_side = any(getattr(b, s) and not getattr(a, s) for s in ("mamba", "swa"))
        lost_host_side = any(getattr(b, s) and not getattr(a, s) for s in ("mamba_host", "swa_host"))
        if (lost_dev or lost_dev_side) and not allowed.evict_dev:
            v.append(f"{p}: lost device data {b.data()} -> {a.data()} in a step that may not evict it")
        if (lost_host or lost_host_side) and not allowed.evict_host:
            v.append(f"{p}: lost host data {b.data()} -> {a.data()} in a step that may not evict it")
        if p in before.pages and p not in after.pages and b.lock and not allowed.ops_finish:
            v.append(f"{p}: deleted while locked ({b.lock} locks)")
        if lost_dev and ((b.lock and not allowed.ops_finish) or a.lock):
            v.append(f"{p}: lost device KV while locked ({b.lock} -> {a.lock})")
        if lost_host and ((b.host_ref and not allowed.ops_finish) or a.host_ref):
            v.append(f"{p}: lost host KV while host-referenced ({b.host_ref} -> {a.host_ref})")
        if allowed.lock_delta is not None and p in after.pages and a.lock - b.lock != allowed.lock_delta.get(p, 0):
            v.append(f"{p}: lock {b.lock} -> {a.lock}, expected change {allowed.lock_delta.get(p, 0)}")
    return v


def _lost(before: Model, after: Model, tier: str) -> list[Prefix]:
    gone = Page(False, False)
    return [p for p, g in before.pages.items() if getattr(g, tier) and not getattr(after.pages.get(p) or gone, tier)]


def _overshoot(before: Model, lost: list[Prefix], n: int, freed: int, what: str) -> list[str]:
    """Eviction stops once `n` tokens are free: all it freed before its last victim was short of
    `n`. Victims are nodes, which the model does not see; the last one lies within one connected
    run of lost pages, so freed less the largest such run must be short of `n`."""
    if n <= 0 or not lost:
        return []
    ps, gone = before.page_size, set(lost)
    size: dict[Prefix, int] = {}
    for p in sorted(lost, key=len):  # parents first: a page joins its lost parent's run
        top = p
        while len(top) > ps and top[:-ps] in gone:
            top = top[:-ps]
        size[top] = size.get(top, 0) + ps
    if freed - max(size.values()) >= n:
        return [f"{what}({n}) freed {freed}: it went on after {freed - max(size.values())} tokens were already free"]
    return []


def _lru_errors(before: Model, chosen: list[Prefix], stayed: list[Prefix], what: str, rec) -> list[str]:
    """LRU judged by the model's own recency (`models.recency.Recency`) when given, else by the
    implementation's stamps (for targets whose recency the model cannot follow)."""
    if rec is not None:
        return rec.lru_errors(chosen, stayed, what)
    return [f"{what} {c} (stamp {before.pages[c].stamp}) before older leaf {s} (stamp {before.pages[s].stamp})"
            for c in chosen for s in stayed if before.pages[c].stamp > before.pages[s].stamp]


def check_evict(before: Model, after: Model, n: int, freed: int, lru: bool = True, rec=None) -> list[str]:
    """evict(n): freed = device tokens lost; stop only when n are freed or no evictable device leaf
    is left, and not later; each chosen leaf is no more recent than any unlocked leaf that stayed (ties either way)."""
    v = []
    lost = _lost(before, after, "dev")
    if freed != before.page_size * len(lost):
        v.append(f"evict returned {freed} but {before.page_size * len(lost)} device tokens were freed")
    left = [p for p in after.pages if after.dev_evictable(p)]
    if freed < n and left:
        v.append(f"evict({n}) freed {freed} but evictable device leaves remain: {left[:3]}")
    if n == 0 and lost:
        v.append(f"evict(0) freed {sorted(lost)[:3]}")
    v += _overshoot(before, lost, n, freed, "evict")
    if lru:
        cands = [p for p in before.pages if before.dev_evictable(p)]
        chosen = [p for p in cands if p in lost]
        stayed = [p for p in cands if p not in lost and p in after.pages and after.dev_evictable(p)]
        v += _lru_errors(before, chosen, stayed, "evicted", rec)
    return v


def check_evict_host(before: Model, after: Model, n: int, freed: int, rec=None) -> list[str]:
    """evict_host(n): freed = host tokens lost; LRU over host-only unreferenced leaves."""
    v = []
    lost = _lost(before, after, "host")
    if freed != before.page_size * len(lost):
        v.append(f"evict_host returned {freed} but {before.page_size * len(lost)} host tokens were freed")
    left = [p for p in after.pages if after.host_leaf(p)]
    if freed < n and left:
        v.append(f"evict_host({n}) freed {freed} but host leaves remain: {left[:3]}")
    if n == 0 and lost:
        v.append(f"evict_host(0) freed {sorted(lost)[:3]}")
    v += _overshoot(before, lost, n, freed, "evict_host")
    cands = [p for p in before.pages if before.host_leaf(p)]
    chosen = [p for p in cands if p in lost]
    stayed = [p for p in cands if p not in lost]
    return v + _lru_errors(before, chosen, stayed, "host-evicted", rec)


def same_data(before: Model, after: Model) -> list[str]:
    """A step that raised must leave the cache unchanged (stamps aside)."""
    strip = lambda m: {p: replace(g, stamp=0) for p, g in m.pages.items()}  # noqa: E731
    if strip(before) != strip(after) or set(before.ops) != set(after.ops):
        return ["the cache changed although the operation raised"]
    return []


# ------------------------------------------------------------------ abstraction function
def abstract(snap) -> Model:
    """`refcache.snapshot()` -> Model."""
    ps = snap.page_size
    m = Model(page_size=ps, sidecar=snap.sidecar, window=snap.swa_window)
    prefix: dict[int, Prefix] = {snap.root: ()}
    order = [snap.root]
    for nid in order:  # breadth-first: parents before children
        n = snap.nodes[nid]
        if n.parent is not None:
            base = prefix[n.parent]
            prefix[nid] = base + n.key
            for i in range(ps, len(n.key) + 1, ps):
                last = i == len(n.key)
                m.pages[base + n.key[:i]] = Page(
                    dev=n.device is not None, host=n.host is not None,
                    mamba=last and n.mamba is not None, mamba_host=last and n.mamba_host is not None,
                    swa=n.swa, swa_host=n.swa_host, lock=n.lock_ref, host_ref=n.host_ref, stamp=n.last_access)
        order.extend(c for _, c in n.children if c in snap.nodes)

    def pages_of(nid):
        p = prefix.get(nid)
        return set() if p is None else {p[: len(p) - i] for i in range(0, len(snap.nodes[nid].key), ps)}

    for op in snap.ops:
        pg = set()
        for nid, _, _ in op.segments:
            pg |= pages_of(nid)
        m.ops[op.id] = AbsOp(op.id, op.kind, frozenset(pg), prefix.get(op.anchor), prefix.get(op.locked),
                             prefix.get(op.host_refed))
    return m


def node_prefix(node) -> Prefix:
    """Token prefix a live `TreeNode` ends (the root: ())."""
    keys = [n.key for n in node.path_to_root()]
    return tuple(t for k in reversed(keys) for t in k)

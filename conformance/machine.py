"""The conformance machine: one Hypothesis rule-based machine, parameterized by a target.

Each rule performs one operation the target supports, abstracts the target's state and checks
the step against `models.abstract`: the predicted result (match lengths, insert's cached length,
the mamba slot decision, the lock target, eviction amounts and — where the target's recency
stamps are readable — its LRU choice) and the frame (which pages may gain or lose which data).
After every step, the target's own checks run (slot accounting, data, its sanity checks) and
the locks the model derives from the locks this driver holds.

Target-specific allowances (documented in `TargetInfo`): targets without readable lock counts
are judged on locked / unlocked only; without readable stamps, the eviction order is not judged.
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, precondition, rule

from models.abstract import Allowed, Model, Prefix, check_evict, frame

from .target import Target, TargetError

SPEC_LRU = os.environ.get("CONFORMANCE_SPEC_LRU", "1") != "0"


class _Every(frozenset):
    """Every page prefix (a frame allowance that does not restrict)."""

    def __contains__(self, item) -> bool:
        return True

    def __or__(self, other):
        return self

    __ror__ = __or__


EVERY = _Every()


class Disagreement(AssertionError):
    """The target and the model disagree, or the target's own checks fail."""


PAGE_IDS = st.lists(st.integers(0, 3), min_size=1, max_size=5)  # few distinct pages: prefixes are shared and split


def page_tokens(page_id: int, page_size: int) -> list[int]:
    """Page 0..2: (1,..), (2,..), (3,..); page 3: 1, 2, ... (mixed) — the pages of machines.py at size 2."""
    return list(range(1, page_size + 1)) if page_id == 3 else [page_id + 1] * page_size


def lock_errors(model: Model, held: Counter, exact: bool) -> list[str]:
    """Each page's lock count is the number of caller locks held at or below it (exact), or at
    least is non-zero exactly when one is (not exact)."""
    v = []
    for p, g in model.pages.items():
        want = sum(k for q, k in held.items() if q[: len(p)] == p)
        if (g.lock != want) if exact else (bool(g.lock) != bool(want)):
            v.append(f"{p}: lock={g.lock}, but {want} caller locks are held at or below it")
    for q in held:
        if q and q not in model.pages:
            v.append(f"{q}: a lock is held on a prefix that is no longer cached")
    return v


class ConformanceMachine(RuleBasedStateMachine):
    """Subclasses set FACTORY (a zero-argument callable returning a Target)."""

    FACTORY: Callable[[], Target]
    steps_run = 0  # across instances: what a bounded run reports
    last_log: list[str] = []
    last_calls: list = []
    requests = Bundle("requests")
    nodes = Bundle("nodes")

    def __init__(self):
        super().__init__()
        self.t: Target = type(self).FACTORY()
        self.info = self.t.info
        self.held: list = []
        self.log: list[str] = []
        self.calls: list[tuple[str, object]] = []  # concrete operations, for `replay` and `minimize`
        self._made_by: dict = {}  # node handle -> index in calls of the match that returned it
        type(self).last_log = self.log
        type(self).last_calls = self.calls
        self.model = self.t.abstract()
        self.clock = 0
        self.recency: dict[Prefix, int] = {}  # the spec's own recency: last match/insert touching each page

    # ------------------------------------------------------------------ lockstep helper
    def _allowed(self, **kw) -> Allowed:
        if self.info.host:  # backups complete and L2 makes room on the target's own schedule
            kw.setdefault("gain_host", EVERY)
            kw.setdefault("gain_host_side", EVERY)  # a backup carries the sidecar state with the KV
            kw["evict_host"] = True
            kw["evict_dev"] = kw.get("evict_dev", False) or self.info.sidecar is not None
        return Allowed(**kw)

    def _step(self, what: str, allowed: Allowed, check=None) -> None:
        type(self).steps_run += 1
        self.log.append(what)
        after = self.t.abstract()
        errs = frame(self.model, after, allowed)
        if check is not None:
            errs += check(self.model, after)
        self.model = after
        if errs:
            raise Disagreement(f"{self.info.name}: {what}: target and model disagree:\n  " + "\n  ".join(errs))

    def _touch(self, pages) -> None:
        self.clock += 1
        for p in pages:
            self.recency[p] = self.clock

    # -------------------------------------------------------------------------- rules
    @initialize(target=requests)
    def first_request(self):
        tokens = [1] * self.info.page_size * 2
        self.insert(tokens)
        return tokens

    def _tokens(self, ids) -> list[int]:
        return [t for i in ids for t in page_tokens(i, self.info.page_size)]

    @rule(target=requests, ids=PAGE_IDS)
    def insert_new(self, ids):
        tokens = self._tokens(ids)
        self.insert(tokens)
        return tokens

    @rule(tokens=requests)
    def insert(self, tokens):
        self.calls.append(("insert", list(tokens)))
        t = self.t
        try:
            kv = t.alloc(tokens)
        except TargetError as e:
            self._step(f"alloc {tokens} -> exhausted ({e})", self._allowed(evict_dev=True))
            return
        self._step(f"alloc {tokens}", self._allowed(evict_dev=True))
        m = self.model
        pages = m.page_prefixes(tokens)
        want = m.predict_cached(tokens)
        end = pages[-1]
        want_slot = not (end in m.pages and m.pages[end].mamba) if self.info.sidecar == "mamba" else None
        res = t.insert(tokens, kv)

        def check(b, a):
            v = []
            if res.cached_len != want:
                v.append(f"cached_len {res.cached_len}, model says {want}")
            if want_slot is not None and res.mamba_used != want_slot:
                v.append(f"mamba slot used={res.mamba_used}, model says {want_slot}")
            if not all(p in a.pages and a.pages[p].dev for p in pages):
                v.append("inserted pages are not all on device")
            if self.info.sidecar == "mamba" and not (end in a.pages and a.pages[end].mamba):
                v.append("the inserted prefix has no mamba state")
            if self.info.sidecar == "swa" and end in a.pages and not a.valid_end(end, "device"):
                v.append(f"the inserted prefix's last {a.window} tokens do not all hold SWA KV on device")
            return v

        self._touch(pages)
        gain = frozenset(pages)
        self._step(f"insert {tokens} -> cached {res.cached_len}", self._allowed(gain_dev=gain, gain_side=gain), check)

    @rule(target=nodes, tokens=requests, extra=st.lists(st.integers(0, 3), max_size=2))
    def match(self, tokens, extra):
        return self._match(tokens + self._tokens(extra))

    def _match(self, tokens):
        self.calls.append(("match", list(tokens)))
        want = self.model.predict_match(tokens)
        self._touch([p for p in self.model.page_prefixes(tokens) if len(p) <= max(want[0], want[1], want[2])])
        best = want[2]
        if "best-is-backed-up" in self.info.allow:  # explained divergence: the deepest backed-up page
            path = self.model.page_prefixes(tokens)[: want[1] // self.info.page_size]
            best = max((len(p) for p in path if self.model.pages[p].host), default=0)
        m = self.t.match(tokens)

        def check(b, a):
            v = []
            skip_dev = m.mamba_host_hit and "mamba-host-boundary" in self.info.allow
            if (m.device_len, m.best_len) != (want[0], best) and not (skip_dev and m.best_len == best):
                v.append(f"match (device, best) = {(m.device_len, m.best_len)}, model says {(want[0], best)}")
            # "last-host-is-best" (a contract difference, see test_hicache.py): the target's last_host_node
            # is its best_match_node, the deepest node every component accepts on some tier.
            host = want[2] if "last-host-is-best" in self.info.allow else want[1]
            hit = want[3]
            if "host-hit-is-backed-up" in self.info.allow:
                # (a contract difference, see test_hicache.py): the target counts, of the tokens between
                # its device match and its best match, those with a host copy of their KV; the spec
                # counts them all. They differ where the KV is on device but a sidecar's window is not.
                hit = b.tokens_in([p for p in b.page_prefixes(tokens) if want[0] < len(p) <= want[2]], "host")
            if m.last_host_len is not None and (m.last_host_len, m.host_hit) != (host, hit):
                v.append(f"match (last_host, host_hit) = {(m.last_host_len, m.host_hit)}, model says {(host, hit)}")
            if len(m.device_indices) != m.device_len or not self.t.data_ok(tokens, m):
                v.append("D1: match served device slots that do not hold the prefix written there")
            return v

        self._made_by[_key(m.node)] = len(self.calls) - 1
        self._step(f"match {tokens} -> {m.device_len}", self._allowed(), check)
        return m.node

    @rule(node=nodes)
    def lock(self, node):
        self.calls.append(("lock", self._made_by.get(_key(node))))
        if not self.t.alive(node):
            return
        p = self.t.node_prefix(node)
        if p and (p not in self.model.pages or not self.model.pages[p].dev):
            return
        if p and "lock-tombstone" in self.info.allow and not self.model.pages[p].mamba:
            return  # explained divergence (see sglang_targets.KNOWN): not judged in bounded runs
        target = self.model.predict_lock_target(p)
        h = self.t.lock(node)
        got = self.t.locked_prefix(h)
        if got:
            self.held.append(h)
        delta = {q: 1 for q in self.model.page_prefixes(target)} if self.info.exact_locks else None

        def check(b, a):
            v = [] if got == target else [f"lock locked {got}, model says {target}"]
            v += [f"{q}: not locked after lock" for q in self.model.page_prefixes(target) if not a.pages[q].lock]
            return v

        self._step(f"lock {p}", self._allowed(lock_delta=delta), check)

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 7))
    def unlock(self, i):
        self.calls.append(("unlock", i))
        h = self.held.pop(i % len(self.held))
        p = self.t.locked_prefix(h)
        self.t.unlock(h)
        delta = {q: -1 for q in self.model.page_prefixes(p)} if self.info.exact_locks else None
        self._step(f"unlock {p}", self._allowed(lock_delta=delta))

    @precondition(lambda self: any(g.dev for g in self.model.pages.values()))
    @rule(k=st.sampled_from([1, 4, 10**6]))
    def evict(self, k):
        self.calls.append(("evict", k))
        n = k * self.info.page_size if k < 10**6 else k
        freed = self.t.evict(n)
        spec = SPEC_LRU and "lru-recency" not in self.info.allow
        l2_free = self.t.host_free() if "write-back-l2-full" in self.info.allow else None

        def check(b, a):
            v = check_evict(b, a, n, freed, lru=self.info.stamps)
            if l2_free is not None:
                v = _spare_unbacked_leaves(a, v, l2_free)
            if spec:  # judge the choice by the spec's recency, not the target's own stamps
                by_spec = replace(b, pages={p: replace(g, stamp=self.recency.get(p, 0)) for p, g in b.pages.items()})
                v += [f"(spec recency) {x}" for x in check_evict(by_spec, a, n, freed) if "before older" in x]
            return v

        self._step(f"evict {n} -> {freed}", self._allowed(evict_dev=True), check)

    @precondition(lambda self: "load_back" in self.info.ops and any(g.host and not g.dev for g in self.model.pages.values()))
    @rule(tokens=requests)
    def load_back(self, tokens):
        self.calls.append(("load_back", list(tokens)))
        m = self.model
        want = m.predict_match(tokens)
        best = want[2]
        path = [p for p in m.page_prefixes(tokens) if len(p) <= best]
        self._touch([p for p in m.page_prefixes(tokens) if len(p) <= max(want[0], want[1], want[2])])
        got = self.t.load_back(tokens)

        def check(b, a):
            if got is None:  # declined (no room): nothing may have been loaded
                return [f"{p}: loaded although load_back declined" for p in path if a.pages.get(p) and a.pages[p].dev
                        and not b.pages[p].dev]
            v = [] if got == best else [f"device match after load_back = {got}, model says {best}"]
            if path and self.info.sidecar == "mamba" and not a.pages[path[-1]].mamba:
                v.append(f"{path[-1]}: loaded without its mamba state")
            return v

        gain = frozenset(path)
        self._step(f"load_back {tokens} -> {got}", self._allowed(gain_dev=gain, gain_side=gain, evict_dev=True), check)

    @precondition(lambda self: "evict_mamba" in self.info.ops and any(g.mamba for g in self.model.pages.values()))
    @rule(n=st.sampled_from([1, 2]))
    def evict_mamba(self, n):
        self.calls.append(("evict_mamba", n))
        freed = self.t.evict_mamba(n)

        def check(b, a):
            lost = [p for p, g in b.pages.items() if g.mamba and not (p in a.pages and a.pages[p].mamba)]
            v = [] if freed == len(lost) else [f"evict_mamba returned {freed}, {len(lost)} states were freed"]
            left = [p for p, g in a.pages.items() if g.mamba and not g.lock]
            if freed < n and left:
                v.append(f"evict_mamba({n}) freed {freed} but unlocked states remain: {left[:3]}")
            return v

        self._step(f"evict_mamba {n} -> {freed}", self._allowed(evict_dev=True), check)

    # ---------------------------------------------------------------------- invariants
    @invariant()
    def target_checks(self):
        v = self.t.check()
        if v:
            raise Disagreement(f"{self.info.name}: after {self.log[-1:]}: target checks fail:\n  " + "\n  ".join(v))

    @invariant()
    def locks_agree(self):
        held = Counter(self.t.locked_prefix(h) for h in self.held)
        v = lock_errors(self.model, held, self.info.exact_locks)
        if v:
            raise Disagreement(f"{self.info.name}: locks: " + "; ".join(v))

    def teardown(self):
        try:
            for h in self.held:
                self.t.unlock(h)
            self.held = []
            v = self.t.check()
            if v:
                raise Disagreement(f"{self.info.name}: at teardown: " + "; ".join(v))
        finally:
            self.t.close()


def _spare_unbacked_leaves(a, errs: list[str], l2_free: int) -> list[str]:
    """"write-back-l2-full" (a contract difference, kept in test_hicache.py): under write_back an
    evicted leaf with no L2 copy is backed up first, and where L2 has no room for it and what holds
    L2 is host-referenced (an L3 backup the same eviction started, a prefetch in flight), SGLang
    neither backs it up nor drops its subtree: it stays on device until L2 frees. The spec's evict
    goes on while an evictable leaf remains; the complaint is dropped when every leaf left is
    device-only and L2, after the step, is short of its unbacked run (the pages back to the nearest
    page with an L2 copy, an upper bound of the leaf node's size)."""
    ps = a.page_size

    def run(p):
        k = len(p)
        while k > 0 and p[:k] in a.pages and not a.pages[p[:k]].host:
            k -= ps
        return len(p) - k

    left = [p for p in a.pages if a.dev_evictable(p)]
    if left and all(not a.pages[p].host and l2_free < run(p) for p in left):
        return [e for e in errs if "evictable device leaves remain" not in e]
    return errs


def _key(node):
    return node if isinstance(node, int) else id(node)


def replay(cls: type[ConformanceMachine], calls: list[tuple[str, object]]) -> Exception | None:
    """Run `calls` (as recorded in `ConformanceMachine.calls`) on a fresh machine, checking after
    every step as the rules do; returns the disagreement, or None. A lock whose match was dropped,
    or an unlock with nothing held, is skipped."""
    m = cls()
    nodes: dict[int, object] = {}
    try:
        for i, (op, arg) in enumerate(calls):
            if op == "insert":
                m.insert(arg)
            elif op == "match":
                nodes[i] = m._match(arg)
            elif op == "lock":
                if arg in nodes:
                    m.lock(nodes[arg])
            elif op == "load_back":
                m.load_back(arg)
            elif op == "unlock":
                if m.held:
                    m.unlock(arg)
            else:
                getattr(m, op)(arg)
            m.target_checks()
            m.locks_agree()
        m.teardown()
    except Exception as e:  # a disagreement, or the target rejecting a legal sequence (its own assertion)
        return e
    return None


def _signature(e: BaseException) -> str:
    lines = str(e).splitlines()
    first = next((ln.strip() for ln in lines[1:] if ln.strip()), lines[0] if lines else "")
    return type(e).__name__ + ": " + re.sub(r"\(.*?\)|\[.*?\]|\d+", "", first)


def minimize(cls: type[ConformanceMachine], calls: list, budget_s: float = 20.0) -> tuple[list, Exception] | None:
    """Greedy one-step deletion over a failing call list, keeping the same kind of disagreement
    (a second pass after Hypothesis' shrinking, which keeps steps a replay does not need)."""
    first = replay(cls, calls)
    if first is None:
        return None
    sig, best, err = _signature(first), list(calls), first
    deadline = time.monotonic() + budget_s
    changed = True
    while changed and time.monotonic() < deadline:
        changed = False
        for i in reversed(range(len(best))):
            cand = best[:i] + [(op, (a - 1 if op == "lock" and isinstance(a, int) and a > i else
                                     (None if op == "lock" and a == i else a))) for op, a in best[i + 1:]]
            e = replay(cls, cand)
            if e is not None and _signature(e) == sig:
                best, err, changed = cand, e, True
            if time.monotonic() >= deadline:
                break
    return best, err


def format_calls(calls: list) -> str:
    out = []
    for i, (op, a) in enumerate(calls):
        out.append(f"  {i}: {op}({'match #' + str(a) if op == 'lock' else a})")
    return "\n".join(out)


def machine_for(factory: Callable[[], Target], name: str) -> type[ConformanceMachine]:
    cls_name = "".join(w.capitalize() for w in name.replace("-", "_").split("_")) + "Conformance"
    return type(cls_name, (ConformanceMachine,), {"FACTORY": staticmethod(factory)})

"""Counterexample -> concrete refcache scenario.

For a seeded bug, Z3 is asked for a counterexample to the invariant the bug breaks, over the
bug's transition taken as a whole API call (e.g. write_backup = backup_begin + backup_submit),
from a pre-state in the *constructible fragment* (full or mamba config, one-page nodes, mamba
states exactly where a node was inserted as a request end, no operation half-prepared), with the
fewest nodes and operations. `scenario` turns that model into Python source: HiCache calls that
build the pre-state (inserts, splits through match_prefix, backups, targeted evictions, caller
locks, operations left in flight with their parts completed or failed as in the model) and then
the call the transition is. `replay` runs it on the clean cache and with the seeded bug patched
in (stateful_tests/seeded_bugs.py, around the trigger call), checks that the built state is the
model's pre-state, and reports which invariants the concrete cache then breaks.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field

import z3

from refcache.invariants import CHECKS, valid_end

from .encodings import conjunction
from .prove import BUG_INVARIANTS, decode, decode_choices, describe, solver
from .symbolic import (
    BACKUP,
    FLIGHT,
    LOAD,
    MAMBA,
    PREFETCH,
    STORE,
    Z3,
    State,
    busy,
    fresh_state,
    has_child,
    types,
)
from .transitions import BUG1, BUG3, BUG4_LOAD, BUG4_LOCK, BUG5, TRANSITIONS, Z3Choices

PS = 2

MACROS: dict[str, tuple[str, ...]] = {
    "lock": ("lock",),
    "write_backup": ("backup_begin", "backup_submit"),
    "load_back": ("load_begin", "load_submit"),
    "evict/demote": ("evict_demote",),
    "evict/delete": ("evict_delete",),
    "evict_host": ("evict_host",),
    "poll/ack": ("poll_ack",),
    "poll/release": ("poll_release",),
    "prefetch_progress": ("prefetch_terminate",),
}
"""API calls as compositions of transitions (an allocation with room needs no eviction)."""

PLANS: dict[str, tuple[str, ...]] = {
    BUG1: ("prefetch_progress",),
    BUG3: ("write_backup", "load_back"),
    BUG4_LOAD: ("load_back",),
    BUG4_LOCK: ("lock",),
    BUG5: ("evict_host", "evict/demote", "evict/delete", "poll/ack", "poll/release"),
}
"""For each seeded bug, the API calls tried (in order) as the replayed transition."""


# ------------------------------------------------------------------------------ search
def fragment(pre: State, macro: str, ch: Z3Choices) -> list:
    """Pre-states the scenario builder can reach through the public API (see module doc)."""
    b, s, N = Z3, pre, pre.N
    c = [s.side <= MAMBA, z3.Not(s.wb)]
    hc = has_child(b, s)
    for j in range(1, N):
        sb = z3.Bool(f"frag.sb[{j}]")  # inserted as a request end (else created by a split)
        c += [s.ln[j] == 1, s.recok[j],
              s.mdev[j] == z3.And(s.side == MAMBA, s.dev[j], sb),
              s.mhost[j] == z3.And(s.side == MAMBA, s.host[j], sb),
              z3.Implies(z3.And(s.side == MAMBA, s.alive[j], z3.Not(sb)), hc[j]),
              s.lws[j] == z3.And(s.clk[j] > 0, s.mdev[j])]
        if macro == "evict_host":  # other host leaves are re-stamped through match_prefix
            c.append(z3.Implies(s.alive[j], z3.Or(s.dev[j], s.host[j])))
    for k in range(pre.M):
        act, kind = s.act[k], s.kind[k]
        c += [z3.Implies(act, z3.And(s.phase[k] == FLIGHT, s.intact[k], z3.Not(s.abort[k])))]
        c.append(z3.Implies(z3.And(act, kind == BACKUP), z3.And(
            z3.Not(s.demote[k]), s.pool[k] == z3.And(s.side == MAMBA, b.sel(s.mdev, s.lk[k])),
            *[s.seg[k][j] == (s.lk[k] == j) for j in range(1, N)])))
        c.append(z3.Implies(z3.And(act, kind == STORE), s.pool[k] == z3.And(s.side == MAMBA, b.sel(s.mhost, s.an[k]))))
        if macro.startswith("poll"):  # poll acknowledges every ready op: only the chosen one may be
            o = ch.vars["o"]
            c.append(z3.Implies(z3.And(act, o != k, kind != PREFETCH),
                                z3.Or(s.kvp[k], z3.And(s.pool[k], s.plp[k]))))
    if macro == "prefetch_progress":  # one fetched page, new to the tree
        o = ch.vars["o"]
        done = z3.And(z3.Not(b.sel(s.kvp, o)), z3.Not(b.sel(s.kvf, o)))
        c += [ch.vars["got"] == done, ch.vars["leaf"] == done, ch.vars["d"] == b.sel(s.an, o), ch.vars["L"] == 1]
    if macro == "write_backup":
        c.append(ch.vars["slot_ok"])
    return c


@dataclass
class Counterexample:
    bug: str
    invariant: str
    macro: str
    pre: State
    choices: dict
    nodes: int
    seconds: float

    @property
    def text(self) -> str:
        return describe(self.pre)


def _compose(macro: str, pre: State, ch: Z3Choices, bug: str | None):
    g_all, s = [], pre
    for name in MACROS[macro]:
        g, s = TRANSITIONS[name].fn(Z3, s, ch, bug)
        g_all.append(g)
    return z3.And(*[g for g in g_all if g is not True]) if any(g is not True for g in g_all) else True, s


def find(bug: str, nodes: int = 4, ops: int = 2, invariant: str | None = None, macros: tuple[str, ...] | None = None,
         timeout_s: float = 120.0) -> Counterexample | None:
    """The smallest constructible counterexample (fewest nodes, then ops, then locks) to
    `invariant` (default: the one the bug must break) over the bug's API calls."""
    from .encodings import all_formulas

    inv = invariant or BUG_INVARIANTS[bug][0]
    t0 = time.perf_counter()
    for macro in macros or PLANS[bug]:
        N = nodes + 1
        pre = fresh_state(N, ops, "pre")
        ch = Z3Choices("ch", N, ops)
        guard, post = _compose(macro, pre, ch, bug)
        s = solver()
        s.set("timeout", int(timeout_s * 1000))
        s.add(types(Z3, pre), conjunction(Z3, pre), *ch.constraints, guard, *fragment(pre, macro, ch))
        s.add(z3.Not(all_formulas()[inv](Z3, post)))
        if s.check() != z3.sat:
            continue
        for cost in (z3.Sum([z3.If(pre.alive[j], 1, 0) for j in range(1, N)]),
                     z3.Sum([z3.If(pre.act[k], 1, 0) for k in range(ops)]),
                     z3.Sum([pre.clk[j] for j in range(1, N)]),
                     z3.Sum([z3.If(z3.Or(pre.host[j], pre.dev[j]), 1, 0) for j in range(1, N)])):
            best = s.model().eval(cost, model_completion=True).as_long()
            for k in range(best):  # tighten while it stays satisfiable
                s.push()
                s.add(cost <= k)
                if s.check() == z3.sat:
                    break
                s.pop()
            else:
                s.push()
                s.add(cost <= best)
                s.check()
        model = s.model()
        return Counterexample(bug, inv, macro, decode(model, pre), decode_choices(model, ch), nodes,
                              time.perf_counter() - t0)
    return None


# ------------------------------------------------------------------------- scenario text
def _paths(s: State) -> dict[int, list[int]]:
    """Token path of every attached slot: slot j's page is [j, j] (page_size 2)."""
    out = {0: []}
    for j in range(1, s.N):
        if s.alive[j]:
            out[j] = out[s.par[j]] + [100 + j] * PS * s.ln[j]
    return out


PRELUDE = '''from refcache import CacheConfig, DeterministicExecutor, HiCache
from refcache.data import write_request
from refcache.storage import MemoryStorage

cfg = CacheConfig(page_size=2, device_tokens=128, host_tokens=128, components={components!r},
                  write_policy="write_through_selective", backup_after_hits=10**6, device_mamba_slots=32,
                  host_mamba_slots=32, prefetch_policy="best_effort", prefetch_threshold=2)
page_shape = (cfg.num_layers, 2, cfg.page_size, cfg.num_heads, cfg.head_dim)
storage = MemoryStorage(64, page_shape, cfg.dtype)
state_storage = MemoryStorage(64, (cfg.mamba_state_dim,), cfg.dtype) if "mamba" in cfg.components else None
cache = HiCache(cfg, executor=DeterministicExecutor(), storage=storage, state_storage=state_storage)
ops = {{}}


def node(tokens):
    """The attached node whose path from the root spells `tokens` (the root for [])."""
    if not tokens:
        return cache.root
    for n in cache.nodes():
        path = []
        for m in n.path_to_root():
            path = list(m.key) + path
        if path == list(tokens):
            return n
    raise LookupError(tokens)


def path(n):
    out = []
    for m in n.path_to_root():
        out = list(m.key) + out
    return out


def put(tokens):
    """A request's forward pass and insert (the caller frees what the tree did not take)."""
    idx, slot = write_request(cache, tokens)
    res = cache.insert(tokens, idx, slot)
    if res.cached_len:
        cache.free_device(idx[: res.cached_len])
    if slot is not None and not res.mamba_slot_used:
        cache.free_mamba(slot)


def in_storage(tokens, with_state):
    """Another cache writes `tokens` (pages and, if asked, the final state) to the shared L3."""
    w = HiCache(cfg, executor=DeterministicExecutor(auto_complete=True), storage=storage,
                state_storage=state_storage if with_state else None)
    idx, slot = write_request(w, tokens)
    w.insert(tokens, idx, slot)
    n = w.match_prefix(tokens).last_device_node
    w.write_backup(n)
    w.poll()
    w.write_backup_storage(n)
    w.poll()


def backed_up(tokens):
    """Back the node up to L2 and let the copy complete."""
    op = cache.write_backup(node(tokens))
    cache.executor.complete(op.id)
    cache.poll()


def only_on_device(keep):
    """Evict from L1 everything but the paths ending at `keep` (locked meanwhile)."""
    held = [cache.lock(node(p)) for p in keep]
    cache.evict(10**6)
    for n in held:
        cache.unlock(n)


def least_recent(victim, on_device):
    """Make `victim` the LRU node of its tier: every other node of that tier is matched again."""
    for n in cache.nodes():
        if n is not victim and (n.value is not None) == on_device:
            cache.match_prefix(path(n))


def finish_parts(op, kv, pool):
    """Leave each part pending (None), completed ("done") or failed ("failed")."""
    ex = cache.executor
    for p in op.kv_parts:
        if kv:
            (ex.complete if kv == "done" else ex.fail)(op.id, p)
    if pool and len(op.parts) > len(op.kv_parts):
        (ex.complete if pool == "done" else ex.fail)(op.id, op.parts[len(op.kv_parts)])
'''


@dataclass
class Scenario:
    """A counterexample as HiCache calls: `setup` builds the pre-state, `trigger` is the transition."""

    cx: Counterexample
    setup: str
    trigger: str
    paths: dict[int, list[int]]
    op_names: dict[int, str] = field(default_factory=dict)

    @property
    def source(self) -> str:
        return f"{self.setup}\n# ---- the transition ({self.cx.macro})\n{self.trigger}"


def _status(pending: bool, failed: bool) -> str | None:
    return None if pending else ("failed" if failed else "done")


def scenario(cx: Counterexample) -> Scenario:
    s, ch = cx.pre, cx.choices
    P = _paths(s)
    mamba = s.side == MAMBA
    comps = ("full", "mamba") if mamba else ("full",)
    lines = [PRELUDE.format(components=comps), "# ---- build the pre-state"]
    alive = [j for j in range(1, s.N) if s.alive[j]]
    has_kids = {j: any(s.alive[c] and s.par[c] == j for c in alive) for j in alive}
    sb = {j: (not mamba) or s.mdev[j] or s.mhost[j] or not has_kids[j] for j in alive}
    for j in alive:
        if sb[j]:
            lines.append(f"put({P[j]})")
    for j in alive:
        if not sb[j]:
            lines.append(f"cache.match_prefix({P[j]})  # split: node {j} carries no mamba state")
    for j in alive:
        if s.host[j]:
            lines.append(f"backed_up({P[j]})")
    if any(not s.dev[j] for j in alive):
        keep = [j for j in alive if s.dev[j] and not any(s.alive[c] and s.par[c] == j and s.dev[c] for c in alive)]
        lines.append(f"only_on_device({[P[j] for j in keep]})  # the rest is demoted (or dropped if data-less)")
    for j in alive:
        for _ in range(s.clk[j]):
            lines.append(f"cache.lock(node({P[j]}))")
    names = {}
    order = sorted((k for k in range(s.M) if s.act[k]), key=lambda k: s.kind[k] not in (STORE, PREFETCH))
    for k in order:  # stores and prefetches first: a later load may make their node busy
        name = f"ops[{k}]"
        names[k] = name
        kind = s.kind[k]
        if kind == BACKUP:
            lines.append(f"{name} = cache.write_backup(node({P[s.lk[k]]}))")
        elif kind == LOAD:
            lines.append(f"{name} = cache.load_back(node({P[s.an[k]]}))")
        elif kind == STORE:
            lines.append(f"{name} = cache.write_backup_storage(node({P[s.an[k]]}))")
        else:
            new = [900 + k] * PS
            lines.append(f"in_storage({P[s.an[k]] + new}, with_state={s.pool[k]})")
            lines.append(f"{name} = cache.prefetch('r{k}', node({P[s.an[k]]}), {new})")
        lines.append(f"finish_parts({name}, {_status(s.kvp[k], s.kvf[k])!r}, "
                     f"{_status(s.plp[k], s.plf[k]) if s.pool[k] else None!r})")
    trig = []
    m = cx.macro
    if m == "lock":
        trig.append(f"result = cache.lock(node({P[ch['x']]}))")
    elif m == "write_backup":
        trig.append(f"result = cache.write_backup(node({P[ch['x']]}))")
    elif m == "load_back":
        trig += [f"match = cache.match_prefix({P[ch['x']]})", "result = cache.load_back(match.best_match_node)"]
    elif m.startswith("evict/"):
        trig += [f"least_recent(node({P[ch['x']]}), on_device=True)", f"result = cache.evict({PS * s.ln[ch['x']]})"]
    elif m == "evict_host":
        trig += [f"least_recent(node({P[ch['x']]}), on_device=False)", f"result = cache.evict_host({PS * s.ln[ch['x']]})"]
    elif m.startswith("poll"):
        trig.append("result = cache.poll()")
    elif m == "prefetch_progress":
        trig.append(f"result = cache.prefetch_progress('r{ch['o']}')")
    return Scenario(cx, "\n".join(lines), "\n".join(trig), P, names)


# ------------------------------------------------------------------------------- replay
def _compare(sc: Scenario, ns: dict) -> list[str]:
    """Differences between the built cache and the model's pre-state (empty: it is that state)."""
    s, cache, out = sc.cx.pre, ns["cache"], []
    nodes = {tuple(ns["path"](n)): n for n in cache.nodes()}
    want = {tuple(p): j for j, p in sc.paths.items() if j}
    if set(nodes) != set(want):
        out.append(f"nodes {sorted(map(len, nodes))} != model's {sorted(map(len, want))}")
    for p, j in want.items():
        n = nodes.get(p)
        if n is None:
            continue
        got = dict(dev=n.value is not None, host=n.host_value is not None, mdev=n.mamba_value is not None,
                   mhost=n.mamba_host is not None, lock=n.lock_ref, href=n.host_ref, clk=cache.caller_locks().get(n.id, 0))
        for f, v in got.items():
            if s.n[f][j] != v:
                out.append(f"node {j} {f}={v}, model {s.n[f][j]}")
    for k, name in sc.op_names.items():
        op = eval(name, ns)  # noqa: S307 - our own generated name
        if op is None or op.id not in cache.ops:
            out.append(f"op {k} ({name}) is not in flight")
    return out


@dataclass
class ReplayResult:
    bug: str
    invariant: str
    transition: str
    nodes: int
    steps: int
    built_as_model: list[str]
    clean_violations: list[str]
    clean_error: str | None
    buggy_violations: list[str]
    buggy_error: str | None
    reproduced: bool
    search_seconds: float
    source: str

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _run(sc: Scenario, patch) -> tuple[dict, list[str], str | None, list[str]]:
    ns: dict = {}
    exec(compile(sc.setup, "<scenario setup>", "exec"), ns)  # noqa: S102 - generated from a Z3 model
    built = _compare(sc, ns)
    err = None
    try:
        if patch is None:
            exec(compile(sc.trigger, "<scenario trigger>", "exec"), ns)  # noqa: S102
        else:
            with patch():
                exec(compile(sc.trigger, "<scenario trigger>", "exec"), ns)  # noqa: S102
    except Exception as e:  # the trigger may refuse (the cache's own guard) or crash
        err = f"{type(e).__name__}: {e}"
        ns["error_trace"] = traceback.format_exc()
    v = [str(x) for x in ns["cache"].check_invariants(check_data=True)]
    return ns, built, err, v


def replay(bug: str, nodes: int = 4, ops: int = 2) -> ReplayResult:
    """Find the smallest constructible counterexample for `bug`, build it, run the transition
    clean and with the bug patched in. `reproduced`: the buggy run breaks the bug's invariant
    (for class 4's load-back: load_back refuses an anchor that fails T6's valid_end) while the
    clean run breaks none."""
    from stateful_tests.seeded_bugs import SEEDED_BUGS

    cx = find(bug, nodes, ops)
    if cx is None:
        return ReplayResult(bug, BUG_INVARIANTS[bug][0], "-", nodes, 0, ["no constructible counterexample"], [], None,
                            [], None, False, 0.0, "")
    sc = scenario(cx)
    _, built, clean_err, clean_v = _run(sc, None)
    ns, _, bug_err, bug_v = _run(sc, SEEDED_BUGS[bug].patch)
    inv = cx.invariant
    broken = any(v.startswith(inv) for v in bug_v)
    if bug == BUG4_LOAD and bug_err and "InvalidAnchorError" in bug_err:
        anchor = ns["match"].best_match_node
        broken = not valid_end(ns["cache"].snapshot(), anchor.id, "any")  # T6's predicate on the anchor it got
        bug_v = bug_v + [f"{inv}: load_back was asked to start at node {anchor.id}, which valid_end rejects "
                         f"(refcache.invariants.t6_load_anchor's test); the cache refused: {bug_err}"]
    body = sc.setup.split("# ---- build the pre-state", 1)[1] + "\n" + sc.trigger
    steps = sum(1 for line in body.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    return ReplayResult(bug, inv, cx.macro, nodes, steps, built, clean_v, clean_err, bug_v, bug_err,
                        broken and not clean_v and not built and clean_err is None, cx.seconds, sc.source)


def replay_all(nodes: int = 4) -> list[ReplayResult]:
    return [replay(bug, nodes) for bug in PLANS]


assert set(CHECKS) >= set(BUG_INVARIANTS[b][0] for b in PLANS)
__all__ = ["find", "scenario", "replay", "replay_all", "Counterexample", "Scenario", "ReplayResult", "busy"]


def as_pytest(r: ReplayResult) -> str:
    """A standalone pytest file: the scenario passes on the clean cache and fails with the bug."""
    setup, trigger = r.source.split("\n# ---- the transition", 1)
    trigger = trigger.split("\n", 1)[1]
    return f'''"""Replay of seeded bug {r.bug}: Z3 counterexample to {r.invariant} through {r.transition}
(trees of up to {r.nodes} nodes), as {r.steps} HiCache calls. Generated by properties.replay."""

from stateful_tests.seeded_bugs import SEEDED_BUGS

SETUP = {setup!r}
TRIGGER = {trigger!r}


def _run(patched):
    ns = {{}}
    exec(SETUP, ns)
    try:
        if patched:
            with SEEDED_BUGS[{r.bug!r}].patch():
                exec(TRIGGER, ns)
        else:
            exec(TRIGGER, ns)
    except Exception as e:  # the cache may refuse the call (its own guard)
        return [f"{{type(e).__name__}}: {{e}}"] + [str(v) for v in ns["cache"].check_invariants(check_data=True)]
    return [str(v) for v in ns["cache"].check_invariants(check_data=True)]


def test_clean_cache_keeps_every_invariant():
    assert _run(False) == []


def test_seeded_bug_breaks_{r.invariant.lower()}():
    assert _run(True), "the bug went unnoticed"
'''


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    from pathlib import Path

    ap = argparse.ArgumentParser(prog="python -m properties.replay", description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--bug", action="append", help="seeded bug key (default: classes 1, 3, 4, 5)")
    ap.add_argument("--out", help="write <bug>.json and test_replay_<bug>.py here")
    a = ap.parse_args(argv)
    ok = True
    for bug in a.bug or list(PLANS):
        r = replay(bug, a.nodes)
        ok &= r.reproduced
        print(f"{bug}: {r.invariant} via {r.transition}, {r.steps} calls, reproduced={r.reproduced}"
              f" (search {r.search_seconds:.1f}s)")
        print("  clean:", r.clean_violations or "no violation", "| buggy:", r.buggy_violations[:1] or r.buggy_error)
        if a.out:
            out = Path(a.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{bug}.json").write_text(json.dumps(r.as_dict(), indent=1))
            (out / f"test_replay_{bug}.py").write_text(as_pytest(r))
    return 0 if ok else 1


if __name__ == "__main__":
    import sys

    sys.exit(main())

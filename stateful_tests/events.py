"""Named rare events: evidence that the campaign reached the paths where bugs hide.

A run with no violation only means something if the machines went where bugs live: a prefetch
truncated because L2 was short, a termination refused while a pool transfer was still in flight,
a cascade through tombstones. These are the "sometimes" assertions of simulation testing: each
event below is a path of refcache/ that the campaign should reach at least once; a report that
names the events never reached says what the run does *not* show.

Importing this module installs `observe` into `stateful_tests.machines.STEP_HOOKS` (once). It
is called after every checked step with the snapshots before and after; it reads them (and the
live ops and storages where a snapshot does not say) to tell which events the step went
through, and counts them in the process-global `REACHED`. It also counts, per machine, which
rules ran (`RULES`). Detection never raises into the machine: a detector that fails is counted
in `ERRORS` (reported by the campaign), so an observer bug cannot pose as a cache bug.
"""

from __future__ import annotations

import ast
import re
import sys
import weakref
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import CodeType

from refcache.pages import ROOT_HASH, page_hashes
from refcache.snapshot import NodeSnap, OpSnap, Snapshot

from . import machines

EVENTS: dict[str, str] = {
    # L3 -> L2 prefetch
    "prefetch_truncated": "a prefetch fetched fewer tokens than storage held, because L2 could not make room for all",
    "prefetch_below_threshold": "a prefetch was not started: storage held fewer tokens than prefetch_threshold",
    "prefetch_terminated_pool_pending": "prefetch_progress answered False: every KV page had arrived but a pool "
                                        "transfer (mamba state) was still in flight (X2)",
    "prefetch_timeout": "the timeout policy terminated a prefetch before all its parts arrived",
    "prefetch_best_effort_partial": "the best-effort policy terminated a prefetch with pages still in flight",
    "prefetch_discarded_after_gap": "a prefetch terminated with a failed or pending page followed by an arrived "
                                    "one: only the leading run joined the tree",
    "prefetch_aborted_in_flight": "a prefetch was aborted while some of its reads were still in flight (it drains)",
    "prefetch_drained_after_detach": "a detached prefetch freed its leftover L2 slots later, when its reads settled",
    "prefetch_read_miss": "a prefetch read found its page gone from storage (a failed part, never wrong data)",
    "storage_hole": "storage held a later page of the prefix but not an earlier one: the prefetch stopped at the hole",
    "torn_record": "a storage record read back damaged or short (checksum mismatch): dropped and treated as a miss",
    "storage_evicted": "L3 was full and dropped its least recently used page to store a new one",
    "storage_io_error": "an L3 read or write raised an I/O error (a failed part, or a page missing from L3)",
    "tp_disagreement": "TP ranks disagreed: a collective's agreed value differed from this rank's own view",
    "tp_hit_capped": "a peer rank held fewer pages: the prefetch fetched the agreed (smaller) hit length",
    "tp_terminated_with_pool_in_flight": "a peer rank pulled this one into terminating a prefetch while its pool "
                                         "transfer was in flight: it gave up its part and drained",
    # L1 <-> L2
    "load_while_backup_in_flight": "a load-back started while a backup op was in flight on the same root path",
    "insert_skipped_load_in_flight": "insert took nothing because a load-back was bringing a node of its path",
    "device_pool_exhausted_nothing_evictable": "an L1 allocation (request or load-back) raised PoolExhausted: "
                                               "not enough was evictable",
    "alloc_waits_for_write_back": "an L1 allocation raised PoolExhausted after deferring evictions to write-back backups",
    "host_pool_exhausted": "a backup or prefetch could not get L2 slots, even after host eviction",
    "host_state_pool_exhausted": "a backup or prefetch went without its mamba state: no L2 state slot could be freed",
    "write_back_deferred_eviction": "an eviction was deferred to a write-back backup (the node demotes when it lands)",
    "write_back_demoted_on_ack": "a deferred write-back backup was acknowledged and its node demoted from L1",
    "failed_transfer_part": "a part of a backup or load failed and the op released every slot it held",
    "failed_pool_transfer_part": "the failed part of a backup or load was its pool transfer (the KV had landed)",
    "store_part_failed": "a write to L3 failed part-way (the op finished FAILED, L2 kept its data)",
    "evict_freed_nothing": "an eviction asked for L1 tokens while device data existed, and freed none (locked or busy)",
    # tree shape
    "split_under_inflight_op": "a node was split while a backup or load in flight covered it (the op now covers both)",
    "split_under_l3_op": "a node was split while a store or prefetch in flight was anchored on it",
    "cascade_through_tombstones": "one step deleted two or more nodes in a chain (a cascade deletion)",
    "cascade_deleted_kv_tombstone": "a cascade deleted a sidecar tombstone that still held KV",
    "mamba_tombstone_created": "a node kept its KV but lost its last mamba state (a mamba tombstone)",
    "swa_tombstone_created": "a node kept its full KV but lost its SWA KV on both tiers (an SWA tombstone)",
    "lock_on_host_only_bottom": "lock() skipped a host-only bottom segment and locked a node above it (or nothing)",
    "operation_on_deleted_node": "an operation was given a node the tree had since deleted (UnknownNodeError)",
}

REACHED: Counter[str] = Counter()
"""Steps that reached each event (a step counts once per event), since the last `reset()`."""
RULES: dict[str, Counter[str]] = {}
"""Machine name -> rule name -> invocations (a rule calling another counts as the outer one)."""
ERRORS: Counter[str] = Counter()
"""Detector failures (exception type and message): an observer bug, never a cache bug."""


def reset() -> None:
    """Forget every count (the campaign resets before the phase it reports on)."""
    REACHED.clear()
    RULES.clear()
    ERRORS.clear()


def reached() -> dict[str, int]:
    """Every declared event with its count, 0 for those never reached (declaration order)."""
    return {name: REACHED[name] for name in EVENTS}


def never_reached() -> list[str]:
    """The declared events no step reached since the last `reset()`."""
    return [name for name in EVENTS if not REACHED[name]]


def rules() -> dict[str, dict[str, int]]:
    """Rule counts per machine (machines in MACHINES order, rules by name)."""
    order = list(machines.MACHINES)
    return {m: dict(sorted(c.items()))
            for m, c in sorted(RULES.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0]))}


# ------------------------------------------------------------------------------ helpers
_PREFETCH = re.compile(r"^prefetch (\S+) (\[[^\]]*\]) after (\[[^\]]*\]) -> \d+ tokens$")
_PROGRESS = re.compile(r"^progress (\S+) -> (True|False)$")
_EVICT = re.compile(r"^evict (\d+) -> (\d+)$")


# storage statistics (refcache.storage.StorageBackend.stats) whose growth during a step is an event
_STORAGE_STATS = {"corrupt": "torn_record", "miss": "prefetch_read_miss", "evicted": "storage_evicted",
                  "io_error": "storage_io_error"}


@dataclass(eq=False)
class _Seen:
    """What the observer remembers about one machine between its steps."""

    deferred: set[int] = field(default_factory=set)  # write-back backups that demote on acknowledgement
    rids: dict[str, int] = field(default_factory=dict)  # prefetch request id -> op id
    storage_stats: dict[int, tuple[int, ...]] = field(default_factory=dict)  # id(storage) -> _STORAGE_STATS last step
    tp_disagreements: int = 0  # the rank group's count of disagreeing collectives, last step


_SEEN: dict[int, tuple[weakref.ref, _Seen]] = {}  # id(machine) -> (the machine, what was seen); the ref tells reuse


def _seen(machine) -> _Seen:
    entry = _SEEN.get(id(machine))
    if entry is None or entry[0]() is not machine:
        if len(_SEEN) > 64:  # machines come and go: forget the dead ones
            for k in [k for k, (r, _) in _SEEN.items() if r() is None]:
                del _SEEN[k]
        entry = _SEEN[id(machine)] = (weakref.ref(machine), _Seen())
    return entry[1]


def _prefix(snap: Snapshot, node_id: int) -> tuple[int, ...]:
    out: list[tuple[int, ...]] = []
    n: NodeSnap | None = snap.nodes.get(node_id)
    while n is not None and n.parent is not None:
        out.append(n.key)
        n = snap.nodes.get(n.parent)
    return tuple(t for k in reversed(out) for t in k)


def _ancestors(snap: Snapshot, node_id: int) -> set[int]:
    """`node_id` and every node above it (root excluded)."""
    out = set()
    n = snap.nodes.get(node_id)
    while n is not None and n.parent is not None:
        out.add(n.id)
        n = snap.nodes.get(n.parent)
    return out


def _path(snap: Snapshot, tokens: Iterable[int]) -> list[NodeSnap]:
    """Nodes whose keys make up a prefix of `tokens`, from the root down (whole nodes only)."""
    key, ps = tuple(tokens), snap.page_size
    node, pos, out = snap.nodes[snap.root], 0, []
    while pos < len(key):
        child = next((snap.nodes.get(c) for k, c in node.children if k == key[pos:pos + ps]), None)
        if child is None or key[pos:pos + len(child.key)] != child.key:
            break
        out.append(child)
        node, pos = child, pos + len(child.key)
    return out


def _op_nodes(op: OpSnap) -> set[int]:
    """Nodes an L1<->L2 op covers (what the cache keeps busy): segments, SWA nodes, anchor."""
    return {s[0] for s in op.segments} | set(op.swa_nodes) | ({op.anchor} if op.anchor is not None else set())


def _has_kv(n: NodeSnap) -> bool:
    return n.device is not None or n.host is not None


def _tombstone(snap: Snapshot, n: NodeSnap) -> bool:
    """No value of the defining component on any tier (HiCache.is_tombstone, on a snapshot)."""
    if snap.sidecar == "mamba":
        return n.mamba is None and n.mamba_host is None
    if snap.sidecar == "swa":
        return not n.swa and not n.swa_host
    return not _has_kv(n)


def _parts(op: OpSnap, kv: bool | None = None) -> list[str]:
    """Statuses of the op's parts: all, only the KV parts (kv=True), or only the pool transfers."""
    return [s for p, s in op.parts if kv is None or p.startswith("pool:") != kv]


# ------------------------------------------------------------------------------ detection
def detect(machine, what: str, before: Snapshot, after: Snapshot) -> set[str]:
    """The events one checked step went through (the step `what` took `before` to `after`)."""
    seen = _seen(machine)
    cache = machine.cache
    ev: set[str] = set()
    word = what.split()[0] if what else ""
    b_ops = {o.id: o for o in before.ops}
    a_ops = {o.id: o for o in after.ops}
    new_ops = [o for o in after.ops if o.id not in b_ops]
    gone_ops = [o for o in before.ops if o.id not in a_ops]

    # --- L3 storage statistics (reads happen when the executor completes a part)
    for st in (cache.storage, cache.state_storage):
        if st is None:
            continue
        now = tuple(st.stats[k] for k in _STORAGE_STATS)
        last = seen.storage_stats.get(id(st), (0,) * len(_STORAGE_STATS))
        ev.update(name for name, a, b in zip(_STORAGE_STATS.values(), last, now, strict=True) if b > a)
        seen.storage_stats[id(st)] = now

    # --- TP: a collective whose agreed value differed from this rank's own (stateful_tests.peer_ranks counts them)
    tp = getattr(cache.ranks, "disagreements", None)
    tp_disagreed = tp is not None and tp > seen.tp_disagreements
    if tp_disagreed:
        ev.add("tp_disagreement")
    seen.tp_disagreements = tp or 0

    # --- operations that raised
    if what.endswith("-> PoolExhausted"):
        if word == "backup":
            ev.add("host_pool_exhausted")
        elif word in ("alloc", "alloc_state", "load_back"):
            deferred = any(o.kind == "backup" and cache.ops.get(o.id) is not None and cache.ops[o.id].demote_on_done
                           for o in new_ops)
            ev.add("alloc_waits_for_write_back" if deferred else "device_pool_exhausted_nothing_evictable")
    if what.endswith("-> UnknownNodeError"):
        ev.add("operation_on_deleted_node")

    # --- new operations
    for o in new_ops:
        live = cache.ops.get(o.id)
        if o.kind == "backup":
            if live is not None and live.demote_on_done:
                ev.add("write_back_deferred_eviction")
                seen.deferred.add(o.id)
            end = after.nodes.get(o.segments[-1][0]) if o.segments else None
            if end is not None and end.mamba is not None and not o.pool_transfers:
                ev.add("host_state_pool_exhausted")
        elif o.kind == "load":
            path = _ancestors(after, o.anchor) if o.anchor is not None else set()
            if any(b.kind == "backup" and b.state == "in_flight" and {s[0] for s in b.segments} & path
                   for b in after.ops):
                ev.add("load_while_backup_in_flight")

    # --- prefetch start
    if word == "prefetch" and (m := _PREFETCH.match(what)):
        rid, tokens, anchor = m.group(1), ast.literal_eval(m.group(2)), ast.literal_eval(m.group(3))
        ps = after.page_size
        hashes = page_hashes(ROOT_HASH, list(anchor) + list(tokens), ps)[len(anchor) // ps:]
        stored = cache.storage.exists(hashes) if cache.storage is not None else 0
        agreed = stored  # pages every TP rank can supply: a simulated peer says how many it holds
        cap = getattr(getattr(cache.ranks, "view", None), "hit_cap", None)
        if cap is not None and tp_disagreed:
            agreed = min(stored, cap // ps)
            ev.add("tp_hit_capped")
        started = [o for o in new_ops if o.kind == "prefetch"]
        got = started[0].kv_parts if started else 0
        if started:
            seen.rids[rid] = started[0].id
        threshold = max(cache.config.prefetch_threshold, 1)
        if 0 < got < agreed:
            ev.add("prefetch_truncated")
        elif not got and 0 < agreed * ps < threshold:
            ev.add("prefetch_below_threshold")
        elif not got and agreed * ps >= threshold:
            ev.add("host_pool_exhausted")  # not even `threshold` tokens of L2 could be made
        if stored < len(hashes) and any(h in cache.storage for h in hashes[stored + 1:]):
            ev.add("storage_hole")
        if started and cache.config.has("mamba") and cache.state_storage is not None:
            end = hashes[got - 1]
            if cache.state_storage.exists([end]) and not started[0].pool_transfers:
                ev.add("host_state_pool_exhausted")

    # --- prefetch termination
    if word == "progress" and (m := _PROGRESS.match(what)):
        rid, done = m.group(1), m.group(2) == "True"
        op_id = seen.rids.get(rid)
        if op_id is None and rid in getattr(machine, "prefetching", {}):
            op_id = machine.prefetching[rid][0].id
        op = a_ops.get(op_id) or b_ops.get(op_id)  # progress changes no part's status: after, while it is there
        if op is not None:
            kv, pool = _parts(op, kv=True), _parts(op, kv=False)
            pending = "pending" in kv or "pending" in pool
            if not done and kv and all(s == "done" for s in kv) and "pending" in pool:
                ev.add("prefetch_terminated_pool_pending")
            if done:
                seen.rids.pop(rid, None)
                policy = cache.config.prefetch_policy.value
                if "pending" in pool:
                    ev.add("tp_terminated_with_pool_in_flight")  # this rank alone never would (X2)
                elif pending and policy == "timeout" and not tp_disagreed:  # (not a peer's timeout)
                    ev.add("prefetch_timeout")
                elif pending and policy == "best_effort":
                    ev.add("prefetch_best_effort_partial")
                lead = next((i for i, s in enumerate(kv) if s != "done"), len(kv))
                if "done" in kv[lead:]:
                    ev.add("prefetch_discarded_after_gap")

    # --- prefetch abort and drain
    for o in after.ops:
        p = b_ops.get(o.id)
        if o.kind == "prefetch" and o.aborted and o.state == "draining" and p is not None and not p.aborted:
            ev.add("prefetch_aborted_in_flight")
    for o in gone_ops:
        if o.kind == "prefetch" and o.state == "draining":
            ev.add("prefetch_drained_after_detach")

    # --- ops finished by poll
    for o in gone_ops:
        statuses = _parts(o)
        if o.kind in ("backup", "load") and "failed" in statuses:
            ev.add("failed_transfer_part")
            if "failed" in _parts(o, kv=False) and "failed" not in _parts(o, kv=True):
                ev.add("failed_pool_transfer_part")
        elif o.kind == "store" and "failed" in statuses:
            ev.add("store_part_failed")
        if o.id in seen.deferred:
            seen.deferred.discard(o.id)
            node = after.nodes.get(o.segments[-1][0]) if o.segments else None
            if statuses and all(s == "done" for s in statuses) and node is not None and node.device is None:
                ev.add("write_back_demoted_on_ack")

    # --- tree shape: deletions, splits, tombstones
    deleted = before.nodes.keys() - after.nodes.keys()
    parents = {before.nodes[d].parent for d in deleted}
    # deleted because a deleted child left them childless tombstones (an eviction loop that takes the
    # parent next, as a leaf with data of its own, is not a cascade)
    cascaded = [before.nodes[d] for d in deleted & parents if _tombstone(before, before.nodes[d])]
    if cascaded:
        ev.add("cascade_through_tombstones")
        if any(_has_kv(n) for n in cascaded):
            ev.add("cascade_deleted_kv_tombstone")
    for u in after.nodes.keys() - before.nodes.keys():  # a new node above an old one is the upper half of a split
        split = {c for _, c in after.nodes[u].children if c in before.nodes and before.nodes[c].parent != u}
        if split & {n for o in before.ops if o.kind in ("backup", "load") for n in _op_nodes(o)}:
            ev.add("split_under_inflight_op")
        if split & {n for o in before.ops if o.kind in ("store", "prefetch") for n in (o.anchor, o.host_refed)}:
            ev.add("split_under_l3_op")
    side = before.sidecar
    if side is not None:
        tomb = "mamba_tombstone_created" if side == "mamba" else "swa_tombstone_created"
        for nid, b in before.nodes.items():
            a = after.nodes.get(nid)
            if a is not None and not _tombstone(before, b) and _tombstone(after, a) and _has_kv(a):
                ev.add(tomb)
                break

    # --- per-operation outcomes
    if word == "insert":
        path = _path(after, ast.literal_eval(what[len("insert "):]))
        if any(n.device is None for n in path):
            ev.add("insert_skipped_load_in_flight")  # insert adopts every node it passes, unless a load brings one
        elif cache.config.write_policy.value == "write_through":
            busy = {n for o in after.ops if o.kind in ("backup", "load") for n in _op_nodes(o)}
            if any(n.host is None and n.id not in busy for n in path):
                ev.add("host_pool_exhausted")  # write-through backs up every node it touches, unless L2 is full
    elif word == "lock" and not what.startswith("lock ->"):
        wanted = ast.literal_eval(what[len("lock "):])
        grew = [n for n, c in after.caller_locks.items() if c > before.caller_locks.get(n, 0)]
        got = _prefix(after, grew[0]) if grew else ()
        if len(got) < len(wanted):
            ev.add("lock_on_host_only_bottom")
    elif word == "evict" and (m := _EVICT.match(what)):
        if int(m.group(1)) > 0 and int(m.group(2)) == 0 and any(n.device is not None for n in before.nodes.values()
                                                                 if n.parent is not None):
            ev.add("evict_freed_nothing")
    return ev


# ------------------------------------------------------------------------------ rule counts
_CODES: dict[type, dict[CodeType, str]] = {}
_MACHINE_NAMES: dict[type, str] = {}
_RULE_DEPTH = 10  # frames above the hook searched for rules: _step, a helper, a rule and a rule calling it (at 7)
_last_rule_frame: object = None  # the frame of the rule invocation counted last (held, so its id cannot be reused)


def _machine_name(cls: type) -> str:
    name = _MACHINE_NAMES.get(cls)
    if name is None:
        by_class = {c: n for n, c in machines.MACHINES.items()}
        name = next((by_class[k] for k in cls.__mro__ if k in by_class), cls.__name__)
        _MACHINE_NAMES[cls] = name
    return name


def _rule_codes(cls: type) -> dict[CodeType, str]:
    codes = _CODES.get(cls)
    if codes is None:
        state = cls.setup_state()
        codes = _CODES[cls] = {r.function.__code__: r.function.__name__ for r in [*state.rules, *state.initializers]}
    return codes


def _count_rule(machine) -> None:
    """Count the outermost rule on the stack, once per invocation (a rule may check several steps)."""
    global _last_rule_frame
    codes = _rule_codes(type(machine))
    f, outer = sys._getframe(1), None
    for _ in range(_RULE_DEPTH):  # not the whole stack: frames are materialized as they are walked
        if f is None:
            break
        if f.f_code in codes:
            outer = f
        f = f.f_back
    if outer is None or outer is _last_rule_frame:
        return
    _last_rule_frame = outer
    name = _machine_name(type(machine))
    if name not in RULES:
        RULES[name] = Counter()
    RULES[name][codes[outer.f_code]] += 1


# ------------------------------------------------------------------------------ the hook
def observe(machine, what: str, before: Snapshot, after: Snapshot) -> None:
    """STEP_HOOKS observer: count the rule and the events of this step; never raises."""
    try:
        _count_rule(machine)
        for name in detect(machine, what, before, after):
            REACHED[name] += 1
    except Exception as e:  # noqa: BLE001 - an observer bug must not pose as a cache violation
        ERRORS[f"{type(e).__name__}: {e} (step {what!r})"[:300]] += 1


def install() -> None:
    """Register `observe` in the machines' step hooks (idempotent, also across reloads)."""
    machines.STEP_HOOKS[:] = [h for h in machines.STEP_HOOKS
                              if not (getattr(h, "__module__", None) == __name__ and h.__name__ == "observe")]
    machines.STEP_HOOKS.append(observe)


install()

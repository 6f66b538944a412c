"""Drift guard: does a concrete step of the stateful suite satisfy the Z3 transition relation?

`check_step(before, op_name, after)` abstracts both snapshots (properties.abstraction) and
searches, with the very transition functions the proofs use evaluated on Python values
(properties.transitions on symbolic.PY), for a sequence of at most `max_steps` transitions of
the family `op_name` names that leads from `before` to `after`. If none does, the relation no
longer describes what the code did (or the code did something the relation forbids): the
returned list says so. An empty list means the step is explained by the relation.

One API call is usually several relation steps (an eviction loop is one step per victim, a poll
one per acknowledged op), hence the bounded search. Cost: proportional to the states explored
(typically a few ms; see the report in properties/README or the test).
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import Counter

from refcache.snapshot import Snapshot

from .abstraction import abstract, canon, records, slot_map
from .symbolic import BACKUP, PY, State
from .transitions import TRANSITIONS, PyChoices

EVICTION = ("evict_demote", "evict_interior", "evict_delete", "evict_writeback", "evict_host", "evict_sidecar",
            "backup_submit", "backup_fail")
BACKUP_CALL = ("backup_begin", "backup_submit", "backup_fail", "evict_host")
POLL = ("poll_ack", "poll_release", "prefetch_drain", "store_finish")
PARTS = ("part_done", "part_fail")

FAMILIES: dict[str, tuple[str, ...]] = {
    "alloc": EVICTION,
    "insert": ("insert", "split") + BACKUP_CALL,
    "match": ("split",) + BACKUP_CALL,
    "lock": ("lock",),
    "unlock": ("unlock",),
    "evict": EVICTION,
    "evict_host": ("evict_host",),
    "evict_sidecar": EVICTION,
    "evict_mamba": EVICTION,
    "evict_swa": EVICTION,
    "backup": BACKUP_CALL,
    "write_backup": BACKUP_CALL,
    "load_back": ("load_begin", "load_submit", "load_fail") + EVICTION,
    "complete": PARTS,
    "fail": PARTS,
    "finish_part": PARTS,
    "poll": POLL,
    "settle": PARTS + POLL,
    "prefetch": ("prefetch_begin", "prefetch_submit", "prefetch_fail", "evict_host"),
    # a rank that its TP peers pull into terminating while its own pool transfer is in flight
    # gives up its part and drains: in the one-rank relation, that is an abort
    "prefetch_progress": ("prefetch_terminate", "split", "prefetch_abort"),
    "abort_prefetch": ("prefetch_abort",),
    "store": ("store_begin",),
    "write_backup_storage": ("store_begin",),
    "noop": (),
}
"""Which transitions one call may consist of, by the name the stateful suite gives its step
(the first word of its log line is accepted too: 'evict 8 -> 8' -> 'evict')."""

STATS: dict[str, float] = {"calls": 0, "states": 0, "seconds": 0.0, "inconclusive": 0}


def family(op_name: str) -> tuple[str, ...]:
    """Transitions a step may consist of; 'a+b' is a step made of calls a and b."""
    if "+" in op_name:
        return tuple(dict.fromkeys(t for part in op_name.split("+") for t in family(part)))
    key = op_name.split()[0] if op_name.split() else op_name
    return FAMILIES.get(op_name) or FAMILIES.get(key) or tuple(TRANSITIONS)


FOCUS = {"evict_demote": "x", "evict_interior": "x", "evict_delete": "x", "evict_writeback": "x",
         "evict_host": "x", "evict_sidecar": "x", "split": "c", "backup_begin": "x", "load_begin": "x",
         "prefetch_begin": "x", "store_begin": "x", "unlock": "t"}
"""The node these transitions choose always ends the call changed (evicted, split, locked, referenced),
so the search only tries nodes whose record still differs from the after-snapshot's."""


def _domains(t, s: State, lengths: list[int], focus: tuple[set, set] | None) -> list[list]:
    alive = [j for j in range(1, s.N) if s.alive[j]]
    dead = [j for j in range(1, s.N) if not s.alive[j]]
    free_ops = [k for k in range(s.M) if not s.act[k]][:1]  # op slots are interchangeable
    used_ops = [k for k in range(s.M) if s.act[k] and (focus is None or k in focus[1])]
    doms = []
    for name, dom in t.choices:
        if dom == "node":
            nodes = (dead or [0]) if name == "u" else alive  # [0]: no free slot (a guard refuses its use)
            if focus is not None and FOCUS.get(t.name) == name:
                nodes = [j for j in nodes if j in focus[0]]
            doms.append(nodes)
        elif dom == "any_node":
            nodes = [0] + alive
            if focus is not None and FOCUS.get(t.name) == name:
                nodes = [0] + [j for j in alive if j in focus[0]]
            doms.append(nodes)
        elif dom == "op":
            doms.append(free_ops if t.name.endswith("_begin") or t.name == "evict_writeback" else used_ops)
        elif dom == "flag":
            doms.append([False, True])
        else:
            doms.append(lengths)
    return doms


SUBMIT = {"backup_begin": "backup_submit", "evict_writeback": "backup_submit", "load_begin": "load_submit",
          "prefetch_begin": "prefetch_submit"}
"""An allocation that needs no eviction: begin and submit in one move (the split pair stays too)."""


def successors(s: State, names: tuple[str, ...], lengths: list[int], focus: tuple[set, set] | None = None,
               unknown_demote: frozenset = frozenset()):
    """Every state one transition of `names` (or a begin+submit pair) leads to from state `s`;
    with `focus` (nodes, ops still to change), only choices that touch them (FOCUS). Backups in
    `unknown_demote` (their demote-on-done flag is not in the snapshot) are acked both ways."""
    for name, s2 in _successors(s, names, lengths, focus):
        yield name, s2
        sub = SUBMIT.get(name)
        if sub in names:
            for _, s3 in _successors(s2, (sub,), lengths, None):
                yield f"{name}+{sub}", s3
    if "poll_ack" in names:
        for k in unknown_demote:
            if s.act[k] and not s.demote[k]:
                d = list(s.demote)
                d[k] = True
                for _, s2 in _successors(s.replace(demote=d), ("poll_ack",), lengths, None):
                    if not s2.act[k]:
                        yield "poll_ack(demote)", s2


def _focus(s: State, alive0: frozenset, target) -> tuple[set, set]:
    nodes, ops, recs = set(), set(), records(s, alive0)
    have = Counter(rec for (what, _), rec in recs if what == "op")
    for (what, slot), rec in recs:
        if what == "node" and (slot not in alive0 or rec not in target):
            nodes.add(slot)
        if what == "op" and have[rec] > target.get(rec, 0):  # ops are a multiset: any slot of a surplus record
            ops.add(slot)
    return nodes, ops


def _successors(s: State, names: tuple[str, ...], lengths: list[int], focus):
    for name in names:
        t = TRANSITIONS[name]
        doms = _domains(t, s, lengths, focus)
        keys = [n for n, _ in t.choices]
        for combo in itertools.product(*doms):
            g, s2 = t.fn(PY, s, PyChoices(dict(zip(keys, combo, strict=True))), None)
            if g:
                yield name, s2


def check_step(before: Snapshot, op_name: str, after: Snapshot, max_steps: int = 12,
               max_states: int = 20000) -> list[str]:
    """Problems found: empty when some sequence of <= max_steps transitions of `op_name`'s
    family (see FAMILIES) leads from `before` to `after` in the relation; otherwise one message
    saying what changed and that the relation does not allow it."""
    t0 = time.perf_counter()
    STATS["calls"] += 1
    try:
        m = slot_map(before, after)
    except ValueError as e:
        return [f"drift: {op_name}: {e}"]
    s0, s1 = abstract(before, m), abstract(after, m)
    alive0 = frozenset(j for j in range(1, m.N) if s0.alive[j])
    target = canon(s1, alive0)
    names = family(op_name)
    lengths = sorted({s1.ln[j] for j in range(1, m.N) if s1.alive[j] and j not in alive0} | {1}
                     | {a for j in alive0 for a in range(1, s0.ln[j])})
    starts = [s0]
    # a write-back backup's demote-on-done flag is not in the snapshot: its ack is tried both ways
    unknown = frozenset(k for k in range(m.M) if s0.wb and s0.act[k] and s0.kind[k] == BACKUP)
    tkey = _key(target)
    heap, seen, tie = [], set(), itertools.count()
    for st in starts:
        c = canon(st, alive0)
        seen.add(_seen_key(c, st))
        heapq.heappush(heap, (_distance(c, target), 0, next(tie), 0, st))
    explored, found = 0, any(_key(canon(st, alive0)) == tkey for st in starts)
    while heap and not found and explored <= max_states:  # best first: closest to `after` first
        _, _, _, depth, s = heapq.heappop(heap)
        if depth >= max_steps:
            continue
        for _name, s2 in successors(s, names, lengths, _focus(s, alive0, target), unknown):
            explored += 1
            c = canon(s2, alive0)
            k = _key(c)
            if k == tkey:
                found = True
                break
            sk = _seen_key(c, s2)
            if sk not in seen:
                seen.add(sk)
                heapq.heappush(heap, (_distance(c, target), -depth - 1, next(tie), depth + 1, s2))
    STATS["states"] += explored
    STATS["seconds"] += time.perf_counter() - t0
    if found:
        return []
    if explored > max_states:
        STATS["inconclusive"] += 1
        return []  # inconclusive: the search was cut; counted in STATS, never reported as drift
    c0 = canon(s0, alive0)
    gone, new = c0 - target, target - c0
    return [f"drift: '{op_name}' is not a sequence of <= {max_steps} of the relation's {'/'.join(names)} "
            f"({explored} states explored); records gone: {sorted(map(str, gone))}; records new: {sorted(map(str, new))}"]


def _seen_key(c, s: State):
    """States differ also by what the snapshot does not show (a backup's demote-on-done flag)."""
    return _key(c), tuple(d and a for d, a in zip(s.demote, s.act, strict=True))


def _key(c) -> frozenset:
    return frozenset(c.items())


def _distance(c, target) -> int:
    """Fields to change: node records matched by identity, field by field; ops as a multiset."""
    def split(cnt):
        nodes, ops = {}, Counter()
        for rec, k in cnt.items():
            if rec[0] == "op" or rec[0] in nodes:
                ops[rec] += k
            else:
                nodes[rec[0]] = rec
        return nodes, ops
    (n1, o1), (n2, o2) = split(c), split(target)
    d = 0
    for ref in n1.keys() | n2.keys():
        a, b = n1.get(ref), n2.get(ref)
        if a is None or b is None or len(a) != len(b):
            d += len(a or b)
        else:
            d += sum(x != y for x, y in zip(a, b, strict=True))
    return d + 4 * sum(((o1 - o2) + (o2 - o1)).values())

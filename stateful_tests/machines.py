"""Rule-based machines: refcache and the abstract model (models/abstract.py) in lockstep.

Every rule performs one public operation, abstracts `cache.snapshot()` and checks the step
against the model: the result the model predicts (match lengths, cached length, lock target,
eviction amounts and LRU choices) and the frame (which pages may gain or lose which data).
After every step the invariants run: every check of `check_invariants()` (data included), the
model's own derived counts (locks as this driver holds them), and the data oracle on matches.

The executor is deterministic: rules complete or fail each part of each operation (its KV and
each pool transfer, each page of a prefetch) in any order, and `poll` acknowledges. L3 is a
`MemoryStorage` that other instances fill (`seed_storage`) and this one writes (`store`);
prefetches are driven to termination by `progress` or dropped by `abort`. Pools are tiny, so
eviction and exhaustion are common. Machines are built per component mix and write policy, with
the prefetch policy chosen so that every pair of (component, write policy, prefetch policy)
meets (`MACHINES`); the device comes from REFCACHE_DEVICE, so gpu_tests can run the same machines.
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import tempfile
import zlib
from collections import Counter
from dataclasses import replace

import torch
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, multiple, precondition, rule

from models import effects
from models.abstract import Allowed, Page, abstract, check_evict, check_evict_host, frame, node_prefix, same_data
from models.contents import page_kv, pages_kv
from models.contents import state as spec_state
from models.l3 import L3Model
from models.recency import Recency
from properties.drift import check_step
from refcache import (
    CacheConfig,
    ComponentError,
    DeterministicExecutor,
    HiCache,
    InvalidAnchorError,
    InvalidIndicesError,
    InvalidKeyError,
    LockError,
    OpState,
    PoolExhaustedError,
    RefCacheError,
    TreeNode,
    UnknownNodeError,
    UnknownOperationError,
)
from refcache.errors import StorageError, StorageIOError
from refcache.invariants import check_all
from refcache.pages import ROOT_HASH, page_hashes
from refcache.storage import FileStorage, MemoryStorage
from refcache.transfer import PartStatus

from . import geometries, l3_records
from .data_oracle import data_errors, geometry, served_ok, write_request, write_state
from .peer_ranks import PeerRanks, PeerView

PS = 2
DEVICE_TOKENS = 16  # L1's size
HOST_TOKENS = 24  # L2's size: free L2 is the model's own count against it, never the allocator's
L3_ROOM = {"memory": 256, "file": 12}  # pages each L3 backend kind keeps (the file one evicts, LRU)
PAGES = [(1, 1), (2, 2), (3, 3), (1, 2)]  # few distinct pages: prefixes are shared, split and re-joined
def fresh(text: str) -> str:
    """An equal string that is a new object, as a parsed config file or command line yields it (the
    literals in this file are interned: `is` would agree with `==` on them)."""
    return "".join(list(text))


def parsed(config: dict) -> dict:
    """`config` with every string (component names, policies) replaced by a fresh one."""
    return {k: fresh(v) if isinstance(v, str) else tuple(fresh(c) for c in v) if k == "components" else v
            for k, v in config.items()}


# planted in an L3 directory before a restart: a temp file a crashed writer left, then names that
# are not page files (no suffix, short or long hex stems, not hex)
# every caller mistake the misuse rule makes
MISUSE_KINDS = (
    "unaligned_key", "foreign_slots", "free_cached_slots", "unlock_unlocked", "detached_node", "float_tokens",
    "unknown_prefetch", "bool_tokens", "matrix_tokens", "huge_token", "text_tokens", "negative_evict",
    "negative_evict_host", "count_mismatch", "duplicate_slots", "unaligned_slots", "scrambled_page",
    "slots_past_pool", "negative_slots", "int32_slots", "slot_matrix", "free_unaligned", "free_past_pool",
    "meta_slots", "foreign_state", "two_states", "no_state", "stuttered_page", "gapped_page",
    "page_below_zero", "giant_slots", "scalar_state", "negative_alloc", "unaligned_alloc", "short_count",
    "negative_evict_one", "negative_evict_host_one", "free_two_states", "free_no_state", "free_foreign_state",
    "tail_past_pool", "tail_unaligned",
)
DEMOTING_STEPS = ("evict", "pressure", "alloc", "alloc_state", "load_back", "evict_sidecar", "user_edges")
STRAY_L3_FILES = (".tmp-crashed", "deadbeefdeadbeef", "abc.page", "0123456789abcdef0.page", "notes.page")
STRAY_L3_HASHES = (0xDEADBEEFDEADBEEF, 0xABC, 0x0123456789ABCDEF0)
STORAGE_MISUSES = ("hash_negative", "hash_2_64", "hash_float", "page_bigger", "page_smaller", "page_dtype",
                   "page_list", "pairs_more", "pairs_fewer", "hash_zero", "hash_top")


TOKEN_FORMS = ("list", "tuple", "int64", "int32", "iterator")


def token_form(tokens: list[int], form: str):
    """The same key as a caller may hand it over: a list, a tuple, a 1-D integer tensor, or any
    iterable of ints."""
    if form in ("int64", "int32"):
        return torch.tensor(tokens, dtype=getattr(torch, form))
    return {"list": list, "tuple": tuple, "iterator": iter}[form](tokens)


tokens_st = st.lists(st.sampled_from(PAGES), min_size=1, max_size=5).map(lambda ps: [t for p in ps for t in p])
long_tokens_st = st.lists(st.sampled_from(PAGES), min_size=1, max_size=8).map(lambda ps: [t for p in ps for t in p])

COMPONENTS = {
    "full": {},
    "mamba": dict(components=("full", "mamba"), device_mamba_slots=4, host_mamba_slots=6),
    "swa": dict(components=("full", "swa"), swa_window=4, extra={"device_swa_tokens": 12}),
}
POLICIES = ("write_through", "write_through_selective", "write_back")
# Every DRIFT_EVERY-th step is also checked against the transition relation the Z3 proofs use
# (properties/drift.py), so the encoding cannot drift from the code; 0 turns it off.
DRIFT_EVERY = int(os.environ.get("REFCACHE_DRIFT_EVERY", "10"))
_DRIFT_NAMES = {"progress": "prefetch_progress", "abort": "abort_prefetch"}
# Observers of every checked step, called as hook(machine, what, snapshot_before, snapshot_after):
# what the campaign counts (rare events) without the machines knowing about it.
STEP_HOOKS: list = []
PREFETCH_POLICIES = ("best_effort", "wait_complete", "timeout")


def device() -> str:
    return os.environ.get("REFCACHE_DEVICE", "cpu")


class Disagreement(AssertionError):
    """The cache and the model (or an invariant) disagree after a step."""


class CacheMachine(RuleBasedStateMachine):
    """Base machine; subclasses set CONFIG (CacheConfig keyword arguments)."""

    CONFIG: dict = {}
    STORAGE = "memory"  # L3 backend: "memory" or "file"
    checked_steps = 0  # steps checked against the model, all machines together (benchmarks, campaign)
    requests = Bundle("requests")
    nodes = Bundle("nodes")

    def __init__(self):
        super().__init__()
        cfg = CacheConfig(page_size=PS, device_tokens=DEVICE_TOKENS, host_tokens=HOST_TOKENS, backup_after_hits=2,
                          prefetch_threshold=PS if self.STORAGE == "memory" else 2 * PS, prefetch_timeout_steps=3,
                          device=device(), **parsed(self.CONFIG))
        page = (cfg.num_layers, 2, PS, cfg.num_heads, cfg.head_dim)
        self.l3_dir = tempfile.mkdtemp(prefix="refcache-l3-") if self.STORAGE == "file" else None
        self.storage = self._open_storage("kv", page, cfg.dtype)
        self.state_storage = self._open_storage("state", (cfg.mamba_state_dim,), cfg.dtype) if cfg.has("mamba") else None
        self.l3_writes: list = []  # other instances' L3 writes not landed yet (held by a "slow" fault)
        self.seeded: list = []  # requests whose pages other instances wrote to L3, newest last
        self.ranks = PeerRanks()  # a simulated second TP rank whose local view rules may change
        self.cache = HiCache(cfg, executor=DeterministicExecutor(copy_device=cfg.device),
                             storage=self.storage, state_storage=self.state_storage, ranks=self.ranks)
        layouts = {"L1": (tuple(self.cache.device_kv.data.shape),
                          (cfg.num_layers, 2, DEVICE_TOKENS, cfg.num_heads, cfg.head_dim)),
                   "L2": (tuple(self.cache.host_kv.data.shape),
                          (HOST_TOKENS // PS, cfg.num_layers, 2, PS, cfg.num_heads, cfg.head_dim))}
        for tier, (got, want) in layouts.items():  # the documented layouts: layer-first L1, page-first L2
            self._expect(got == want, f"{tier} KV is laid out as {got}, the design says {want}")
        self.held: list = []  # nodes this driver holds a caller lock on (as lock() returned them)
        self.prefetching: dict[str, tuple] = {}  # request id -> (operation, anchor prefix, key, deadline)
        self._rids = itertools.count()
        self.snap = self.cache.snapshot()
        self.model = abstract(self.snap)
        self.rec = Recency()  # the model's own recency and hit counts (never the cache's stamps)
        # the spec's time for prefetch timeouts: operations that read the clock (match, insert, progress,
        # and the insertion a terminated prefetch makes)
        self.time = 0
        self.put_faults = False  # a write fault or a hole: a stored page may read back as a miss
        self.stores: dict[int, tuple] = {}  # store op id -> (node prefix, its tokens, with a state)
        self.l3 = L3Model(L3_ROOM[self.STORAGE])  # what L3 holds, by the model's own account
        self.l3_states = L3Model(L3_ROOM[self.STORAGE])  # the mamba states L3 holds (no fault reaches them)
        self.l3_state_ops: dict[int, tuple] = {}  # op id -> the prefix whose state it reads or writes
        self.l3_ops: dict[int, list] = {}  # op id -> the L3 pages it reads or writes while in flight
        self.l3_stale: set[int] = set()  # store ops writing through a backend a restart replaced
        self.l3_held: list = []  # page lists of other instances' writes a "slow" fault may hold
        self.staging: dict[int, int] = {}  # prefetch op id -> L2 tokens it still owns (not in the tree)
        self.failed_ops: set[int] = set()  # operations the driver failed a part of
        self.settled: list[tuple[int, str]] = []  # (op id, part) the driver completed or failed
        self.driver_tokens = 0  # L1 slots the driver holds across a step (allocated, not inserted)
        self._misuse_turn = zlib.crc32(repr(sorted(self.CONFIG.items())).encode()) % len(MISUSE_KINDS)
        self._geometry_turn = self._misuse_turn % len(geometries.GEOMETRIES)
        self.demoting: set[int] = set()  # write-back backups an eviction started (their node goes when they land)
        self.get_faults = False  # a read fault was armed: a read may miss a page L3 holds
        self.log: list[str] = []
        self.steps = 0  # this run's steps: the drift check's schedule, so a replay checks the same ones

    @property
    def _write_back(self) -> bool:
        return self.cache.config.write_policy.value == "write_back"

    def _open_storage(self, name: str, page_shape, dtype):
        """L3 as this machine's backend kind: in memory (roomy), or files in a directory with room
        for few pages, so L3's own LRU eviction happens too; every read of a file is judged against
        the record format (l3_records.CheckedFileStorage: an intact record of the page must be
        served, anything else must be a miss)."""
        lru = "".join(["l", "r", "u"])  # as a config file or command line hands it over: not the literal
        if self.l3_dir is None:
            return MemoryStorage(L3_ROOM["memory"], page_shape, dtype, policy=lru)
        return l3_records.CheckedFileStorage(os.path.join(self.l3_dir, name), page_shape, dtype,
                                             capacity_pages=L3_ROOM["file"], policy=lru, fsync=False)

    # ------------------------------------------------------------------ lockstep helper
    def _step(self, what: str, allowed: Allowed, check=None) -> None:
        """Abstract the cache after a step and check it against the model and `allowed`."""
        CacheMachine.checked_steps += 1
        self.steps += 1
        self.log.append(what)
        snap = self.cache.snapshot()
        for hook in STEP_HOOKS:
            hook(self, what, self.snap, snap)
        after = abstract(snap)
        self.after_snap = snap
        errs = frame(self.model, after, allowed)
        if check is not None:
            errs += check(self.model, after)
        errs += data_errors(self.cache, snap)
        errs += effects.size_errors(after, snap.sizes)
        errs += effects.cascade_errors(self.model, after, self.failed_ops)
        self.rec.keep(after.pages)
        self._l3_tick(after)
        op = what.split()[0]
        if DRIFT_EVERY and self.steps % DRIFT_EVERY == 0 and op not in ("seed_storage",):
            errs += check_step(self.snap, _DRIFT_NAMES.get(op, op), snap, max_states=2000)  # Z3 relation drift
        if self._write_back and op in DEMOTING_STEPS:  # backups an eviction starts demote their node when they land
            self.demoting |= {i for i, o in after.ops.items() if o.kind == "backup" and i not in self.model.ops}
        self.snap, self.model = snap, after
        if errs:
            raise Disagreement(f"{what}: cache and model disagree:\n  " + "\n  ".join(errs))

    def _expect(self, cond: bool, msg: str) -> None:
        if not cond:
            raise Disagreement(msg)

    def _l2_room(self, **kw) -> Allowed:
        """A step that may make L2 room: host eviction, whose cascade may delete a sidecar tombstone
        still holding device KV."""
        return Allowed(evict_host=True, evict_dev=self.model.sidecar is not None, **kw)

    def _l1_room(self, **kw) -> Allowed:
        """A step that may make L1 room: device eviction. It loses L2 data only through a sidecar
        tombstone's cascade, or when a write-back backup makes L2 room first."""
        return Allowed(evict_dev=True, evict_host=self.model.sidecar is not None or self._write_back, **kw)

    def _deferred(self, b, a, cands: list) -> list:
        """Write-back: sidecar holders among `cands` whose eviction waits for a backup: device
        leaves with no L2 copy, and parents the step made so by freeing a child (the backup it
        started is theirs)."""
        if not self._write_back:
            return []
        started = {p for k, op in a.ops.items() if k not in b.ops and op.kind == "backup" for p in op.pages}
        return [p for p in cands if (b.dev_evictable(p) and not b.pages[p].host) or p in started]

    def _raised(self, what: str, e: RefCacheError) -> None:
        """An operation raised: nothing may have changed (pool exhaustion may have evicted first,
        as alloc_device documents for write-back)."""
        if isinstance(e, PoolExhaustedError):
            self._step(f"{what} -> PoolExhausted", Allowed(evict_dev=True, evict_host=True))
        else:
            self._step(f"{what} -> {type(e).__name__}", Allowed(), lambda b, a: same_data(b, a))

    # -------------------------------------------------------------------------- rules
    @initialize(target=requests, tokens=tokens_st)
    def first_request(self, tokens):
        self.insert(tokens)
        return tokens

    @rule(target=requests, tokens=tokens_st)
    def insert_new(self, tokens):
        self.insert(tokens)
        return tokens

    def _free(self, pool: str) -> int:
        """Free slots of a pool (tokens for KV pools), from the snapshot the frame was checked on."""
        p = self.snap.pools[pool]
        return len(p.free_pages) * p.page_size

    def _alloc(self, what: str, n: int, alloc) -> object | None:
        """One allocation of a forward pass, checked against the model: it must succeed whenever
        free plus freeable space covers it, and fail without evicting when nothing could."""
        write_back = self._write_back
        free = self._free_device() if what == "alloc" else self._free("device_state")
        try:
            got = alloc()
        except PoolExhaustedError:
            got = None

        def check(b, a):
            changed = frame(b, a, Allowed()) if got is None else []
            if what == "alloc":
                swa_free = self.snap.swa_capacity - PS * sum(g.swa for g in b.pages.values())
                swa_room = b.sidecar != "swa" or not b.ops and swa_free >= n
                v = effects.alloc_errors(b, n, free, got is None and swa_room, write_back, changed)
                if b.sidecar == "swa" and got is None and not b.ops and not swa_room:
                    # SWA evicts LRU holders, stopping at one whose write-back backup it must wait for
                    cands = [p for p, g in b.pages.items() if g.swa and g.lock == 0 and p not in b.busy()]
                    deferred = self._deferred(b, a, cands)
                    if not deferred and swa_free + PS * len(cands) >= n \
                            and free + effects.freeable_device(b, write_back) >= n:
                        v.append(f"alloc of {n} tokens failed although SWA had {swa_free} free and "
                                 f"{PS * len(cands)} evictable, and full KV had room")
                return v if swa_room or got is not None else [x for x in v if "never succeed" in x or "SWA had" in x]
            cands = [p for p, g in b.pages.items() if g.mamba and g.lock == 0 and p not in b.busy()]
            deferred = self._deferred(b, a, cands)
            must = free > 0 or (cands and not deferred)  # a write-back victim waits for its backup
            return [f"alloc of a mamba slot failed with {free} free and {len(cands)} evictable states"] \
                if got is None and must else []

        self._step(f"{what} {n}" + (" -> PoolExhausted" if got is None else ""),
                   self._l1_room(), check)
        return got

    @rule(tokens=requests)
    def insert(self, tokens):
        """A forward pass (allocate, maybe evicting, and write the KV and state the tokens must
        produce), then insert; the caller frees what the tree did not take."""
        c = self.cache
        idx = self._alloc("alloc", len(tokens), lambda: write_request(c, tokens))
        if idx is None:
            return
        slot = None
        if c.config.has("mamba"):
            slot = self._alloc("alloc_state", 1, lambda: write_state(c, tokens))
            if slot is None:
                c.free_device(idx)
                return self._step(f"free {len(tokens)}", Allowed())
        m = self.model
        pages = m.page_prefixes(tokens)
        missing = [p for p in pages if p not in m.pages or not m.pages[p].dev]
        busy = bool(missing) and missing[0] in m.busy()
        want = len(tokens) if busy else m.predict_cached(tokens)
        end = pages[-1]
        want_slot = (slot is not None and not busy and end not in m.busy()
                     and not (end in m.pages and m.pages[end].mamba))
        free_host = self._free("host_kv")
        res = c.insert(tokens, idx, slot)
        self.time += 1
        if res.cached_len:
            c.free_device(idx[: res.cached_len])
        if slot is not None and not res.mamba_slot_used:
            c.free_mamba(slot)
        gain = frozenset() if busy else frozenset(pages)
        self.rec.tick()
        on_dev = [p for p in pages if p in m.pages and m.pages[p].dev]  # device pages are a prefix (T1)
        self.rec.use(on_dev, hit=True)
        if busy:  # the walk stopped at the page a load is bringing: the rest of its node may be stamped
            upto = pages.index(missing[0]) + 1
            self.rec.use(pages[len(on_dev):upto])
            self.rec.maybe_use(pages[upto:])
        else:
            self.rec.use(pages[len(on_dev):])
        policy = c.config.write_policy.value
        may = set() if busy else set(self._due(pages, policy == "write_through", certain=False))
        due = [] if busy else self._due(pages, policy == "write_through")

        def check(b, a):
            v = []
            if res.cached_len != want:
                v.append(f"cached_len {res.cached_len}, model says {want}")
            if slot is not None and res.mamba_slot_used != want_slot:
                v.append(f"mamba_slot_used {res.mamba_slot_used}, model says {want_slot}")
            if not busy and not all(p in a.pages and a.pages[p].dev for p in pages):
                v.append("inserted pages are not all on device")
            return v + effects.backup_errors(b, a, due, free_host, end) + effects.spurious_backups(b, a, may)

        side = gain if m.sidecar == "swa" else frozenset([end]) if want_slot else frozenset()
        if policy == "write_back":  # no backup starts: nothing else may change, no lock is taken
            allowed = Allowed(gain_dev=gain, gain_side=side, lock_delta={})
        else:
            allowed = self._l2_room(gain_dev=gain, gain_side=side)
        self._step(f"insert {tokens}", allowed, check)

    def _due(self, pages: list, inserted: bool, certain: bool = True) -> list:
        """Pages of `pages` the write policy makes due for backup: all of an insert's under
        write-through; under selective write-through those whose hits (certainly, or possibly)
        reached the threshold; none otherwise."""
        c = self.cache.config
        if c.write_policy.value == "write_through":
            return list(pages) if inserted else []
        if c.write_policy.value == "write_through_selective":
            return effects.due_selective(self.rec, pages, c.backup_after_hits, certain)
        return []

    def _match(self, tokens, form: str = "list", tail: tuple = ()):
        """Match `tokens` (whole pages), handed to the cache as `form` with a partial page `tail`
        appended: every form of the same key must match the same, and a partial last page is
        never matched."""
        want = self.model.predict_match(tokens)
        free_host = self._free("host_kv")
        m = self.cache.match_prefix(token_form(list(tokens) + list(tail), form))
        self.time += 1
        got = (m.device_len, len(node_prefix(m.last_host_node)), len(node_prefix(m.best_match_node)),
               m.host_hit_length)
        path = self.model.page_prefixes(tuple(tokens)[: want[1]])  # the pages with data it walked
        self.rec.tick()
        self.rec.use(path, hit=True)
        may, due = set(self._due(path, False, certain=False)), self._due(path, False)

        def check(b, a):
            v = [] if got == want else [f"match (device, last_host, best, host_hit) = {got}, model says {want}"]
            if len(node_prefix(m.last_device_node)) != m.device_len:
                v.append("last_device_node does not end the device match")
            if not served_ok(self.cache, tokens, m.device_indices):
                v.append("D1: match served device pages that do not hold the bytes of the prefix")
            # (a backup the match starts makes L2 room, but never from the path it matched)
            return v + effects.backup_errors(b, a, due, free_host, tuple(tokens)[: want[1]]) + \
                effects.spurious_backups(b, a, may)

        # only selective write-through acts on a match (a backup, which may make L2 room and locks
        # its node); otherwise a match changes no data and no lock
        allowed = self._l2_room() if self.cache.config.write_policy.value == "write_through_selective" \
            else Allowed(lock_delta={})
        self._step(f"match {tokens}", allowed, check)
        return m

    @rule(target=nodes, tokens=requests, extra=st.lists(st.sampled_from(PAGES), max_size=2),
          form=st.sampled_from(TOKEN_FORMS), tail=st.sampled_from([(), (1,)]))
    def match(self, tokens, extra, form="list", tail=()):
        m = self._match(tokens + [t for p in extra for t in p], form, tail)
        return multiple(*{n.id: n for n in (m.best_match_node, m.last_host_node, m.last_device_node)
                          if n.parent is not None}.values())

    @precondition(lambda self: self.cache.nodes())
    @rule(target=nodes, i=st.integers(0, 15))
    def any_node(self, i):
        """Any node of the tree, not only those a match returns: an inner node a split made, one whose
        sidecar state went, a host-only one. A caller may hold on to a node that later becomes any
        of these, and the rules that take a node must hold for each."""
        ns = sorted(self.cache.nodes(), key=node_prefix)
        return ns[i % len(ns)]

    @rule(node=nodes)
    def lock(self, node):
        try:
            target = self.model.predict_lock_target(node_prefix(node))
            got = self.cache.lock(node)
        except RefCacheError as e:
            return self._raised("lock", e)
        if got.parent is not None:
            self.held.append(got)
        delta = {p: 1 for p in self.model.page_prefixes(target)}

        def check(b, a):
            return [] if node_prefix(got) == target else [f"lock locked {node_prefix(got)}, model says {target}"]

        self._step(f"lock {node_prefix(node)}", Allowed(lock_delta=delta), check)

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 7))
    def unlock(self, i):
        node = self.held.pop(i % len(self.held))
        p = node_prefix(node)
        self.cache.unlock(node)
        self._step(f"unlock {p}", Allowed(lock_delta={q: -1 for q in self.model.page_prefixes(p)}))

    @precondition(lambda self: any(g.dev for g in self.model.pages.values()))
    @rule(n=st.sampled_from([0, PS, 4 * PS, 10**6]))
    def evict(self, n):
        freed = self.cache.evict(n)
        # only a write-back backup takes a lock
        self._step(f"evict {n} -> {freed}", self._l1_room() if self._write_back else self._l1_room(lock_delta={}),
                   lambda b, a: check_evict(b, a, n, freed, rec=self.rec))

    @precondition(lambda self: any(g.host for g in self.model.pages.values()))
    @rule(n=st.sampled_from([0, PS, 10**6]))
    def evict_host(self, n):
        freed = self.cache.evict_host(n)
        self._step(f"evict_host {n} -> {freed}", self._l2_room(),
                   lambda b, a: check_evict_host(b, a, n, freed, rec=self.rec))

    @precondition(lambda self: any(g.dev or g.host for g in self.model.pages.values()))
    @rule()
    def pressure(self):
        """A burst of new traffic: evict everything evictable from L1, then from L2."""
        self.evict(10**6)
        self.evict_host(10**6)

    @precondition(lambda self: self.model.sidecar is not None and any(g.mamba or g.swa for g in self.model.pages.values()))
    @rule()
    def evict_sidecar(self):
        c = self.cache
        side = c.config.sidecar
        amount = 1 if side == "mamba" else 2 * PS
        unit = 1 if side == "mamba" else PS  # a mamba state is one slot; SWA is counted in tokens
        before_snap = self.snap
        n = c.evict_mamba(amount) if side == "mamba" else c.evict_swa(amount)

        def check(b, a):
            """Sidecar eviction: LRU over unlocked holders no operation works on (ties either way),
            returning what it freed, freeing what was asked while a holder is left, and no more."""
            gone = Page(False, False)
            lost = [p for p, g in b.pages.items() if getattr(g, side) and not getattr(a.pages.get(p, gone), side)]
            v = [] if n == unit * len(lost) else [f"evict_{side}({amount}) returned {n}, but {unit * len(lost)} were freed"]
            if side == "swa" and any(op.kind == "load" for op in b.ops.values()):
                return v  # a load reserves SWA pages the abstract operation does not list
            cands = [p for p, g in b.pages.items() if getattr(g, side) and g.lock == 0 and p not in b.busy()]
            deferred = self._deferred(b, a, cands)
            if not deferred and unit * len(lost) < min(amount, unit * len(cands)):
                v.append(f"evict_{side}({amount}) freed {unit * len(lost)} while {len(cands)} holders were evictable")
            sizes = [len(nd.key) if side == "swa" else 1 for nd in before_snap.nodes.values()
                     if nd.parent is not None and (nd.swa if side == "swa" else nd.mamba is not None)]
            if sizes and n - max(sizes) >= amount:
                v.append(f"evict_{side}({amount}) freed {n}: more than the last holder it needed")
            chosen = [p for p in cands if p in lost]
            stayed = [p for p in cands if getattr(a.pages.get(p, gone), side)]
            return v + self.rec.lru_errors(chosen, stayed, f"dropped the {side} data of")

        self._step(f"evict_{side} -> {n}", Allowed(evict_dev=True, evict_host=True), check)

    @rule(kind=st.sampled_from(MISUSE_KINDS), tokens=requests)
    def misuse(self, kind, tokens):
        """A caller's mistake: the operation must raise the documented error and change nothing."""
        c, ps = self.cache, PS
        dev = [n for n in c.nodes() if n.value is not None]
        calls = {
            "unaligned_key": (InvalidKeyError, lambda: c.insert(tokens + [1], c._empty_indices())),
            "foreign_slots": (InvalidIndicesError, lambda: c.insert(tokens, torch.arange(
                len(tokens), dtype=torch.int64, device=c.device_kv.allocator.index_device))),
            "free_cached_slots": (InvalidIndicesError, lambda: c.free_device(dev[0].value[:ps]) if dev else
                                  c.free_device(torch.arange(ps, dtype=torch.int64,
                                                             device=c.device_kv.allocator.index_device))),
            "unlock_unlocked": (LockError, lambda: c.unlock(next((n for n in c.nodes()
                                                                  if n.id not in c.caller_locks()), None) or _raise())),
            "detached_node": (UnknownNodeError, lambda: c.lock(TreeNode(tuple(tokens[:ps]), c.root))),
            "float_tokens": (InvalidKeyError, lambda: c.match_prefix(torch.tensor(tokens, dtype=torch.float32))),
            "unknown_prefetch": (UnknownOperationError, lambda: c.prefetch_progress("no-such-request")),
            "bool_tokens": (InvalidKeyError, lambda: c.match_prefix(torch.ones(len(tokens), dtype=torch.bool))),
            "matrix_tokens": (InvalidKeyError, lambda: c.match_prefix(torch.tensor([tokens, tokens]))),
            "huge_token": (InvalidKeyError, lambda: c.match_prefix(tokens[:-1] + [2**70])),
            "text_tokens": (InvalidKeyError, lambda: c.match_prefix(["a"] * len(tokens))),
            "negative_evict": (ValueError, lambda: c.evict(-PS)),
            "negative_evict_host": (ValueError, lambda: c.evict_host(-PS)),
            "count_mismatch": (InvalidIndicesError, lambda: self._insert_owned(tokens, len(tokens) + ps, lambda i: i)),
            "duplicate_slots": (InvalidIndicesError, lambda: self._insert_owned(
                tokens, len(tokens), lambda i: torch.cat([i[:ps], i[:-ps]]) if len(i) > ps else _raise())),
            # slots that are not whole pages of this pool, in every way a caller can get them wrong
            "unaligned_slots": (InvalidIndicesError, lambda: self._insert_owned(tokens, len(tokens), lambda i: i + 1)),
            "scrambled_page": (InvalidIndicesError, lambda: self._insert_owned(
                tokens, len(tokens), lambda i: i.view(-1, ps).flip(1).reshape(-1))),
            "slots_past_pool": (InvalidIndicesError, lambda: self._insert_owned(
                tokens, len(tokens), lambda i: i + DEVICE_TOKENS)),
            "negative_slots": (InvalidIndicesError, lambda: self._insert_owned(
                tokens, len(tokens), lambda i: i - 4 * DEVICE_TOKENS)),
            "int32_slots": (InvalidIndicesError, lambda: self._insert_owned(tokens, len(tokens), lambda i: i.int())),
            "slot_matrix": (InvalidIndicesError, lambda: self._insert_owned(tokens, len(tokens), lambda i: i.view(-1, ps))),
            "free_unaligned": (InvalidIndicesError, lambda: self._free_owned(lambda i: i + 1)),
            "free_past_pool": (InvalidIndicesError, lambda: self._free_owned(lambda i: i + DEVICE_TOKENS)),
            "stuttered_page": (InvalidIndicesError, lambda: self._insert_owned(
                tokens, len(tokens), lambda i: i.view(-1, ps)[:, :1].expand(-1, ps).reshape(-1))),
            "gapped_page": (InvalidIndicesError, lambda: self._insert_owned(
                tokens, len(tokens), lambda i: (i.view(-1, ps)[:, :1] + 2 * torch.arange(ps, device=i.device)).reshape(-1))),
            "page_below_zero": (InvalidIndicesError, lambda: self._insert_owned(
                tokens, len(tokens), lambda i: torch.cat([torch.arange(-ps, 0, dtype=i.dtype, device=i.device), i[ps:]]))),
            "giant_slots": (InvalidIndicesError, lambda: self._insert_owned(tokens, len(tokens), lambda i: i + 2**62)),
            # page 0 (in range, owned or not), then pages that are bad: the refusal names the bad one
            "tail_past_pool": (InvalidIndicesError, lambda: self._insert_owned(
                tokens, len(tokens), lambda i: torch.cat([torch.arange(ps, dtype=i.dtype, device=i.device),
                                                          i[ps:] + DEVICE_TOKENS])) if len(tokens) > ps else _raise()),
            "tail_unaligned": (InvalidIndicesError, lambda: self._insert_owned(
                tokens, len(tokens), lambda i: torch.cat([torch.arange(ps, dtype=i.dtype, device=i.device),
                                                          i[ps:] + 1])) if len(tokens) > ps else _raise()),
            "scalar_state": (InvalidIndicesError, lambda: self._insert_state(tokens, lambda mine: mine.view(()))),
            "negative_alloc": (InvalidIndicesError, lambda: c.alloc_device(-ps)),
            "unaligned_alloc": (InvalidIndicesError, lambda: c.alloc_device(ps + 1)),
            "short_count": (InvalidIndicesError, lambda: self._insert_owned(tokens, len(tokens) - ps, lambda i: i)
                            if len(tokens) > ps else _raise()),
            "negative_evict_one": (ValueError, lambda: c.evict(-1)),
            "negative_evict_host_one": (ValueError, lambda: c.evict_host(-1)),
            "free_two_states": (InvalidIndicesError, lambda: self._free_state(lambda mine: mine.repeat(2))),
            "free_no_state": (InvalidIndicesError, lambda: self._free_state(lambda mine: mine[:0])),
            "free_foreign_state": (InvalidIndicesError, lambda: self._free_state(lambda mine: torch.tensor(
                [next(iter(set(range(c.config.device_mamba_slots)) - {int(mine)}))]))),
            "meta_slots": (InvalidIndicesError, lambda: self._insert_owned(
                tokens, len(tokens), lambda i: torch.empty(len(i), dtype=i.dtype, device="meta"))),
            # a mamba state slot the caller does not own, or not exactly one
            "foreign_state": (InvalidIndicesError, lambda: self._insert_state(tokens, lambda mine: torch.tensor(
                [next(iter(set(range(c.config.device_mamba_slots)) - {int(mine)}))]))),
            "two_states": (InvalidIndicesError, lambda: self._insert_state(tokens, lambda mine: mine.repeat(2))),
            "no_state": (InvalidIndicesError, lambda: self._insert_state(tokens, lambda mine: mine[:0])),
        }
        want, call = calls[kind]
        self._bent = None
        try:
            call()
        except _NothingToMisuse:
            return
        except want as e:
            for says in misuse_says(kind, self._bent):
                if says not in str(e):
                    raise Disagreement(f"misuse {kind}: the error says {str(e)!r}, not {says!r}") from e
            return self._step(f"misuse {kind} -> {want.__name__}", Allowed(), lambda b, a: same_data(b, a))
        raise Disagreement(f"misuse {kind}: {want.__name__} expected, but the call returned or raised otherwise")

    @rule(tokens=requests)
    def misuse_in_turn(self, tokens):
        """Every kind of caller mistake in turn, from a per-machine offset: a short run reaches all of
        them, where drawing kinds at random leaves some out."""
        self._misuse_turn += 1
        self.misuse(MISUSE_KINDS[self._misuse_turn % len(MISUSE_KINDS)], tokens)

    def _misuse_owned(self, n: int, bend, call, what: str) -> None:
        """Run `call` on `bend` of `n` slots this caller owns (allocated without evicting), which must
        refuse them; the slots are given back when it does. Not in a `finally`: a refusal raised by the
        give-back could pass for the one the rule expects."""
        c = self.cache
        try:
            idx = c.alloc_device(n, evict=False)
        except PoolExhaustedError as e:
            b = self.model
            swa_room = b.sidecar != "swa" or (not b.ops and self.snap.swa_capacity - PS * sum(
                g.swa for g in b.pages.values()) >= n)
            if self._free_device() >= n and swa_room:
                raise Disagreement(f"alloc_device({n}, evict=False) refused with {self._free_device()} free "
                                   f"L1 tokens: {e}") from e
            self._step(f"alloc {n} without evicting -> PoolExhausted", Allowed(), lambda b, a: same_data(b, a))
            raise _NothingToMisuse from None
        try:
            self._bent = bend(idx)
            call(self._bent)
        except (RefCacheError, _NothingToMisuse):
            c.free_device(idx)
            raise
        raise Disagreement(f"{what} took slots {bend(idx).tolist()} it should have refused")

    def _insert_owned(self, tokens, n: int, bend) -> None:
        """Insert `tokens` with `bend` applied to `n` slots this caller owns."""
        c = self.cache
        state = torch.tensor([0]) if c.config.has("mamba") else None
        self._misuse_owned(n, bend, lambda slots: c.insert(tokens, slots, state), f"insert of {len(tokens)} tokens")

    def _insert_state(self, tokens, bend) -> None:
        """Insert `tokens` on owned L1 slots with `bend` applied to a mamba slot this caller owns."""
        c = self.cache
        self._state_owned(lambda mine: self._misuse_owned(
            len(tokens), lambda i: i, lambda slots: c.insert(tokens, slots, bend(mine)),
            f"insert with mamba slot {bend(mine).tolist()}"), "insert")

    def _free_state(self, bend) -> None:
        """free_mamba of `bend` applied to a mamba slot this caller owns, which must refuse it."""
        self._state_owned(lambda mine: self.cache.free_mamba(bend(mine)), "free_mamba")

    def _state_owned(self, call, what: str) -> None:
        """Run `call` on a mamba slot this caller owns (allocated without evicting), which must be
        refused; the slot is given back when it is (or when there was nothing to misuse)."""
        c = self.cache
        if not c.config.has("mamba"):
            raise _NothingToMisuse
        try:
            mine = c.alloc_mamba(evict=False)
        except PoolExhaustedError:
            raise _NothingToMisuse from None
        try:
            call(mine)
        except (RefCacheError, _NothingToMisuse):
            c.free_mamba(mine)
            raise
        raise Disagreement(f"{what} took a misused mamba slot (from {mine.tolist()}) it should have refused")

    def _free_owned(self, bend) -> None:
        """Free `bend` applied to one page this caller owns."""
        self._misuse_owned(PS, bend, self.cache.free_device, "free_device")

    @rule()
    def other_geometry(self):
        """A scratch cache of another geometry (page size 1 or 3, threshold 0 or 1, a request past
        256 tokens and pages), the machine's components and policies, round-trips a request
        through every tier as predicted (stateful_tests/geometries.py). The geometries come in turn,
        so a short run reaches every one; each runs once per process. This machine's cache is left alone."""
        self._geometry_turn += 1
        geo = geometries.GEOMETRIES[self._geometry_turn % len(geometries.GEOMETRIES)]
        errs = geometries.round_trip_once(self.cache.config, *geo)
        self._expect(not errs, "; ".join(errs))
        self._step(f"other_geometry page size {geo[0]}, threshold {geo[1]}, {geo[2]} pages", Allowed(),
                   lambda b, a: same_data(b, a))

    @rule(tokens=requests, kind=st.sampled_from(["default_cache", "alloc_nothing", "empty_insert", "other_sidecar"]))
    def user_edges(self, tokens, kind):
        """Valid requests at the edges of what users do: a cache built with defaults, an
        allocation of nothing, an empty insert, evicting a sidecar the cache does not have."""
        c = self.cache
        if kind == "alloc_nothing":
            return self._alloc_nothing()
        if kind == "default_cache":
            return self._default_cache(tokens)
        if kind == "empty_insert":  # nothing to insert: nothing taken, the caller keeps its slot
            try:
                slot = c.alloc_mamba(evict=False) if c.config.has("mamba") else None
            except PoolExhaustedError:
                return
            got = c.insert([], c.alloc_device(0), slot)
            if slot is not None:
                c.free_mamba(slot)  # still the caller's: raises if the tree took it
            self._expect((got.cached_len, got.mamba_slot_used) == (0, False), f"insert([]) returned {got}")
            return self._step("insert []", Allowed(), lambda b, a: same_data(b, a))
        if c.config.sidecar != "swa":  # evicting SWA from a cache without it frees nothing
            self._expect(c.evict_swa(4 * PS) == 0, "evict_swa on a cache without SWA freed something")
        if not c.config.has("mamba"):
            try:
                c.evict_mamba(1)
                raise Disagreement("evict_mamba on a cache without mamba did not raise ComponentError")
            except ComponentError:
                pass
        self._step("evict the sidecar it lacks", Allowed(), lambda b, a: same_data(b, a))

    def _default_cache(self, tokens) -> None:
        """A cache built as a user builds it (no executor given) must move data without being
        driven: a backup started on it is done at its first poll, the bytes on L2. Runs beside
        this machine's cache, which it leaves alone."""
        cfg = self.cache.config
        if cfg.torch_device.type == "cuda":  # the CUDA executor completes asynchronously
            return
        fresh, tokens = HiCache(cfg), tokens[: 2 * PS]
        state = fresh.alloc_mamba() if cfg.has("mamba") else None
        fresh.insert(tokens, fresh.alloc_device(len(tokens)), state)
        node = fresh.match_prefix(tokens).last_device_node
        op = fresh.write_backup(node)
        if op is None:  # write-through backed it up on insert
            op = next(iter(fresh.ops.values()), None)
        done = fresh.poll()
        self._expect(op is None or (op in done and op.state == OpState.DONE and node.host_value is not None),
                     f"a default-built cache left backup {op} {op and op.state.value} after its first poll")
        # with no storage tier there is nothing to prefetch: None, and nothing changes
        before = (len(fresh.ops), fresh.host_kv.allocator.available())
        self._expect(fresh.prefetch("no-l3", fresh.root, list(tokens) + [1] * PS) is None
                     and (len(fresh.ops), fresh.host_kv.allocator.available()) == before,
                     "prefetch on a cache without L3 started something")
        # the defaults evict: all of L1 (SWA: all it can hold; every mamba slot) can be had, the tree's
        # copy being on L2;
        # and the default invariant check does not read data a user's model wrote (here: none)
        self._expect(fresh.check_invariants() == [], f"check_invariants() on a sound cache: {fresh.check_invariants()}")
        try:
            room = DEVICE_TOKENS if cfg.sidecar != "swa" else min(DEVICE_TOKENS, self.snap.swa_capacity // PS * PS)
            whole = fresh.alloc_device(room)  # (an SWA allocation needs as many SWA tokens)
            states = [fresh.alloc_mamba() for _ in range(cfg.device_mamba_slots)] if cfg.has("mamba") else []
        except PoolExhaustedError as e:
            raise Disagreement(f"alloc with the default eviction failed on a cache whose data is all evictable: {e}") \
                from e
        fresh.free_device(whole)
        for st_ in states:
            fresh.free_mamba(st_)

    @rule(node=nodes)
    def backup(self, node):
        try:
            p = node_prefix(node)
            want_none = self.model.pages[p].host or p in self.model.busy() if p in self.model.pages else None
            room = self._host_state_room()
            op = self.cache.write_backup(node)
        except RefCacheError as e:
            return self._raised("backup", e)
        v = [] if (op is None) == want_none else [f"backup returned {op}, model says None={want_none}"]
        if op is not None and self.model.pages[p].mamba and room > 0 and not self._moves_state(op):
            v.append(f"backup of {p}, whose state is on L1, carries no state although L2 has a state slot free")
        self._step(f"backup {p} -> {op and op.id}", self._l2_room(), lambda b, a: v)

    @precondition(lambda self: self.cache.config.write_policy.value == "write_through_selective")
    @rule(i=st.integers(0, 7))
    def hollow_parent(self, i):
        """The tree's rarest shape, made on purpose: a parent holding no data over a host-only
        child. Under selective write-through the child alone is backed up, then L1 is emptied: the
        parent, a device leaf with no L2 copy, drops its L1 data and stays as a data-less interior
        node, which matches must treat as holding nothing; then the parent's prefix is prefetched
        from L3 and waited on, which fills it when L2 has room for it."""
        busy = self.model.busy()
        pairs = [n for n in self.cache.nodes() if n.value is not None and n.host_value is None
                 and n.parent is not self.cache.root and n.parent.value is not None and n.parent.host_value is None
                 and not {node_prefix(n), node_prefix(n.parent)} & busy]
        if not pairs:
            return
        child = pairs[i % len(pairs)]
        parent = list(node_prefix(child.parent))
        self.backup(child)
        self.settle()
        self.evict(10**6)
        self.seed_storage(parent, 8, [])
        self._prefetch_and_wait(lambda: self.prefetch(parent, []), len(parent))

    @rule(tokens=requests)
    def load_back(self, tokens):
        m = self._match(tokens)
        end = node_prefix(m.best_match_node)
        model = self.model
        path = [p for p in model.page_prefixes(end) if not model.pages[p].dev]
        try:
            op = self.cache.load_back(m.best_match_node)
        except InvalidAnchorError as e:
            raise Disagreement(f"load_back(best_match_node) raised {e}") from e
        except PoolExhaustedError:
            free, need, wb = self._free_device(), PS * len(path), self._write_back

            def must(b, a):
                """A full-KV load-back fails only when L1 cannot be made room for its path, its own
                device ancestors (which it locks first) kept."""
                if b.sidecar is not None or not path or set(path) & b.busy():
                    return []
                kept = {q for q in b.page_prefixes(end) if b.pages[q].dev}
                locked = replace(b, pages={q: replace(g, lock=g.lock + (q in kept)) for q, g in b.pages.items()})
                room = free + effects.freeable_device(locked, wb)
                return [f"load_back of {need} tokens failed with {free} free and {room - free} freeable"] \
                    if room >= need else []

            return self._step(f"load_back {end} -> PoolExhausted", Allowed(evict_dev=True, evict_host=True), must)

        touched = set(path) | ({end} if end else set()) | (set(effects.window(model, end)) if end else set())
        free_to_start = not (touched & model.busy()) and not (
            model.sidecar == "swa" and any(o.kind == "load" for o in model.ops.values()))

        def check(b, a):
            if op is None:  # liveness: a load is refused only when nothing is missing or it is under way
                return ([f"load_back({end}) started nothing, but the model says its path misses data "
                         f"({path or 'a sidecar'}) and no operation is bringing it"]
                        if free_to_start and effects.load_needed(model, end) else [])
            if op.id not in a.ops:
                return []
            got, v = a.ops[op.id].pages, []
            if got != set(path):
                v.append(f"load_back moves {sorted(got)}, model says {path}")
            if path:  # it pins the device ancestor its path hangs from (none at the root) while it runs
                top = max((q for q in model.page_prefixes(end) if len(q) < len(path[0]) and model.pages[q].dev),
                          key=len, default=())
                if a.ops[op.id].locked != (top or None):
                    v.append(f"load_back locks {a.ops[op.id].locked}, the device ancestor of its path is {top or None}")
            return v

        self._step(f"load_back {end} -> {op and op.id}", self._l1_room(), check)

    @precondition(lambda self: any(g.host and not g.dev for g in self.model.pages.values()))
    @rule(i=st.integers(0, 7))
    def load_back_crowded(self, i):
        """A load-back when L1 holds only locked data (every device leaf locked, the common state
        under a full batch): it must fail cleanly, giving back the lock and reference it took on its
        device ancestor and path, or start on the room there is. The caller's locks are then released."""
        host_only = sorted(p for p, g in self.model.pages.items() if g.host and not g.dev)
        tokens = list(host_only[i % len(host_only)])
        leaves = [n for n in self.cache.nodes() if n.value is not None
                  and not any(k.value is not None for k in n.children.values())]
        before = len(self.held)
        for n in leaves:
            self.lock(n)
        c, free = self.cache, self._free_device()
        hold = c.alloc_device(free, evict=False) if free and not (self.model.sidecar == "swa") else None
        self.driver_tokens = 0 if hold is None else free  # the rest of L1 is the caller's
        try:
            self.load_back(tokens)
        finally:
            if hold is not None:
                c.free_device(hold)
                self.driver_tokens = 0
        while len(self.held) > before:
            self.unlock(len(self.held) - 1)

    # ------------------------------------------------------------------------- L3 rules
    @rule(target=requests, tokens=st.one_of(requests, long_tokens_st), keep=st.sampled_from([1, 2, 8]),
          extra=st.lists(st.sampled_from(PAGES), max_size=2))
    def seed_storage(self, tokens, keep, extra):
        """Another instance served a request that shares the first `keep` pages of `tokens` and
        goes on with `extra`, and wrote its pages (and final state) to L3."""
        tokens = tokens[: keep * PS] + [t for p in extra for t in p]
        c = self.cache.config
        hashes = page_hashes(ROOT_HASH, tokens, PS)  # L3's keys; the contents come from the tokens
        # asynchronous writes: an injected fault hits this writer too (a page missing, torn, or held)
        write = self.storage.start_put(hashes, list(pages_kv(tuple(tokens), geometry(self.cache))))
        self.l3_writes.append(write)
        v = []
        if not self.l3.put_faults:  # no write fault armed: it lands at its first poll, every page stored
            v = [] if write.poll() and write.result() == [True] * len(hashes) and write.hit_length() == len(hashes) \
                else [f"an unfaulted write of {len(hashes)} pages to L3 did not store them all"]
        if self.state_storage is not None:
            self.l3_writes.append(self.state_storage.start_put(
                hashes[-1:], [spec_state(tuple(tokens), c.mamba_state_dim, c.dtype).clone()]))
            self.l3_states.write([tuple(tokens)])  # no fault reaches state writes: it lands at its first poll
        self.l3_writes = [w for w in self.l3_writes if not w.poll()]
        pages = self.model.page_prefixes(tokens)
        self.l3.write(pages)  # (uncertain once a write fault was armed: a "slow" one holds it for later)
        if self.l3.put_faults:
            self.l3_held.append(pages)
        self.seeded.append(tokens)
        self._step(f"seed_storage {tokens}", Allowed(), lambda b, a: v)
        return tokens

    @precondition(lambda self: self.seeded)
    @rule(i=st.integers(0, 7), cancel=st.booleans())
    def peer_read(self, i, cancel):
        """Another instance reads a request from L3 through the backend's asynchronous API (or
        abandons the read before it ran). Every page it gets holds that prefix's bytes; with no read
        fault ever armed, it gets every page the model is sure of, and `hit_length` is the leading
        run it got."""
        tokens = self.seeded[-1 - i % len(self.seeded)]
        pages = self.model.page_prefixes(tokens)
        lo, hi = self.l3.bounds(pages)
        sure = [p for p in pages if self.l3.certain(p)]
        op = self.storage.start_get(page_hashes(ROOT_HASH, tokens, PS))
        v = []
        if cancel:
            op.cancel()
        elif not op.poll():  # held by a "slow" read fault: the reader waits it out
            self.storage.faults.release()
            v += [] if op.poll() else ["a released read is still pending"]
        got = op.result() if op.poll() else []
        if len(got) != len(pages):
            v.append(f"a read of {len(pages)} pages returned {len(got)} results")
            got = (got + [None] * len(pages))[: len(pages)]
        if cancel:
            v += [] if not any(x is not None for x in got) else ["a cancelled read returned pages"]
        run = len(list(itertools.takewhile(lambda x: x is not None, got)))
        if op.hit_length() != run:
            v.append(f"hit_length() is {op.hit_length()}, but the leading run of pages read is {run}")
        for p, page in zip(pages, got, strict=True):
            if page is not None and not torch.equal(page, page_kv(p, geometry(self.cache))):
                v.append(f"D1: L3 served {p} with bytes that are not this prefix's")
        if not cancel and not self.get_faults:
            v += [f"{p}: the model is sure L3 holds it, but the read missed it" for p, x in zip(pages, got, strict=True)
                  if p in sure and x is None]
            if not lo <= run <= hi:
                v.append(f"read {run} leading pages; by the model L3 holds {lo} to {hi}")
            for p, x in zip(pages, got, strict=True):
                self.l3.read_back(p, x is not None)
        elif not cancel:
            self.l3.read(pages)
        self._step(f"peer_read {tokens}{' cancelled' if cancel else ''} -> {run} pages", Allowed(), lambda b, a: v)

    @precondition(lambda self: self.l3_writes)
    @rule()
    def storage_writes_land(self):
        """Held L3 writes of other instances are released and land."""
        self._land_writes()
        self._step("storage_writes_land", Allowed())

    def _land_writes(self) -> None:
        for st_ in (self.storage, self.state_storage):
            if st_ is not None:
                st_.faults.release()
        self.l3_writes = [w for w in self.l3_writes if not w.poll()]
        for pages in self.l3_held:  # held writes land now (the model cannot tell which were held)
            self.l3.write(pages)
        self.l3_held = []

    @precondition(lambda self: self.l3_dir is not None)
    @rule()
    def reopen_storage(self):
        """The storage service restarts: a new backend over the same directory rebuilds its index
        from the files (reads in flight keep the old handle, which sees the same files)."""
        self._land_writes()
        cfg = self.cache.config
        kv_dir = self.storage.directory
        for name in STRAY_L3_FILES:  # a crashed writer's temp file and files that are not pages
            with open(os.path.join(kv_dir, name), "wb") as f:
                f.write(b"not a page")
        pages = [n for n in os.listdir(kv_dir) if len(n) == 21 and n.endswith(".page")
                 and all(ch in "0123456789abcdef" for ch in n[:16])]
        self.storage = self.cache.storage = self._open_storage("kv", self.storage.page_shape, cfg.dtype)
        left = set(os.listdir(kv_dir))
        self._expect(not any(n.startswith(".tmp-") for n in left), "reopen left a crashed writer's temp file")
        self._expect(all(n in left for n in STRAY_L3_FILES[1:]), "reopen removed files that are not its pages")
        self._expect(len(self.storage) == min(len(pages), L3_ROOM["file"]) and not any(
            h in self.storage for h in STRAY_L3_HASHES),
                     f"reopen indexed {len(self.storage)} pages from {len(pages)} page files (room "
                     f"{L3_ROOM['file']}), or a file that is not a page")
        if self.state_storage is not None:
            self.state_storage = self.cache.state_storage = self._open_storage(
                "state", (cfg.mamba_state_dim,), cfg.dtype)
        self.l3.reopened()
        self.l3_states.reopened()
        # stores in flight write on through the old backend: two writers on one directory
        self.l3_stale |= {i for i in self.stores if i in self.l3_ops or i in self.l3_state_ops}
        self._step("reopen_storage", Allowed())

    @rule(node=nodes)
    def store(self, node):
        try:
            op = self.cache.write_backup_storage(node)
        except RefCacheError as e:
            return self._raised("store", e)
        p = node_prefix(node)
        must = p in self.model.pages and self.model.pages[p].host and p not in self.model.busy()
        if (op is None) == must:
            raise Disagreement(f"store({p}) returned {op}; the node {'has' if must else 'lacks'} L2 data no "
                               "backup or load is working on, so it must start " + ("one" if must else "none"))
        if op is not None:
            self.stores[op.id] = (p, len(node.key), node.mamba_host is not None)
            self.l3_ops[op.id] = [p[:e] for e in range(len(p) - len(node.key) + PS, len(p) + 1, PS)]
            self.l3.write(self.l3_ops[op.id], landed=False)
            if node.mamba_host is not None and self.state_storage is not None:
                self.l3_state_ops[op.id] = p
                self.l3_states.write([p], landed=False)
        self._step(f"store {p} -> {op and op.id}", Allowed())

    def _stored_errors(self, prefix, n_tokens: int, with_state: bool) -> list[str]:
        """A store that completed left the node's pages (and state) in L3 under their keys, with the
        bytes of their prefixes; a roomy in-memory L3 must still hold them."""
        c = self.cache.config
        hashes = page_hashes(ROOT_HASH, list(prefix), PS)
        v = []
        saved = [(st_, st_.faults._rules) for st_ in (self.storage, self.state_storage) if st_ is not None]
        for st_, _ in saved:
            st_.faults._rules = []  # read back without the faults meant for the cache
        try:
            for end in range(len(prefix) - n_tokens + PS, len(prefix) + 1, PS):
                h = hashes[end // PS - 1]
                page = self.storage.get(h)
                self.l3.read_back(prefix[:end], page is not None)
                if page is None:
                    if self.l3_dir is None and not self.put_faults:  # (a torn write reads back as a miss)
                        v.append(f"store of {prefix} completed but L3 lacks the page ending at {end}")
                elif not torch.equal(page, page_kv(prefix[:end], geometry(self.cache))):
                    v.append(f"D1: L3 page of {prefix[:end]} does not hold the bytes of this prefix")
            if with_state and self.state_storage is not None:
                got = self.state_storage.get(hashes[-1])
                self.l3_states.read_back(tuple(prefix), got is not None)
                if got is None and self.l3_dir is None:  # (no fault touches a roomy in-memory state L3)
                    v.append(f"store of {prefix} with its state completed but L3 lacks the state under its last page")
                elif got is not None and not torch.equal(got, spec_state(tuple(prefix), c.mamba_state_dim, c.dtype)):
                    v.append(f"D1: L3 state of {prefix} is not the state of this prefix")
        finally:
            for st_, rules in saved:
                st_.faults._rules = rules
        return v

    @rule(kind=st.sampled_from(["io_error", "torn", "slow"]), op=st.sampled_from(["get", "put"]))
    def storage_fault(self, kind, op):
        """The next L3 read (or write) fails or comes back torn: a failed read may bring nothing,
        never wrong data (D1 checks every page that lands)."""
        self.storage.faults.inject(kind, op)
        if op == "put":  # stores in flight write when they run: under the fault now
            self.l3.faulted_in_flight(p for i, pages in self.l3_ops.items()
                                      if i in self.model.ops and self.model.ops[i].kind == "store" for p in pages)
        self.put_faults = self.put_faults or op == "put"
        self.l3.put_faults = self.put_faults
        self.l3.get_tears = self.l3.get_tears or (kind, op) == ("torn", "get")
        self.get_faults = self.get_faults or op == "get"
        self._step(f"storage_fault {kind} {op}", Allowed())

    @precondition(lambda self: self.l3_dir is not None and self.seeded)
    @rule(k=st.integers(0, 7), kind=st.sampled_from(l3_records.FORGERIES), r=st.integers(0, 255))
    def storage_forged_record(self, k, kind, r):
        """The file of one page of a prefix now holds an intact record that is not that page's:
        another key's file copied over it (misplaced), a stale record of another page, page size,
        layout or dtype, a header field off, or the file cut short or run long. A read of it may
        bring nothing, never its data (CheckedFileStorage and D1 judge every read). The page is one of
        a request another instance wrote to L3 (the newest, mostly), which prefetch_seeded reads."""
        tokens = self.seeded[-1 - (k // 4) % len(self.seeded)]
        hashes = page_hashes(ROOT_HASH, tokens, PS)
        st_ = self.storage
        # mostly the first stored page past what L1/L2 hold of these tokens: the next prefetch reads it
        held = len(list(itertools.takewhile(
            lambda e: (p := self.model.pages.get(tuple(tokens[:e]))) is not None and (p.dev or p.host),
            range(PS, len(tokens) + 1, PS))))
        stored = [j for j in range(held, len(hashes))
                  if os.path.exists(os.path.join(st_.directory, f"{hashes[j]:016x}.page"))]
        i = (stored[0] if k % 4 else stored[r % len(stored)]) if stored else r % len(hashes)
        files = sorted(f for f in os.listdir(st_.directory) if f.endswith(".page") and f != f"{hashes[i]:016x}.page")
        donor = None
        if files:
            with open(os.path.join(st_.directory, files[r % len(files)]), "rb") as f:
                donor = f.read()
        wrong = l3_records.invert(l3_records.page_bytes(page_kv(tuple(tokens[: (i + 1) * PS]), geometry(self.cache))))
        record = l3_records.forge(kind, hashes[i], st_.page_shape, st_.dtype, wrong, donor, r)
        with open(os.path.join(st_.directory, f"{hashes[i]:016x}.page"), "wb") as f:
            f.write(record)
        l3_records.stamp(os.path.join(st_.directory, f"{hashes[i]:016x}.page"))
        self.l3.forged(tuple(tokens[: (i + 1) * PS]))
        self.put_faults = True  # L3 now loses pages behind the cache's back
        self._step(f"storage_forged_record {kind} {tokens} page {i} r={r}", Allowed())

    @rule(kind=st.sampled_from(STORAGE_MISUSES), call=st.sampled_from(["get", "put", "start_get", "start_put"]))
    def storage_misuse(self, kind, call):
        """A backend's caller's mistakes (a hash outside [0, 2**64) or not an int, a page of another
        shape or dtype or not a tensor, hashes and pages that do not pair up) must be refused with
        StorageError at the call, changing nothing; the extreme valid hashes must round-trip. On a
        scratch backend of this machine's page shape, so the model's account of L3 is untouched."""
        shape, dtype = self.storage.page_shape, self.storage.dtype
        scratch = MemoryStorage(4, shape, dtype)
        kept = torch.arange(math.prod(shape)).reshape(shape).to(dtype)
        scratch.put(5, kept)
        if kind in ("hash_zero", "hash_top"):
            h = 0 if kind == "hash_zero" else 2**64 - 1
            page = kept + 1
            if call in ("put", "start_put"):
                ok = scratch.put(h, page) if call == "put" else _finish(scratch.start_put([h], [page])) == [True]
            else:
                scratch.put(h, page)
                ok = True
            got = scratch.get(h) if call in ("get", "put") else _finish(scratch.start_get([h]))[0]
            self._expect(ok and got is not None and torch.equal(got, page),
                         f"storage {call} of valid hash {h:#x}: stored={ok}, read back {got}")
            return
        bad_hash = {"hash_negative": -1, "hash_2_64": 2**64, "hash_float": 5.0}.get(kind, 6)
        bad_page = {"page_bigger": lambda: torch.zeros((*shape[:-1], shape[-1] + 1), dtype=dtype),
                    "page_smaller": lambda: torch.zeros((*shape[:-1], shape[-1] - 1), dtype=dtype)
                    if shape[-1] > 1 else torch.zeros((*shape, 2), dtype=dtype),
                    "page_dtype": lambda: torch.zeros(shape, dtype=torch.float32 if dtype != torch.float32
                                                      else torch.float16),
                    "page_list": lambda: kept.tolist()}.get(kind, lambda: kept + 1)()
        if call in ("get", "start_get") and kind.startswith("page") or kind.startswith("pairs") and call != "start_put":
            return
        try:
            if call == "get":
                scratch.get(bad_hash)
            elif call == "start_get":
                scratch.start_get([6, bad_hash])
            elif call == "put":
                scratch.put(bad_hash, bad_page)
            else:
                hashes = {"pairs_more": [6, 7], "pairs_fewer": []}.get(kind, [bad_hash])
                scratch.start_put(hashes, [bad_page])
        except StorageError:
            pass
        else:
            raise Disagreement(f"storage {call} took a caller's mistake ({kind}) without StorageError")
        self._expect(len(scratch) == 1 and 5 in scratch and torch.equal(scratch.get(5), kept),
                     f"storage {call} refusing {kind} changed what the backend holds")

    @rule(kind=st.sampled_from(["capacity_negative", "shape_empty", "shape_zero", "shape_negative", "capacity_zero",
                                "capacity_one", "unbounded_file", "unit_dimension"]))
    def storage_construct(self, kind):
        """Backends as a user builds them: impossible capacities and shapes are refused with
        StorageError; capacity 0 stores nothing, capacity 1 keeps the newest page, a file backend
        without a bound and a page with a dimension of 1 round-trip. Scratch backends only."""
        dtype = self.storage.dtype
        bad = {"capacity_negative": (-1, (2, 4)), "shape_empty": (4, ()), "shape_zero": (4, (0, 4)),
               "shape_negative": (4, (-1, 4))}
        if kind in bad:
            cap, shape = bad[kind]
            try:
                MemoryStorage(cap, shape, dtype)
            except StorageError:
                return
            raise Disagreement(f"a backend of capacity {cap} and page shape {shape} was built")
        shape = (1, 4) if kind == "unit_dimension" else (2, 4)
        pages = [torch.full(shape, float(v), dtype=dtype) for v in (1, 2)]
        if kind == "unbounded_file":
            d = tempfile.mkdtemp(prefix="refcache-l3-unbounded-")
            try:
                st_ = l3_records.CheckedFileStorage(d, shape, dtype, capacity_pages=None, fsync=False)
                stored = [st_.put(h, p) for h, p in enumerate(pages)]
                got, held = [st_.get(h) for h in range(2)], len(st_)
            finally:
                shutil.rmtree(d, ignore_errors=True)
        else:
            st_ = MemoryStorage({"capacity_zero": 0, "capacity_one": 1}.get(kind, 4), shape, dtype)
            stored = [st_.put(h, p) for h, p in enumerate(pages)]
            got, held = [st_.get(h) for h in range(2)], len(st_)
        want_stored, want_got = {"capacity_zero": ([False, False], [None, None]),
                                 "capacity_one": ([True, True], [None, pages[1]])}.get(kind, ([True, True], pages))
        same = all((g is None) == (w is None) and (g is None or torch.equal(g, w)) for g, w in zip(got, want_got, strict=True))
        self._expect(stored == want_stored and same and held == sum(w is not None for w in want_got),
                     f"storage {kind}: stored {stored}, read back {got}, holds {held} pages")

    def _alloc_nothing(self) -> None:
        """alloc_device(0) is a valid request (0 is a whole number of pages): an empty int64 index
        tensor on the pool's index device, nothing evicted or taken."""
        c = self.cache
        idx = c.alloc_device(0)
        self._expect(idx.numel() == 0 and idx.dtype == torch.int64
                     and idx.device == c.device_kv.allocator.index_device, f"alloc_device(0) gave {idx!r}")
        self._step("alloc_device(0)", Allowed(), lambda b, a: same_data(b, a))

    @rule(kind=st.sampled_from(["unreadable", "vanished", "blocked", "fifo", "lru", "write_failed", "write_cancelled"]))
    def storage_trouble(self, kind):
        """A file backend under real OS trouble, and the results a backend owes its callers, on a
        scratch backend: a page file that cannot be read is a StorageIOError, a page file that
        vanished is a miss that drops it, a write blocked by the file system is a StorageIOError
        that leaves no temp file and stores nothing; FIFO eviction ignores reads, LRU eviction counts them; a write that
        failed or was cancelled reports False for every page it did not store."""
        dtype, shape = self.storage.dtype, (2, 4)
        a, b = torch.ones(shape, dtype=dtype), torch.full(shape, 2.0, dtype=dtype)
        d = tempfile.mkdtemp(prefix="refcache-l3-trouble-")
        try:
            policy = "".join(kind if kind == "fifo" else "lru")  # built at run time, as configuration hands it over
            fs = FileStorage(d, shape, dtype, capacity_pages=2, policy=policy, fsync=False)
            fs.put(1, a)
            if kind == "unreadable":  # a symbolic link to itself: open() fails with ELOOP, even for root
                os.unlink(fs.path(1))
                os.symlink(fs.path(1), fs.path(1))
                try:
                    fs.get(1)
                except StorageIOError:
                    return
                raise Disagreement("reading an unreadable page file did not raise StorageIOError")
            if kind == "vanished":
                os.unlink(fs.path(1))
                self._expect(fs.get(1) is None and 1 not in fs, "a page file that vanished is not a miss that drops it")
            elif kind == "blocked":  # a directory where the page's file must go
                os.mkdir(fs.path(2))
                try:
                    fs.put(2, b)
                    raise Disagreement("a write blocked by the file system did not raise StorageIOError")
                except StorageIOError:
                    pass
                self._expect(2 not in fs and not any(n.startswith(".tmp-") for n in os.listdir(d)),
                             "a blocked write stored its page or left its temp file")
            elif kind == "fifo":  # put 1, put 2, read 1, put 3: FIFO drops 1 all the same
                fs.put(2, b)
                fs.get(1)
                fs.put(3, a)
                self._expect(1 not in fs and 2 in fs and 3 in fs, f"FIFO kept {sorted(fs._index)}")
            elif kind == "lru":  # put 1, put 2, read 1, put 3: the read made 2 the least recently used
                fs.put(2, b)
                fs.get(1)
                fs.put(3, a)
                self._expect(1 in fs and 2 not in fs and 3 in fs, f"LRU kept {sorted(fs._index)} after 1 was read")
            else:
                if kind == "write_failed":
                    fs.faults.inject("io_error", "put", h=2)
                else:
                    fs.faults.inject("slow", "put", h=2)
                op = fs.start_put([2], [b])
                if kind == "write_cancelled":
                    op.cancel()
                    fs.faults.release()
                got = _finish(op)
                self._expect(got == [False] and op.hit_length() == 0 and op.failed is (kind == "write_failed")
                             and 2 not in fs, f"a {kind.replace('_', ' ')} reported {got}, failed={op.failed}")
        finally:
            shutil.rmtree(d, ignore_errors=True)

    @rule(tokens=requests, k=st.integers(0, 7))
    def storage_hole(self, tokens, k):
        """Storage lost one page of a prefix (evicted or deleted elsewhere): later pages stay, so a
        prefetch must stop at the hole."""
        hashes = page_hashes(ROOT_HASH, tokens, PS)
        self.storage.delete(hashes[k % len(hashes)])
        self.l3.lost(tuple(tokens[: (k % len(hashes) + 1) * PS]))
        self.put_faults = True  # L3 now loses pages behind the cache's back
        self._step(f"storage_hole {tokens} page {k % len(hashes)}", Allowed())

    @rule(cap=st.sampled_from([None, 0, PS, 2 * PS]), ready=st.booleans(), terminated=st.booleans())
    def peer_view(self, cap, ready, terminated):
        """The simulated peer TP rank's local view changes: its storage holds fewer pages, it is
        still waiting on its own transfers, or it already stopped waiting."""
        self.ranks.view = PeerView(cap, ready, terminated)
        self._step(f"peer_view cap={cap} ready={ready} terminated={terminated}", Allowed())

    @rule(tokens=requests, extra=st.lists(st.sampled_from(PAGES), max_size=2), tail=st.sampled_from([(), (1,)]))
    def prefetch(self, tokens, extra, tail=()):
        """Prefetch the continuation past last_host_node of what storage holds (a request's tokens
        rarely end on a page boundary: the partial page is never fetched)."""
        tokens = tokens + [t for p in extra for t in p]
        c = self.cache
        m = self._match(tokens)
        anchor = node_prefix(m.last_host_node)
        pages = self.model.page_prefixes(tokens)[len(anchor) // PS:]
        lo, hi = (n * PS for n in self.l3.bounds(pages))  # what L3 holds, by the model's own account
        cap = self.ranks.view.hit_cap
        if cap is not None:  # TP: every rank fetches what all can supply
            lo, hi = min(lo, cap), min(hi, cap)
        free = self._free_host()
        want = [self.model.predict_prefetch(n, free, anchor, c.config.prefetch_threshold) for n in (lo, hi)]
        rid = f"req{next(self._rids)}"
        op = c.prefetch(rid, m.last_host_node, tokens[len(anchor):] + list(tail))
        got = len(op.prefetch.key) if op is not None else 0
        state_errs = []
        if op is not None:
            self.prefetching[rid] = (op, anchor, op.prefetch.key, self.time + c.config.prefetch_timeout_steps)
            self.staging[op.id] = got
            self.l3_ops[op.id] = pages[: got // PS]
            self.l3.read(pages[: got // PS])
            state_errs = self._state_fetch_errors(op, tuple(tokens[: len(anchor) + got]))
        held = f"{lo}" if lo == hi else f"{lo} to {hi}"
        self._step(f"prefetch {rid} {tokens[len(anchor):] + list(tail)} after {list(anchor)} -> {got} tokens", self._l2_room(),
                   lambda b, a: state_errs + ([] if want[0] <= got <= want[1] else [
                       f"prefetch fetches {got} tokens; by the model L3 holds {held} tokens past the anchor and "
                       f"L2 has {free} free, so it must fetch {want[0] if want[0] == want[1] else want}"]))

    def _moves_state(self, op) -> bool:
        """Whether `op` has a pool part (a mamba state transfer), by the parts its executor tracks."""
        return any(part.startswith("pool:") for part in self.cache.executor.status(op.id))

    def _host_state_room(self) -> int:
        """L2 mamba slots surely free, by the model's own count: L2's state slots less the states L2
        holds and one for each backup or prefetch in flight (each holds at most one)."""
        m = self.model
        return self.cache.config.host_mamba_slots - sum(g.mamba_host for g in m.pages.values()) - sum(
            o.kind in ("backup", "prefetch") for o in m.ops.values())

    def _state_fetch_errors(self, op, end: tuple) -> list[str]:
        """A mamba prefetch fetches the state of the run's end exactly when L3 may hold it: never one
        L3 never held, and always one L3 is sure to hold while L2 surely has a state slot free."""
        if self.state_storage is None:
            return []
        fetches = self._moves_state(op)
        if fetches:
            self.l3_state_ops[op.id] = end
            self.l3_states.read([end])
        room = self._host_state_room()
        if fetches and end not in self.l3_states.sure | self.l3_states.maybe:
            return [f"the prefetch fetches the state of {end}, which L3 never held"]
        if not fetches and room > 0 and self.l3_states.certain(end):
            return [f"L3 holds the state of {end} and L2 has a state slot free, but the prefetch fetches no state"]
        return []

    def _free_device(self) -> int:
        """Free L1 KV tokens by the model's own count: L1's size less the pages L1 holds, the pages
        load-backs in flight write into, and slots the driver holds across a step (load_back_crowded)."""
        m = self.model
        used = PS * (sum(g.dev for g in m.pages.values()) + sum(len(o.pages) for o in m.ops.values() if o.kind == "load"))
        return DEVICE_TOKENS - used - self.driver_tokens

    def _free_host(self) -> int:
        """Free L2 tokens by the model's own count: L2's size less the pages L2 holds, the pages
        backups in flight write into, and the slots prefetches still own."""
        m = self.model
        used = PS * (sum(g.host for g in m.pages.values()) + sum(len(o.pages) for o in m.ops.values() if o.kind == "backup"))
        return HOST_TOKENS - used - sum(self.staging.values())

    def _l3_tick(self, after) -> None:
        """Operations that ended no longer read or write L3 nor own L2 slots; those in flight may
        touch their pages at any step."""
        self.l3_stale &= set(self.l3_ops) | set(self.l3_state_ops)
        if self.l3_stale:  # (before the ended ones go: a write that landed this step left its file too)
            self.l3.stale_writes([p for i in self.l3_stale for p in self.l3_ops.get(i, ())])
            self.l3_states.stale_writes([self.l3_state_ops[i] for i in self.l3_stale if i in self.l3_state_ops])
        ended = [p for i in [i for i in self.l3_ops if i not in after.ops] for p in self.l3_ops.pop(i)]
        for i in [i for i in self.staging if i not in after.ops]:
            del self.staging[i]
        self.l3.tick(ended + [p for pages in self.l3_ops.values() for p in pages])
        for i in [i for i in self.l3_state_ops if i not in after.ops]:
            self.l3_states.tick([self.l3_state_ops.pop(i)])
        self.l3_states.tick(list(self.l3_state_ops.values()))
        for i, pages in self.l3_ops.items():
            if i in self.staging:
                self.l3.read(pages)
        for i in self.stores:  # a store in flight may still (re)write its pages: a hole or a missed read-back does not outlast it
            if i in self.l3_ops:
                self.l3.write(self.l3_ops[i], landed=False)
            if i in self.l3_state_ops:
                self.l3_states.write([self.l3_state_ops[i]], landed=False)

    @precondition(lambda self: self.seeded)
    @rule(i=st.integers(0, 7), extra=st.lists(st.sampled_from(PAGES), max_size=1))
    def prefetch_seeded(self, i, extra):
        """Prefetch a request another instance wrote to L3, mostly the newest: the way a prefetch
        usually finds pages (and reads what storage faults left in their files)."""
        self.prefetch(self.seeded[-1 - i % len(self.seeded)], extra)

    @precondition(lambda self: self.prefetching)
    @rule(i=st.integers(0, 7))
    def progress(self, i):
        rid = sorted(self.prefetching)[i % len(self.prefetching)]
        op, anchor, key, deadline = self.prefetching[rid]
        status = self.cache.executor.status(op.id)
        arrived = len(list(itertools.takewhile(lambda p: status.get(p) is PartStatus.DONE, op.kv_parts)))
        pool_pending = any(status.get(p) is PartStatus.PENDING for p in op.parts[len(op.kv_parts):])
        settled = not any(s is PartStatus.PENDING for s in status.values())
        n_kv = len(op.kv_parts)  # (read before the call: termination rewrites the op's parts)
        state_done = len(op.parts) > n_kv and status.get(op.parts[n_kv]) is PartStatus.DONE
        policy = self.cache.config.prefetch_policy.value
        done = self.cache.prefetch_progress(rid)
        self.time += 1
        past_deadline = self.time >= deadline
        peer = self.ranks.view
        if peer.terminated:
            want = True  # TP: a rank that stopped waiting pulls every rank along
        elif pool_pending or not peer.ready:
            want = False  # X2: never while a pool transfer is in flight (on any rank)
        else:
            want = policy == "best_effort" or settled or (policy == "timeout" and past_deadline)
        # a rank whose pool transfer is still in flight gives up its part: nothing joins its tree
        got = [anchor + tuple(key[: k * PS]) for k in range(1, arrived + 1)] if done and not pool_pending else []
        if done:
            del self.prefetching[rid]
            self.staging[op.id] = len(key) - PS * len(got)  # what arrived joined the tree (or was there)
            self.time += 0 if pool_pending else 1  # terminating inserts what arrived: that reads the clock
            self.rec.tick()
            self.rec.use(got)  # the fetched pages join the tree: used now

        def check(b, a):
            v = [] if done == want else [f"prefetch_progress {rid} -> {done}, model says {want} (policy {policy}, "
                                         f"pool transfer in flight: {pool_pending}, settled: {settled})"]
            v += [f"{p}: prefetched page arrived but is not in the tree" for p in got
                  if p not in a.pages or not (a.pages[p].dev or a.pages[p].host)]
            if done and not pool_pending and len(op.prefetch.key) != PS * len(got):
                v.append(f"terminated prefetch {rid} reports {len(op.prefetch.key)} tokens fetched; "
                         f"{PS * len(got)} arrived and joined the tree")
            swa = self.model.sidecar == "swa"  # pages the run brings to L2 have their SWA there exactly with SWA
            v += [f"{p}: came to L2 from L3 with swa_host={a.pages[p].swa_host} on a cache "
                  f"{'with' if swa else 'without'} SWA" for p in got
                  if not (p in b.pages and b.pages[p].host) and p in a.pages and a.pages[p].host
                  and a.pages[p].swa_host != swa]
            end = got[-1] if got else None
            if (end and arrived == n_kv and state_done and a.pages.get(end, Page(False, False)).host
                    and not a.pages[end].mamba_host):
                v.append(f"{end}: prefetch fetched every page and the state, but the prefix has no L2 state")
            return v

        # sidecar data joins with the pages: SWA on every page that arrived; a mamba state only at the
        # end, and only when every page and the state itself arrived
        whole = bool(got) and arrived == n_kv and state_done
        side = frozenset(got) if self.model.sidecar == "swa" else frozenset(got[-1:]) if whole else frozenset()
        self._step(f"progress {rid} -> {done}", Allowed(gain_host=frozenset(got), gain_side=side), check)

    @precondition(lambda self: self.prefetching)
    @rule(i=st.integers(0, 7), k=st.integers(0, 3), n=st.integers(1, 5))
    def wait_prefetch(self, i, k, n):
        """A scheduler waiting on a prefetch: `k` of its pages land (its pool transfer not yet), then
        it asks for progress up to `n` times without the rest landing, across the timeout deadline."""
        self._wait(sorted(self.prefetching)[i % len(self.prefetching)], k, n)

    @precondition(lambda self: self.seeded)
    @rule(i=st.integers(0, 7), k=st.integers(0, 3))
    def prefetch_and_wait(self, i, k):
        """A prefetch of what another instance stored, waited on at once: some of its pages land (never
        all), and progress is asked until it ends or the deadline has passed, so every timeout
        deadline is met on the step it falls on."""
        self._prefetch_and_wait(lambda: self.prefetch_seeded(i, []), k, keep_one=True)

    def _prefetch_and_wait(self, start, k: int, keep_one: bool = False) -> None:
        """Run `start` (a prefetch rule), then wait on the prefetch it started, if any: land `k`
        of its pages and ask for progress until it ends or its deadline has passed."""
        before = set(self.prefetching)
        start()
        for rid in set(self.prefetching) - before:
            self._wait(rid, k, self.cache.config.prefetch_timeout_steps + 2, keep_one=keep_one)

    def _wait(self, rid: str, k: int, n: int, keep_one: bool = False) -> None:
        """Land `k` of prefetch `rid`'s pages (its pool transfer not yet; with `keep_one`, never its
        last page), then ask for progress up to `n` times."""
        op, ex = self.prefetching[rid][0], self.cache.executor
        pending = [p for o, p in ex.pending_parts() if o == op.id and not p.startswith("pool:")]
        parts = pending[: min(k, len(pending) - 1) if keep_one else k]
        self.settled += [(op.id, part) for part in parts]
        if parts:
            landed = self._complete([(op.id, p) for p in parts])
            self._step(f"complete {len(parts)} pages of prefetch {rid}", Allowed(), lambda b, a: landed)
        for _ in range(n):
            if rid not in self.prefetching:
                break
            self.progress(sorted(self.prefetching).index(rid))

    def _complete(self, parts) -> list[str]:
        """Complete each (op id, part) in `parts`; what `_transfers_land` says of them."""
        for op_id, part in parts:
            self.cache.executor.complete(op_id, part)
        return self._transfers_land(parts)

    def _transfers_land(self, parts) -> list[str]:
        """Required effect of the driver completing an L3 transfer's page: with no read fault ever
        armed, a page of a prefetch still waited on that the model is sure L3 holds must arrive, and so
        must its state; with no write fault or hole ever, a store's page must be written (its part
        DONE, not FAILED)."""
        ex, waited = self.cache.executor, {v[0].id for v in self.prefetching.values()}
        v = []
        for op_id, part in parts:
            a, pages = self.model.ops.get(op_id), self.l3_ops.get(op_id)
            if a is None or pages is None or ex.status(op_id).get(part) is not PartStatus.FAILED:
                continue
            if part.startswith("pool:") and a.kind == "prefetch" and op_id in waited and \
                    self.l3_states.certain(self.l3_state_ops.get(op_id, ())):
                v.append(f"prefetch op {op_id} {part}: L3 holds the state of {self.l3_state_ops[op_id]} by the model, "
                         "but its read failed")
                continue
            if not part.startswith("page:"):
                continue
            p = pages[int(part.removeprefix("page:"))] if a.kind == "prefetch" else None
            if a.kind == "prefetch" and op_id in waited and not self.get_faults and self.l3.certain(p):
                v.append(f"prefetch op {op_id} {part}: L3 holds {p} by the model and no read fault was armed, "
                         "but its read failed")
            elif a.kind == "store" and not self.put_faults:
                v.append(f"store op {op_id} {part}: no write fault was armed, but the write failed")
        return v

    @precondition(lambda self: self.prefetching)
    @rule(i=st.integers(0, 7))
    def abort(self, i):
        rid = sorted(self.prefetching)[i % len(self.prefetching)]
        del self.prefetching[rid]
        self.cache.abort_prefetch(rid)
        self._step(f"abort {rid}", Allowed(ops_finish=True))

    @precondition(lambda self: self.cache.executor.pending_parts())
    @rule(i=st.integers(0, 15), fail=st.booleans())
    def finish_part(self, i, fail):
        ex = self.cache.executor
        parts = ex.pending_parts()
        op_id, part = parts[i % len(parts)]
        (ex.fail if fail else ex.complete)(op_id, part)
        self.settled.append((op_id, part))
        if fail:
            self.failed_ops.add(op_id)
        landed = [] if fail else self._transfers_land([(op_id, part)])
        self._step(f"{'fail' if fail else 'complete'} op {op_id} {part}", Allowed(), lambda b, a: landed)

    @precondition(lambda self: self.settled)
    @rule(i=st.integers(0, 7), how=st.sampled_from(["complete", "fail", "unknown_part", "unknown_op"]))
    def finish_settled(self, i, how):
        """The executor's driver contract: completing or failing a part that is no longer pending, a
        part the op does not have, or an op that does not exist raises KeyError and changes nothing."""
        ex = self.cache.executor
        op_id, part = self.settled[i % len(self.settled)]
        if how == "unknown_op":
            op_id = 10**9
        elif how == "unknown_part":
            part = "no-such-part"
        elif not ex.status(op_id):  # forgotten since: nothing to ask about
            return
        before = ex.status(op_id)
        try:
            (ex.fail if how == "fail" else ex.complete)(op_id, part)
        except KeyError:
            self._expect(ex.status(op_id) == before, f"a refused {how} of op {op_id} {part} changed its parts")
            return self._step(f"{how} settled op {op_id} {part} -> KeyError", Allowed(), lambda b, a: same_data(b, a))
        raise Disagreement(f"executor took {how} of op {op_id} part {part}, which is not pending")

    @precondition(lambda self: self.cache.executor.pending_parts())
    @rule(i=st.integers(0, 7))
    def kv_first(self, i):
        """The common race: an operation's KV (every page) lands while its pool transfers are still in flight."""
        ex = self.cache.executor
        ids = sorted({op_id for op_id, _ in ex.pending_parts()})
        op_id = ids[i % len(ids)]
        landed = self._complete([(o, part) for o, part in ex.pending_parts() if o == op_id and not part.startswith("pool:")])
        self._step(f"complete op {op_id} KV parts", Allowed(), lambda b, a: landed)

    @precondition(lambda self: self.cache.executor.pending_parts())
    @rule(i=st.integers(0, 7))
    def finish_op(self, i):
        ex = self.cache.executor
        ids = sorted({op_id for op_id, _ in ex.pending_parts()})
        op_id = ids[i % len(ids)]
        done = [(o, p) for o, p in ex.pending_parts() if o == op_id]
        ex.complete(op_id)
        self._expect(all(o != op_id for o, _ in ex.pending_parts()), f"complete(op {op_id}) left parts pending")
        self.settled += [(op_id, p) for p in ex.status(op_id)]
        landed = self._transfers_land(done)
        self._step(f"complete op {op_id}", Allowed(), lambda b, a: landed)

    @precondition(lambda self: self.cache.ops)
    @rule()
    def settle(self):
        """Complete every pending part, then poll (the common case of a quiet moment)."""
        landed = self._complete(self.cache.executor.pending_parts())
        self._step("complete all", Allowed(), lambda b, a: landed)
        self.poll()

    @precondition(lambda self: self.cache.ops)
    @rule()
    def poll(self):
        before = self.model
        done = self.cache.poll()
        gain_dev, gain_host, acked = set(), set(), []
        stored = [self.stores.pop(op.id) for op in done if op.id in self.stores and op.state is OpState.DONE]
        for op in done:
            self.stores.pop(op.id, None)
            a = before.ops.get(op.id)
            if a is None or op.state is not OpState.DONE or a.kind not in ("load", "backup"):
                continue
            acked.append(a)
            (gain_dev if a.kind == "load" else gain_host).update(a.pages)
        # device data goes only when a write-back backup lands (its node is demoted) or through a
        # sidecar tombstone's cascade; L2 data only through such a cascade
        side_or_wb = self.model.sidecar is not None or self._write_back
        ends = gain_dev | gain_host | {a.anchor for a in acked if a.anchor}
        side = {p[:i] for p in ends for i in range(PS, len(p) + 1, PS)}  # mamba at the end, SWA in the window

        def check(b, a):
            v = []
            for op in acked:
                tier = "dev" if op.kind == "load" else "host"
                for p in op.pages:
                    if p in a.pages and not getattr(a.pages[p], tier):  # (a cascade may have deleted it)
                        v.append(f"op {op.id} ({op.kind}) acknowledged but {p} lacks its {tier} data")
            v += effects.ack_errors(a, [op.anchor for op in acked if op.kind == "load" and op.anchor])
            ended = set(b.ops) - set(a.ops)
            if {op.id for op in done} != ended:
                v.append(f"poll returned ops {sorted(op.id for op in done)}, but ops {sorted(ended)} ended")
            for s in stored:
                v += self._stored_errors(*s)
            for op in done:  # liveness: a transfer nothing failed must succeed
                kind = before.ops[op.id].kind if op.id in before.ops else None
                if (kind in ("backup", "load", "store") and op.state is not OpState.DONE
                        and op.id not in self.failed_ops and not (kind == "store" and self.l3.put_faults)):
                    v.append(f"op {op.id} ({kind}) ended {op.state.value} although no part of it was failed "
                             f"{'and no L3 write fault was armed' if kind == 'store' else ''}".rstrip())
                if kind in ("backup", "load", "store") and op.state is OpState.DONE and op.id in self.failed_ops:
                    v.append(f"op {op.id} ({kind}) ended done although the driver failed a part of it")
            if self._write_back and len(acked) == 1 and acked[0].kind == "backup":
                v += self._demote_errors(acked[0], b, a)
            return v + effects.settled_errors(self.after_snap.ops)

        self._step(f"poll -> {[op.id for op in done]}",
                   Allowed(gain_dev=frozenset(gain_dev), gain_host=frozenset(gain_host), gain_side=frozenset(side),
                           evict_dev=side_or_wb, evict_host=self.model.sidecar is not None, ops_finish=True), check)

    def _demote_errors(self, op, b, a) -> list[str]:
        """Write-back: a backup an eviction started demotes its node when it lands (the node's L1
        copy goes) if the node is then an unlocked device leaf; a backup the caller asked for does
        not."""
        end = max(op.pages, key=len)
        if end not in b.pages or not b.pages[end].dev:
            return []
        dev_kids = [c for m in (b, a) if end in m.pages for c in m.children(end) if m.pages[c].dev]
        lock = b.pages[end].lock - (op.locked == end)
        still = end in a.pages and a.pages[end].dev
        if op.id in self.demoting:
            return [f"{end}: the eviction's backup (op {op.id}) landed on an unlocked device leaf that kept its "
                    "L1 copy"] if still and not dev_kids and lock == 0 else []
        if b.sidecar is None and not still:
            return [f"{end}: a backup the caller asked for (op {op.id}) dropped its node's L1 copy"]
        return []

    # ---------------------------------------------------------------------- invariants
    @invariant()
    def invariants_hold(self):
        v = check_all(self.snap)
        if v:
            raise Disagreement("invariants broken:\n  " + "\n  ".join(map(str, v)))

    @invariant()
    def match_ends_agree(self):
        """The cache's public judgement of each node as a match end (device, or any tier) and as a
        tombstone is the model's, at every node end (sidecar data is uniform within a node)."""
        c, m = self.cache, self.model
        for tiers in (fresh("device"), fresh("any")):  # the empty prefix: what a miss matches
            if c.valid_end(c.root, tiers) != m.valid_end((), tiers):
                raise Disagreement(f"valid_end(root, {tiers}) = {c.valid_end(c.root, tiers)}, the model says "
                                   f"{m.valid_end((), tiers)}")
        for n in c.nodes():
            p = node_prefix(n)
            if p not in m.pages:
                continue
            for tiers in (fresh("device"), fresh("any")):
                if c.valid_end(n, tiers) != m.valid_end(p, tiers):
                    raise Disagreement(f"valid_end({p}, {tiers}) = {c.valid_end(n, tiers)}, the model says "
                                       f"{m.valid_end(p, tiers)}")
            tomb = effects.tombstone(m, p)
            if c.is_tombstone(n) != tomb:
                raise Disagreement(f"is_tombstone({p}) = {c.is_tombstone(n)}, the model says {tomb}")

    @invariant()
    def model_agrees(self):
        """The model's own counts: locks as this driver holds them, references as ops hold them.
        (The step-by-step agreement with the model is checked in `_step`.) A node this driver holds a
        lock on stays in the tree, whatever data it keeps (T2)."""
        attached = {id(n) for n in self.cache.nodes()}
        gone = [node_prefix(n) for n in self.held if id(n) not in attached]
        if gone:
            raise Disagreement(f"model: nodes this driver holds a lock on left the tree: {gone}")
        errs = self.model.wellformed(Counter(node_prefix(n) for n in self.held))
        if errs:
            raise Disagreement("model: " + "; ".join(errs))

    def teardown(self):
        """Liveness: release every lock, finish every part, poll: nothing may stay in flight."""
        try:
            for n in self.held:
                self.cache.unlock(n)
            self.cache.executor.complete_all()
            self.ranks.view = PeerView()  # the peer's transfers land too
            self.storage.faults.clear()
            for rid in self.prefetching:  # X3: once everything arrived, every policy lets the request go
                self._expect(self.cache.prefetch_progress(rid), f"prefetch {rid} never terminates")
            self.prefetching = {}
            self.cache.poll()
            self._expect(not self.cache.ops, f"operations still in flight after completing all: {list(self.cache.ops)}")
            snap = self.cache.snapshot()
            v = [*map(str, check_all(snap)), *data_errors(self.cache, snap)]
            self._expect(not v, "invariants broken at teardown: " + "; ".join(v))
        finally:
            self.held = []
            if self.l3_dir is not None:
                shutil.rmtree(self.l3_dir, ignore_errors=True)


# what a refusal must say, where its cause is unambiguous (a caller reads it to fix the call)
MISUSE_SAYS = {"unaligned_slots": "not one aligned page", "scrambled_page": "not one aligned page",
               "free_unaligned": "not one aligned page", "stuttered_page": "not one aligned page",
               "gapped_page": "not one aligned page", "slots_past_pool": "out of range",
               "negative_slots": "out of range", "free_past_pool": "out of range", "page_below_zero": "out of range",
               "giant_slots": "out of range", "tail_past_pool": "out of range", "tail_unaligned": "not one aligned page"}


def misuse_says(kind: str, bent: torch.Tensor | None) -> list[str]:
    """What the refusal of a misuse must say: why, and which slots. Slots that are not one aligned
    page are named by their first such page; slots past the pool by the first slot outside it, with
    the pool's range (the model finds both in the slots it bent, not in the cache's answer)."""
    says = MISUSE_SAYS.get(kind)
    if says is None or bent is None or bent.device.type == "meta":
        return [says] if says else []
    rows = bent.view(-1, PS).tolist()
    if says == "not one aligned page":
        return [says, str(next(r for r in rows if r[0] % PS or r != list(range(r[0], r[0] + PS))))]
    return [says, f"slot {next(x for x in bent.tolist() if not 0 <= x < DEVICE_TOKENS)} ", f"[0, {DEVICE_TOKENS})"]


def _finish(op) -> list:
    """Drive a storage op to its end (no fault is armed on a scratch backend) and return its result."""
    while not op.poll():
        pass
    return op.result()


class _NothingToMisuse(Exception):
    pass


def _raise():
    raise _NothingToMisuse


def _machine(comp: str, policy: str, prefetch: str, storage: str) -> type[CacheMachine]:
    camel = "".join(w.capitalize() for w in f"{comp}_{policy}_{prefetch}".split("_"))
    return type(f"{camel}Machine", (CacheMachine,),
                {"CONFIG": {**COMPONENTS[comp], "write_policy": policy, "prefetch_policy": prefetch},
                 "STORAGE": storage})


# A Latin square: machine (component i, write policy j) prefetches under policy (i + j) % 3, so each
# pair of component, write policy and prefetch policy is exercised by some machine; three machines,
# one per component and per write policy, keep L3 in files with little room (the others in memory)
# and skip prefetches shorter than two pages.
MACHINES: dict[str, type[CacheMachine]] = {
    f"{c}/{p}": _machine(c, p, PREFETCH_POLICIES[(i + j) % 3], "file" if (i + 2 * j) % 3 == 1 else "memory")
    for i, c in enumerate(COMPONENTS) for j, p in enumerate(POLICIES)}

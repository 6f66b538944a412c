"""Seeded bugs (DESIGN §4), applied from outside refcache/ as patches, for the suite to find.

Each `SeededBug` names its bug class (1-5 of DESIGN §4; 0 for the further bugs such caches have
had), what it breaks, a short story (symptom, root cause, the check that catches it), the
upstream report it is modelled on, the machines expected to find it, and a `patch()` context
manager that installs it (unittest.mock.patch.object on a refcache class or module attribute).
A new bug is one more entry in `SEEDED_BUGS`; the tests and `refcache verify` pick it up.
"""

from __future__ import annotations

import contextlib
import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from unittest import mock

import refcache.bookkeeping as bookkeeping_mod
import refcache.cache as cache_mod
import refcache.pages as pages_mod
import refcache.prefetch as prefetch_mod
import refcache.storage as storage_mod
from refcache.cache import HiCache
from refcache.config import PrefetchPolicy, WritePolicy
from refcache.errors import PoolExhaustedError
from refcache.pages import _MASK63, ROOT_HASH, chain_hash, page_align
from refcache.prefetch import PrefetchMixin
from refcache.tp import agree_termination
from refcache.transfer import COPY_INDEX_DTYPE, OpState, PartStatus

from . import geometries


@dataclass(frozen=True)
class SeededBug:
    bug_class: int
    description: str
    patch: Callable[[], contextlib.AbstractContextManager]
    machines: tuple[str, ...]  # keys of stateful_tests.machines.MACHINES that should find it
    story: str = ""  # symptom, root cause, and which check catches it
    upstream: tuple[str, ...] = ()  # the upstream issues / PRs it is modelled on

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch", _forgetting(self.patch))


def _forgetting(install: Callable[[], contextlib.AbstractContextManager]
                ) -> Callable[[], contextlib.AbstractContextManager]:
    """`install`, made to drop what this process memoized of the cache's behaviour (the other
    geometries' round trips) on entry and on exit: a result the patched code produced must not
    stand for the clean code's afterwards (a campaign worker hunts a bug, then explores clean)."""

    @contextlib.contextmanager
    def patched():
        geometries.forget()
        try:
            with install():
                yield
        finally:
            geometries.forget()

    return patched


@contextlib.contextmanager
def _patches(*targets: tuple[object, str, object]):
    """Several mock.patch.object patches as one context manager (applied on entry)."""
    with contextlib.ExitStack() as stack:
        for owner, name, new in targets:
            stack.enter_context(mock.patch.object(owner, name, new))
        yield


# --------------------------------------------------------------------------- class 1 (X2)
def _progress_ignoring_pool(self, request_id):
    """prefetch_progress that lets the policy alone decide: a prefetch whose pages have arrived
    is terminated while its mamba pool transfer is still in flight."""
    op = self._prefetches[request_id]
    now = self._tick()
    st = self.executor.status(op.id)
    settled = all(st.get(p) is not PartStatus.PENDING for p in op.kv_parts)  # the bug: pages only
    policy = self.config.prefetch_policy
    can = (policy is PrefetchPolicy.BEST_EFFORT or settled
           or (policy is PrefetchPolicy.TIMEOUT and now >= op.prefetch.deadline))
    if not agree_termination(self.ranks, can, op.prefetch.aborted):
        return False
    self._terminate_prefetch(op, st)
    return True


def prefetch_terminates_with_pool_in_flight():
    return mock.patch.object(PrefetchMixin, "prefetch_progress", _progress_ignoring_pool)


# ------------------------------------------------------------------ class 2 (functional loss)
def prefetch_length_gives_up(requested: int, host_available: int, page_size: int, threshold: int) -> int:
    """The length rule that abandons the whole prefetch when the full request does not fit in L2,
    instead of truncating to the page-aligned size that fits.

    pre: page_size > 0
    pre: threshold >= 0
    """
    n = page_align(requested, page_size)
    return n if n >= max(threshold, 1) and requested <= host_available else 0


def prefetch_gives_up_when_l2_is_short():
    return mock.patch.object(prefetch_mod, "prefetch_length", prefetch_length_gives_up)


# ----------------------------------------------------------------------- class 3 (X1, R1)
def _resolve_in_place(transfers, device):
    """resolve() that converts the shared records in place and returns them (not fresh ones)."""
    for t in transfers:
        if t.host_indices is not None:
            t.host_indices = t.host_indices.to(device=device, dtype=COPY_INDEX_DTYPE)
        if t.device_indices is not None:
            t.device_indices = t.device_indices.to(device=device, dtype=COPY_INDEX_DTYPE)
    return transfers


def resolve_mutates_record():
    return mock.patch.object(cache_mod, "resolve", _resolve_in_place)


# ------------------------------------------------------------------------- class 4 (T1, T6)
_match_prefix = HiCache.match_prefix


def _match_anchor_last_host(self, tokens):
    m = _match_prefix(self, tokens)
    return m._replace(best_match_node=m.last_host_node)


def load_back_at_last_host():
    return mock.patch.object(HiCache, "match_prefix", _match_anchor_last_host)


def _lock_no_skip(self, node):
    """lock() that locks `node` itself even when its bottom segment is only on the host."""
    self._check_node(node)
    if node.parent is None:
        return node
    self._locks[node.id] += 1
    if node.mamba_value is not None:
        self._locked_with_state.add(node.id)
    self._add_lock(node, +1)
    return node


def lock_host_only_bottom():
    return mock.patch.object(HiCache, "lock", _lock_no_skip)


# ---------------------------------------------------------------------------- class 5 (T3)
def _cascade_ignoring_host_ref(self, node):
    if (node.parent is not None and not node.children and node.lock_ref == 0
            and node.id not in self._busy and self.is_tombstone(node)):
        node.host_ref = 0  # the bug: whatever still reads its L2 data, delete it
        self._delete(node)


def cascade_ignores_host_ref():
    return mock.patch.object(HiCache, "_cascade", _cascade_ignoring_host_ref)


# ------------------------------------------------------------- further bugs (DESIGN §4 list)
_abort_prefetch = PrefetchMixin.abort_prefetch


def _abort_forgetting_anchor(self, request_id):
    op = self._prefetches.get(request_id)
    if op is not None:
        op.host_refed = None  # the bug: the anchor's host reference is never given back
    return _abort_prefetch(self, request_id)


_split = HiCache._split


def _split_keeping_whole_host(self, child, at):
    host = child.host_value
    upper = _split(self, child, at)
    if host is not None:
        child.host_value = host  # the bug: the tail keeps every L2 slot, the head's slice too
    return upper


def _drop_device_without_bookkeeping(self, node):
    self.device_kv.allocator.free(node.value)
    node.value = None
    self._drop_swa(node)
    if self.device_state is not None:
        self._drop_mamba(node)
    # the bug: no self.book.touch(node): the eviction sets and sizes keep the old picture


def _contribution_ignoring_locks(node):
    c = bookkeeping_mod.Counter()
    for (comp, tier, state), n in _contribution(node).items():
        c[comp, tier, "evictable" if tier == "device" else state] += n  # the bug: a lock never protects
    return c


_contribution = bookkeeping_mod.contribution


def _page_hashes_ignoring_parent(parent_hash, tokens, page_size):
    return [chain_hash(ROOT_HASH, tokens[i:i + page_size]) for i in range(0, len(tokens), page_size)]


def _copy_kv_swapping_pages(src, src_slots, dst, dst_slots):
    ps = src.page_size
    if src_slots.numel() >= 2 * ps:  # the bug: the gather walks the pages in the wrong order
        src_slots = src_slots.view(-1, ps).flip(0).reshape(-1)
    return _copy_kv(src, src_slots, dst, dst_slots)


_copy_kv = cache_mod.copy_kv


def _host_evictable_ignoring_refs(node):
    return (node.parent is not None and node.host_value is not None and node.value is None
            and not node.children)  # the bug: a load-back or prefetch may still read it


def _cascade_ignoring_locks(self, node):
    if (node.parent is not None and not node.children and node.host_ref == 0
            and node.id not in self._busy and self.is_tombstone(node)):
        node.lock_ref = 0  # the bug: the lock of an in-flight request does not stop the deletion
        self._delete(node)


_release = HiCache._release


def _release_keeping_lock(self, op, state):
    op.locked = None  # the bug: a failed transfer frees its slots but keeps its lock
    return _release(self, op, state)


def _drain_without_waiting(self, op):
    pf = op.prefetch
    ps = self.page_size
    self._free_host_slots(pf.host[pf.handed * ps:])  # the bug: frees slots reads may still land in
    pf.host = pf.host[: pf.handed * ps]
    for t in op.pool_transfers:
        self.host_state.allocator.free(t.host_indices)
    op.pool_transfers, op.fingerprints = [], []
    self._finish(op, OpState.ABORTED if pf.aborted else OpState.DONE)
    return True


def _drop_mamba_leaking(self, node):
    node.mamba_value = None  # the bug: the state slot is never returned to the pool


@contextlib.contextmanager
def _replace_code(fn, new):
    """Give `fn` the body of `new` (every caller, including names imported elsewhere, sees it),
    as an edit of `fn`'s source would; restored on exit."""
    old, fn.__code__ = fn.__code__, new.__code__
    try:
        yield
    finally:
        fn.__code__ = old


def _chain_hash_first_token(parent_hash, page_tokens):
    """chain_hash that hashes only the first token of each page (still chained): pages that differ
    after their first token collide. Installed as chain_hash's code, like an edit of its source."""
    payload = struct.pack("<qq", parent_hash, page_tokens[0])
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little") & _MASK63


def _match_forgetting_recency(self, tokens):
    """match_prefix that no longer refreshes the recency of the path it matched."""
    stamps = {n.id: n.last_access for n in self._nodes.values()}
    res = _match_prefix(self, tokens)
    for n in self._nodes.values():
        if n.id in stamps:  # (a node split off by this match keeps the stamp it copied)
            n.last_access = stamps[n.id]
    return res


_match_prefix = HiCache.match_prefix


def _make_room_refusing_last(self, n_tokens, swa_tokens, evict):
    """Room-making that refuses when it would have to evict every unlocked token (>= for >)."""
    short = n_tokens - self.device_kv.allocator.available()
    if evict and 0 < short and short >= self.book.size("full", "device", "evictable"):
        raise PoolExhaustedError(f"L1: {n_tokens} tokens needed")
    return _make_room_device(self, n_tokens, swa_tokens, evict)


_make_room_device = HiCache._make_room_device


def _try_backup_only_changed(self, node, demote=False):
    """Write-through that backs up only the nodes an insert created or re-filled: a node it merely
    passed, whose earlier backup failed, is never retried."""
    if not demote and self.config.write_policy is WritePolicy.WRITE_THROUGH and node.hit_count:
        return False
    return _try_backup(self, node, demote)


_try_backup = HiCache._try_backup


def _exists_counting_every_hit(self, hashes):
    return sum(1 for h in hashes if h in self._index)


_ALL = tuple(f"{c}/{p}" for c in ("full", "mamba", "swa")
             for p in ("write_through", "write_through_selective", "write_back"))
_SIDECAR = tuple(m for m in _ALL if not m.startswith("full"))

SEEDED_BUGS: dict[str, SeededBug] = {
    # ---- the five classes of DESIGN §4 (the seeds)
    "class1_terminate_with_pool_in_flight": SeededBug(
        1, "prefetch terminated once its pages arrived while its mamba pool transfer is in flight (X2, X3)",
        prefetch_terminates_with_pool_in_flight, ("mamba/write_back", "mamba/write_through"),
        "A hybrid model's prefetch reads KV pages and the prefix's recurrent state from L3. The progress check looks "
        "only at the pages: once they are in, the request goes ahead while the state copy still runs, and the "
        "bookkeeping of the finished prefetch no longer waits for it; upstream the request hung. Caught by X2 and by "
        "the machines' progress rule, which predicts that no policy may stop while a pool transfer is in flight.",
        ("sgl-project/sglang#27366",)),
    "class2_prefetch_gives_up_when_l2_is_short": SeededBug(
        2, "a prefetch whose run does not fit in L2 is abandoned instead of truncated to the page-aligned fit",
        prefetch_gives_up_when_l2_is_short, ("full/write_through", "mamba/write_through"),
        "When L2 cannot hold the whole run storage has, the length rule returns 0 instead of the page-aligned part "
        "that fits, so every partial L3 hit under memory pressure is lost. Nothing breaks structurally; the "
        "machines' prefetch rule compares the fetched length with the model's prediction, and CrossHair finds the "
        "counterexample to the length contract.", ("sgl-project/sglang#26945",)),
    "class3_resolve_mutates_record": SeededBug(
        3, "resolve converts the pool-transfer record a node holds in place (X1; later L2 free gets device indices)",
        resolve_mutates_record, ("mamba/write_through", "mamba/write_back"),
        "Preparing a copy converts the index tensors of the shared pool-transfer record in place, so the record a "
        "tree node keeps for its L2 mamba state now holds indices in the copy's form; a later L2 free gets the "
        "wrong object. Caught by X1 (records referenced by nodes are never mutated).", ("sgl-project/sglang#23427",)),
    "class4_load_back_at_last_host": SeededBug(
        4, "load-back anchored at last_host_node instead of best_match_node (T6)",
        load_back_at_last_host, ("mamba/write_through",),
        "The load-back starts from the deepest node with any host data instead of the deepest node every component "
        "accepts, so it walks into nodes whose mamba state (or SWA window) is gone. The machines' match rule "
        "compares best_match_node with the model; T6 catches a load-back that starts from an invalid anchor.",
        ("sgl-project/sglang#25088",)),
    "class4_lock_host_only_bottom": SeededBug(
        4, "lock() locks a host-only bottom segment instead of its deepest device ancestor (T1/T2)",
        lock_host_only_bottom, ("full/write_through", "mamba/write_through"),
        "Locking a match whose last segment was evicted to L2 locks that host-only node: the lock protects nothing "
        "on the device and the counts no longer say what is pinned. Caught by T2 (locked implies on device) and by "
        "the machines' lock-target prediction.", ("sgl-project/sglang#25088",)),
    "class5_cascade_ignores_host_ref": SeededBug(
        5, "tombstone cascade deletes a node an in-flight prefetch or load still host-references (T3)",
        cascade_ignores_host_ref, ("mamba/write_back", "mamba/write_through"),
        "Deleting a childless tombstone cascades upward and checks device locks but not host references, so it "
        "removes the anchor a prefetch or load-back still uses; upstream the next deletion failed with 'parent does "
        "not have child key'. Caught by T3 (host-referenced nodes stay attached).", ("sgl-project/sglang#23696",)),
    # ---- further bugs such caches have had (DESIGN §4's list)
    "abort_leaks_prefetch_anchor": SeededBug(
        0, "aborting a prefetch never returns the anchor's host reference",
        lambda: mock.patch.object(PrefetchMixin, "abort_prefetch", _abort_forgetting_anchor), ("full/write_through",),
        "A request aborted while its prefetch runs: cleanup forgets the reference the prefetch holds on its anchor, "
        "so the anchor's path can never be evicted from L2 and the pool shrinks with every abort. Caught by the "
        "model's reference counts (host_ref equals the references in-flight work holds) and T3.",
        ("sgl-project/sglang#9874", "sgl-project/sglang#40334")),
    "split_keeps_whole_host_value": SeededBug(
        0, "a node split leaves the tail holding the whole L2 range, the head's slots included",
        lambda: mock.patch.object(HiCache, "_split", _split_keeping_whole_host), ("full/write_through",),
        "Splitting a node that has an L2 copy hands the head its slice but leaves the tail the full index range, so "
        "two nodes own the same L2 slots and evicting both frees them twice. Caught by R1 (no shared slot) and S1.",
        ("sgl-project/sglang#38480", "sgl-project/sglang#38941")),
    "demotion_skips_bookkeeping": SeededBug(
        0, "demoting a node to L2 does not update the eviction sets or sizes",
        lambda: mock.patch.object(HiCache, "_drop_device", _drop_device_without_bookkeeping), ("full/write_through",),
        "After a device leaf is demoted to its L2 copy the LRU/leaf sets still list it as a device leaf and the "
        "sizes still count its device tokens, so the next eviction picks a stale entry. Caught by R3 (sets hold "
        "exactly the evictable nodes) and R2.", ("sgl-project/sglang#23537", "sgl-project/sglang#22963")),
    "evictable_size_ignores_locks": SeededBug(
        0, "locked device tokens are still counted as evictable",
        lambda: mock.patch.object(bookkeeping_mod, "contribution", _contribution_ignoring_locks), ("full/write_through",),
        "The size accounting forgets that a lock moves a node's tokens from evictable to protected, so the scheduler "
        "believes it can free memory that in-flight requests hold. Caught by R2 (sizes equal the sums they "
        "summarize).", ("sgl-project/sglang#10637", "sgl-project/sglang#35270")),
    "chain_hash_ignores_parent": SeededBug(
        0, "prefetch keys each page by its own tokens only, not chained from its parent",
        lambda: mock.patch.object(prefetch_mod, "page_hashes", _page_hashes_ignoring_parent), ("full/write_through",),
        "The L3 key of a page is hashed from the page's tokens alone, so equal pages under different prefixes share "
        "a key: prefetch asks storage for the wrong pages (a miss, or another prefix's KV). Caught by the machines' "
        "prefetch prediction and by S1 (page hashes chain from the parent's).", ("sgl-project/sglang#13488",)),
    "gather_swaps_pages": SeededBug(
        0, "the paged copy gathers a multi-page run in reverse page order",
        lambda: mock.patch.object(cache_mod, "copy_kv", _copy_kv_swapping_pages), ("full/write_through",),
        "A batched gather of several pages visits them in the wrong order, so each page of a backup or load-back "
        "lands in its neighbour's slot; nothing crashes and the model serves wrong KV. Caught by D1 (every page "
        "holds the bytes written for its prefix).", ("vllm-project/vllm#28951", "LMCache/LMCache#2403")),
    "evict_host_ignores_host_ref": SeededBug(
        0, "L2 eviction frees a host-only leaf a load-back or prefetch still references",
        lambda: _patches((bookkeeping_mod, "host_evictable", _host_evictable_ignoring_refs)), ("full/write_through",),
        "The L2 eviction candidates do not exclude nodes with a host reference, so the pages a load-back is still "
        "reading from can be freed and reused. Caught by R3 (candidate sets exact) and T3.",
        ("sgl-project/sglang#27631", "sgl-project/sglang#31427")),
    "cascade_through_locked_node": SeededBug(
        0, "tombstone cascade deletes a node an in-flight request holds a lock on",
        lambda: mock.patch.object(HiCache, "_cascade", _cascade_ignoring_locks), ("mamba/write_back", "mamba/write_through"),
        "The upward cascade that removes childless tombstones does not look at lock counts, so it deletes a node "
        "whose device KV a running request has locked. Caught by T2 and by the model's lock counts.",
        ("sgl-project/sglang#21379",)),
    "failed_load_keeps_lock": SeededBug(
        0, "a failed load-back frees its slots but never releases its lock",
        lambda: mock.patch.object(HiCache, "_release", _release_keeping_lock), ("full/write_through",),
        "When a transfer fails, the cleanup returns the destination slots but not the lock the operation took, so "
        "the path stays pinned forever. Caught by the model's lock counts (each lock count equals the locks held at "
        "or below).", ("LMCache/LMCache#4133",)),
    "drain_frees_slots_in_flight": SeededBug(
        0, "a terminated or aborted prefetch frees its leftover L2 slots while reads into them are in flight",
        lambda: mock.patch.object(PrefetchMixin, "_drain", _drain_without_waiting), ("full/write_through",),
        "Cleaning up after a prefetch frees the slots of pages that have not arrived yet; when their reads land they "
        "overwrite whatever now owns those slots. Caught by X2 (an operation finishes only when every part has).",
        ("sgl-project/sglang#13483", "sgl-project/sglang#9927")),
    "mamba_eviction_leaks_slot": SeededBug(
        0, "evicting a mamba state forgets to return its slot",
        lambda: mock.patch.object(HiCache, "_drop_mamba", _drop_mamba_leaking), ("mamba/write_through",),
        "Dropping a node's recurrent state clears the reference but never frees the slot, so the state pool leaks "
        "one slot per eviction until allocation fails. Caught by R1 (free + owned = capacity).",
        ("sgl-project/sglang#16067",)),
    "weak_hash_collides": SeededBug(
        0, "the chain hash reads only the first token of each page",
        lambda: _replace_code(pages_mod.chain_hash, _chain_hash_first_token),
        ("full/write_through",),
        "A weakened page hash (here: only the page's first token is hashed, still chained from the parent) makes "
        "pages that differ later in the page share an L3 key, so a prefetch brings another prefix's KV. The cache "
        "agrees with itself (its hashes chain, S1 holds); caught only because the oracle derives every page's "
        "bytes from the token prefix (D1), not from the cache's hash."),
    "match_forgets_recency": SeededBug(
        0, "match_prefix stops refreshing the recency of the path it matched",
        lambda: mock.patch.object(HiCache, "match_prefix", _match_forgetting_recency), ("full/write_through",),
        "A hit no longer makes its prefix recently used, so eviction drops hot prefixes before cold ones. The "
        "cache's eviction is consistent with its own stamps; caught because the model keeps its own recency and "
        "judges every LRU choice by it."),
    "alloc_refuses_when_all_evictable_needed": SeededBug(
        0, "allocation fails when it would need every evictable token (>= instead of >)",
        lambda: mock.patch.object(HiCache, "_make_room_device", _make_room_refusing_last), ("full/write_through",),
        "An off-by-one in the room check refuses an allocation that eviction could satisfy exactly, a spurious "
        "out-of-memory under load. Failing is always allowed by the frame; caught by the model's required effect "
        "(an allocation succeeds whenever free plus freeable space covers it)."),
    "write_through_skips_passed_nodes": SeededBug(
        0, "write-through backs up only the nodes an insert creates, never retrying a node it passes",
        lambda: mock.patch.object(HiCache, "_try_backup", _try_backup_only_changed), ("full/write_through",),
        "After a backup failed for lack of L2 room, later inserts through that node never back it up again, so "
        "the prefix is lost on the next eviction. Nothing changes that may not; caught by the model's required "
        "effect (under write-through every inserted page is on L2 or being backed up when L2 has room)."),
    "storage_exists_counts_past_a_hole": SeededBug(
        0, "L3's existence query counts every stored page, not the leading run",
        lambda: mock.patch.object(storage_mod.StorageBackend, "exists", _exists_counting_every_hit),
        ("full/write_through",),
        "Storage that lost a page in the middle of a prefix still reports the pages after it, so a prefetch sizes "
        "its run (and its L2 allocation) past the hole. Reads stop at the hole and no wrong data lands; the cache "
        "agrees with its own backend. Caught only because the model keeps its own account of what L3 holds (the "
        "writes and losses it saw) and predicts the prefetch length from it, never from the backend's index."),
}

"""Seeded bugs (DESIGN §4), applied from outside refcache/ as patches, for the suite to find.

Each `SeededBug` names its bug class, what it breaks, the machines expected to find it, and a
`patch()` context manager that installs it (unittest.mock.patch.object on HiCache methods or on
the `resolve` that refcache.cache imported). A new bug is one
more entry in `SEEDED_BUGS`; test_seeded_bugs.py picks them up.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from unittest import mock

import refcache.cache as cache_mod
import refcache.prefetch as prefetch_mod
from refcache.cache import HiCache
from refcache.config import PrefetchPolicy
from refcache.pages import page_align
from refcache.prefetch import PrefetchMixin
from refcache.tp import agree_termination
from refcache.transfer import COPY_INDEX_DTYPE, PartStatus


@dataclass(frozen=True)
class SeededBug:
    bug_class: int
    description: str
    patch: Callable[[], contextlib.AbstractContextManager]
    machines: tuple[str, ...]  # keys of stateful_tests.machines.MACHINES that should find it


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


_ALL = tuple(f"{c}/{p}" for c in ("full", "mamba", "swa")
             for p in ("write_through", "write_through_selective", "write_back"))
_SIDECAR = tuple(m for m in _ALL if not m.startswith("full"))

SEEDED_BUGS: dict[str, SeededBug] = {
    "class1_terminate_with_pool_in_flight": SeededBug(
        1, "prefetch terminated once its pages arrived while its mamba pool transfer is in flight (X2, X3)",
        prefetch_terminates_with_pool_in_flight, ("mamba/write_through", "mamba/write_back")),
    "class2_prefetch_gives_up_when_l2_is_short": SeededBug(
        2, "a prefetch whose run does not fit in L2 is abandoned instead of truncated to the page-aligned fit",
        prefetch_gives_up_when_l2_is_short, ("full/write_through", "mamba/write_through")),
    "class3_resolve_mutates_record": SeededBug(
        3, "resolve converts the pool-transfer record a node holds in place (X1; later L2 free gets device indices)",
        resolve_mutates_record, ("mamba/write_through", "mamba/write_back")),
    "class4_load_back_at_last_host": SeededBug(
        4, "load-back anchored at last_host_node instead of best_match_node (T6)",
        load_back_at_last_host, ("mamba/write_through",)),
    "class4_lock_host_only_bottom": SeededBug(
        4, "lock() locks a host-only bottom segment instead of its deepest device ancestor (T1/T2)",
        lock_host_only_bottom, ("full/write_through", "mamba/write_through")),
    "class5_cascade_ignores_host_ref": SeededBug(
        5, "tombstone cascade deletes a node an in-flight load still host-references (T3)",
        cascade_ignores_host_ref, ("mamba/write_through",)),
}

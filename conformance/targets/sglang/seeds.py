"""The five seed bugs (upstream SGLang HiCache fixes), reverted in SGLang 0.5.23's code at run time.

Each seed is a context manager that monkeypatches the smallest change bringing the pre-fix logic
back, written from the fix's description (not from its code), plus the target it is caught on and
the minimized operations that catch it (kept as a replay test in test_seeds.py). Where the seed's
code path no longer exists in 0.5.23, the nearest equivalent is patched, and the docstring says so.
A seed that is reverted but that no radix-tree path of 0.5.23 can show says why in `unobservable`,
and names a property `search` over the 0.5.23 path that does show it.

    python -m conformance.mutants --seeds [--budget S]
"""

from __future__ import annotations
import __future__

import contextlib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from unittest import mock

from . import shim
from .common import HICACHE_REAL, V_NEW


@dataclass(frozen=True)
class Seed:
    id: int  # the upstream pull request that fixed it
    title: str
    target: str
    patch: Callable[[], contextlib.AbstractContextManager] | None  # None: not reverted yet (see `where`)
    signs: tuple[str, ...]  # what the minimized failure shows (any one of them)
    calls: tuple = ()  # the minimized operations that catch it (a replay)
    where: str = ""  # how the pre-fix logic maps onto 0.5.23's code
    # Reverted, but no radix-tree path of 0.5.23 that the machine targets drive can show it (why, and
    # what was checked; test_seeds.py keeps the evidence). Such a seed is caught by `search` instead.
    unobservable: str = ""
    # "module:function(budget_s, seed) -> dict": a property search over the 0.5.23 path that does show
    # the seed, run in place of a machine target; `calls` are then its minimized arguments (a replay).
    search: str = ""
    replay: str = ""  # "module:function(calls) -> list of disagreements", the search's replay


def _load() -> None:
    shim.load(V_NEW, real=HICACHE_REAL)


@contextlib.contextmanager
def seed_25088() -> Iterator[None]:
    """#25088 "Fix HiCache load back start node": the L2 load-back was anchored at last_host_node, the
    deepest matched node with KV on some tier, which no component validator had accepted (a node
    whose path has KV but no mamba state / SWA window); the fix anchors it at best_match_node. In
    0.5.23, with HiCache on, last_host_node *is* best_match_node, so the revert restores both halves:
    the tree core reports the deepest matched node as last_host_node again, and the scheduler's
    load-back call (our adapter stands in for schedule_policy's init_load_back) anchors on it."""
    _load()
    from sglang.srt.mem_cache.unified_cache.unified_tree_core import UnifiedTreeCore

    from .v0_5_23_hicache import SGLangUniHiCache

    orig = UnifiedTreeCore._match_post_processor

    def post(self, params, value, best_match_node, *a, **k):
        res = orig(self, params, value, best_match_node, *a, **k)
        last = k.get("last_visited_node_id", a[4] if len(a) > 4 else None)
        if self.enable_hicache and last is not None:
            res = res._replace(last_host_node=last)
        return res

    with mock.patch.object(UnifiedTreeCore, "_match_post_processor", post), \
            mock.patch.object(SGLangUniHiCache, "LOAD_BACK_ANCHOR", "last_host_node"):
        yield


@contextlib.contextmanager
def seed_26945() -> Iterator[None]:
    """#26945 "truncate mamba prefetch length to available host KV size": when L2 could not take a
    prefetch's whole hit even after host eviction, the prefetch was abandoned; the fix truncates it
    to the page-aligned free size (above the threshold). HiMambaRadixCache is gone in 0.5.23; its
    equivalent is the hit-time L2 allocation every UnifiedRadixCache prefetch goes through,
    `HybridCacheController.allocate_storage_hit`, whose `allow_partial` path is that truncation: the
    revert takes it away (the allocation then stands or falls whole, as before the fix)."""
    _load()
    from sglang.srt.mem_cache.hybrid_cache.hybrid_cache_controller import HybridCacheController

    orig = HybridCacheController.allocate_storage_hit

    def allocate(self, operation, hit_tokens, *, allow_partial, min_tokens, evict_host):
        return orig(self, operation, hit_tokens, allow_partial=False, min_tokens=min_tokens, evict_host=evict_host)

    with mock.patch.object(HybridCacheController, "allocate_storage_hit", allocate):
        yield


@contextlib.contextmanager
def seed_27366() -> Iterator[None]:
    """#27366 "HiMamba prefetch terminated while its mamba pool transfer is still in flight": a prefetch
    counted as done once its KV pages had arrived from storage, and was ended (its result committed, its
    staging released) while the read of its mamba state was still running; the fix waits for that read
    too. HiMambaRadixCache is gone in 0.5.23; the stop decision is `UnifiedRadixCache._can_terminate_
    prefetch`, where wait_complete never stops a prefetch itself (the ACK drain commits it once every
    read, the state's included, has acknowledged) and timeout will not cut one whose KV has landed
    (`_prefetch_deadline_expired`). The revert lets both stop as soon as the KV has landed, as before
    the fix. The rest of 0.5.23 then keeps memory safe (the prefetch is discarded for want of its state,
    the state's staging freed only when its read acknowledges), so what shows is the loss: a prefetch
    that waits for completion brings nothing of a run that L3 holds whole."""
    _load()
    from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

    orig = UnifiedRadixCache._can_terminate_prefetch

    def can_terminate(self, operation):
        kv_landed = operation.host_indices is not None and \
            operation.completed_tokens >= len(operation.hash_value) * self.page_size
        if self.prefetch_stop_policy in ("wait_complete", "timeout") and kv_landed:
            return True
        return orig(self, operation)

    with mock.patch.object(UnifiedRadixCache, "_can_terminate_prefetch", can_terminate):
        yield


@contextlib.contextmanager
def seed_23696() -> Iterator[None]:
    """#23696 "host-protected node deletion in the tombstone cascade": walking up from a deleted leaf,
    the cascade stopped only at nodes with a device lock (FULL or mamba), not at nodes a prefetch or
    a backup holds by host reference, and deleted them; the fix also stops at a host reference.
    HiMambaRadixCache is gone in 0.5.23; the cascade is `UnifiedTreeCore._iteratively_delete_
    tombstone_ancestors`, whose stop test checks lock_ref or host_lock_ref on every component: the
    revert drops the host_lock_ref half of that test (the method recompiled from 0.5.23's own source
    with that one condition removed)."""
    _load()
    import inspect
    import textwrap

    from sglang.srt.mem_cache.unified_cache import unified_tree_core as m

    cls = m.UnifiedTreeCore

    def reverted(name: str, fixed: str, count: int):
        src = textwrap.dedent(inspect.getsource(getattr(cls, name)))
        if src.count(fixed) != count:
            raise RuntimeError(f"#23696: {name}'s stop test is not where 0.5.23 has it")
        code = compile(src.replace(fixed, fixed.replace(" or cd.host_lock_ref > 0", "")), m.__file__, "exec",
                       flags=__future__.annotations.compiler_flag, dont_inherit=True)
        ns: dict = {}
        exec(code, m.__dict__, ns)
        return mock.patch.object(cls, name, ns[name])

    with reverted("_iteratively_delete_tombstone_ancestors",
                  "cd.lock_ref > 0 or cd.host_lock_ref > 0 for cd in cur.component_data", 1), \
            reverted("drop_subtree_no_host", "cd.lock_ref > 0 or cd.host_lock_ref > 0 for cd in ", 2):
        yield


@contextlib.contextmanager
def seed_23427() -> Iterator[None]:
    """#23427 "Prevent move_hybrid_indices from polluting radix-tree node host state": moving an L2
    operation's indices for the copy (to the GPU for the kernel IO backend, sorted for the layer-first
    direct layout) wrote the moved indices back into the operation's own `PoolTransfer`s, objects
    the caller may still hold; the fix hands the copy fresh transfers and leaves the caller's alone.
    The revert runs 0.5.23's move and then stores its result in the operation's transfers, which it
    returns in place of the fresh ones (the KV-sharded path, newer than the fix, is left as it is)."""
    _load()
    from sglang.srt.mem_cache.hybrid_cache.hybrid_cache_controller import HybridCacheController

    orig = HybridCacheController.move_hybrid_indices

    def move(self, operation, *, write_back_jit=False):
        host, device, moved = orig(self, operation, write_back_jit=write_back_jit)
        if self.is_kv_sharded or not moved:
            return host, device, moved
        for own, new in zip(operation.pool_transfers, moved, strict=True):
            own.host_indices, own.device_indices = new.host_indices, new.device_indices
        return host, device, operation.pool_transfers

    with mock.patch.object(HybridCacheController, "move_hybrid_indices", move):
        yield


SEEDS: dict[int, Seed] = {
    25088: Seed(25088, "HiCache load-back anchored at last_host_node instead of best_match_node",
                "sglang-hicache-mamba", seed_25088,
                ("loaded without its mamba state", "device match after load_back", "AssertionError"),
                calls=(("insert", [1]), ("insert", [1, 1, 2, 1]), ("evict", 4), ("load_back", [1, 1, 1]))),
    27366: Seed(27366, "HiMamba prefetch terminated while its mamba pool transfer is still in flight",
                "sglang-hicache-mamba-storage", seed_27366, ("must bring them all",),
                calls=(("insert", [1, 1, 1, 1]), ("insert", [2] * 16), ("insert", [3] * 10),
                       ("prefetch", [1, 1, 1, 1, 1])),
                where="UnifiedRadixCache._can_terminate_prefetch in 0.5.23 (wait_complete leaves the commit to the "
                      "ACK drain, after the state's read; timeout's _prefetch_deadline_expired spares a prefetch "
                      "whose KV landed). On the CPU the state's read follows the KV within microseconds, so the "
                      "mamba storage targets hold it (SGLangUniHiMamba._gate_sidecar_reads) while the prefetch "
                      "is polled, and the machine asks an all-or-nothing prefetch that waits for completion to "
                      "bring a run L3 holds whole (KV and the state at its end) when both host pools have room"),
    26945: Seed(26945, "prefetch abandoned instead of truncated when L2 cannot take the whole hit",
                "sglang-hicache-python-storage", seed_26945, ("must truncate to what fits",),
                calls=(("insert", [3, 3, 2, 2, 2, 2, 1, 1, 2, 2]), ("insert", [2, 2, 1, 1]),
                       ("insert", [1, 2, 1, 1, 2, 2, 1, 2, 1, 1]),
                       ("prefetch", [3, 3, 2, 2, 2, 2, 1, 1, 2, 2, 3, 3, 2, 2, 1, 2])),
                where="HybridCacheController.allocate_storage_hit (allow_partial) in 0.5.23; FULL-only target: "
                      "the truncation is no longer mamba-specific"),
    23427: Seed(23427, "move_hybrid_indices rewrites the tree's PoolTransfer indices in place",
                "sglang-hicache-mamba", seed_23427, ("SWA page",),
                calls=([1] * 12, [1] * 7 + [2]),
                search="conformance.targets.sglang.decode_offload:search",
                replay="conformance.targets.sglang.decode_offload:offload_and_read_back",
                where="HybridCacheController.move_hybrid_indices in 0.5.23 (start_writing / start_loading "
                      "move the queued operation's indices just before the copy)",
                unobservable="0.5.23 commits a backup or load-back onto its nodes when the operation is "
                             "queued (_execute_and_commit_kv_backup: write(flush=False), then commit_backup; "
                             "_load_back_transfers: load(), then commit_load_back), copying each component's "
                             "indices (.clone()), before start_writing / start_loading moves them; the "
                             "operation's PoolTransfers are built per operation (build_hicache_transfers "
                             "makes new ones, a merge of several makes new ones) and the tree never reads "
                             "them after the move. Rebinding their fields therefore changes nothing a node "
                             "holds, on any device and IO backend (the kernel backend's CUDA indices "
                             "included; run on an H200's kernel IO path, 36,496 steps clean: reports/conformance_h200.md). "
                             "Shown by test_seeds.py: with the moved transfers' indices "
                             "overwritten by out-of-range values the mamba targets still run clean, while "
                             "zeroing the tensors they share with nodes is caught at once. The one "
                             "0.5.23 caller that keeps a moved operation's PoolTransfers is the PD decode "
                             "side's DecodeKVCacheOffloadManager (write with flush=True, then write_storage "
                             "and free from transfer.host_indices); there the seed *is* seen on the CPU: "
                             "decode_offload.py offloads two finished requests ([1]*12, [2]*8) through it "
                             "(SWA-hybrid unified pool, layer-first direct IO, file L3) and the second one's "
                             "SWA pages land in L3 under each other's keys (sorted host indices against "
                             "token-ordered keys; its KV pages stay right), clean 0.5.23 none "
                             "(test_seeds.py). No machine target drives that path (only the SWA sidecar "
                             "goes through a PoolTransfer, and reading it back needs an SWA HiCache tree "
                             "with L3, which the conformance machine does not model), so `search` hunts "
                             "it there: decode_offload.search draws sequences of finished requests and "
                             "judges every stored page by the prefix it must hold"),
    23696: Seed(23696, "tombstone cascade deletes a node a prefetch or backup still holds by host reference",
                "sglang-hicache-python-write-back-storage-small-l2", seed_23696, ("R1: host pool", "KeyError"),
                calls=(("insert", [1, 1, 2, 2]), ("insert", [1, 1, 2, 2, 3, 3, 4, 4]),
                       ("insert", [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7]), ("evict", 10**6)),
                where="UnifiedTreeCore._iteratively_delete_tombstone_ancestors (the cascade) and "
                      "UnifiedTreeCore.drop_subtree_no_host (write_back's drop of an unbacked subtree under L2 "
                      "pressure) in 0.5.23: both stop at lock_ref or host_lock_ref; seed_23696 drops the "
                      "host_lock_ref half of both. Caught on an L2 smaller than the device (hicache_ratio 0.625: 12 "
                      "host slots against 16): the eviction backs the leaves up to L2, each backup starting an L3 "
                      "write that host-references its node until the next poll; the last leaf's backup finds L2 "
                      "full of those nodes, and the drop of its subtree, which the fix declines, deletes them, so "
                      "the L3 write's acknowledgement raises KeyError in node_by_id (dec_host_lock_ref). The "
                      "cascade alone is still never reached: it only meets nodes with FULL KV on neither tier, "
                      "which 0.5.23 never leaves in the tree"),
}


def replay_seed(seed_id: int, patched: bool, calls: list | None = None) -> str | None:
    """Replay the seed's minimized operations (or `calls`) on its target, with the seed reverted or
    on clean code; returns "ErrorType: message" for the disagreement, or None. Loads sglang 0.5.23
    in this process."""
    from ...machine import replay
    from ...runner import machine

    s = SEEDS[seed_id]
    if s.patch is None:
        raise ValueError(f"seed {seed_id} is not reverted yet: {s.where}")
    ctx = s.patch() if patched else contextlib.nullcontext()
    if s.replay:
        with ctx:
            wrong = _resolve(s.replay)([list(c) for c in (calls if calls is not None else s.calls)])
        return "; ".join(wrong) or None
    if s.unobservable and calls is None:
        raise ValueError(f"seed {seed_id} has no replay: {s.unobservable}")
    with ctx:
        err = replay(machine(s.target), [tuple(c) for c in (calls if calls is not None else s.calls)])
    return None if err is None else f"{type(err).__name__}: {err}"


def _resolve(ref: str) -> Callable:
    mod, _, fn = ref.partition(":")
    return getattr(importlib.import_module(mod), fn)


def run_search(seed_id: int, budget_s: float, seed: int = 0) -> dict:
    """Seed `seed_id`'s property search with the seed reverted: {seed, target, caught, seconds,
    operations, check, examples, calls}. Loads sglang 0.5.23 in this process."""
    s = SEEDS[seed_id]
    _load()
    with s.patch():
        r = _resolve(s.search)(budget_s, seed)
    caught = r["caught"] and any(x in (r["check"] or "") for x in s.signs)
    return {"seed": seed_id, "target": f"search {s.search.rpartition(':')[0].rpartition('.')[2]}", "caught": caught,
            "seconds": r["seconds"], "operations": r["operations"], "check": r["check"], "examples": r["examples"],
            "calls": r["calls"]}

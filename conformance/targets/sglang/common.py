"""What the SGLang adapters of every version share: the pinned versions, the explained divergences
(`KNOWN*`, each kept demonstrated by a test), node helpers for trees whose nodes are readable, and
the CPU stand-ins for the host tier's CUDA-only pieces."""

from __future__ import annotations

from models.abstract import Prefix

V_NEW, V_MAMBA = "0.5.23", "0.5.17"
# sglang 0.5.17 modules the HiCache targets need real, not stood in for; every 0.5.17 target asks for
# them, so whichever target loads the version first, the others can share the process.
# sglang 0.5.23 modules the HiCache targets need real (the unified cache imports the controller at
# import time); every 0.5.23 target asks for them, so the targets of one version share a process.
HICACHE_REAL = ("sglang.srt.managers.cache_controller", "sglang.srt.configs.mamba_utils")
HIMAMBA_REAL = ("sglang.srt.managers.cache_controller", "sglang.srt.configs.mamba_utils")

# Explained divergences, not judged in bounded runs (test_conformance.py keeps each one demonstrated):
# "lru-recency": an insert or match that ends inside a node refreshes the recency of the node's
# unmatched remainder (RadixCache/UnifiedRadixCache stamp the node before splitting it; MambaRadixCache
# re-inserts the split child as most recent), so a prefix inserted later is evicted before it.
KNOWN = frozenset({"lru-recency"})
# "lock-tombstone" (MambaRadixCache 0.5.17, an upstream bug): inc_lock_ref takes a mamba lock only if
# the node holds a state *now*, and dec_lock_ref releases one if it holds a state *then*; a locked
# tombstone revived by an insert in between fails dec_lock_ref's assertion (or, under -O, drives
# mamba_lock_ref to -1 and corrupts the evictable/protected sizes). 0.5.23's lock receipts fix the class.
KNOWN_MAMBA = KNOWN | {"lock-tombstone"}
# HiMambaRadixCache 0.5.17, two more:
# "mamba-lru-stamps" (upstream inconsistency): its match moves the whole path in the *mamba* LRU list
# (reset_node_and_parents_mru) without refreshing those nodes' mamba stamps, so its own sanity_check
# fails after e.g. insert [1,1], insert [1], match [1,1]; and it contradicts MambaRadixCache, which
# touches only the used state on purpose. Bounded runs check the full LRU list only.
# "mamba-host-boundary" (a different contract): when the deepest mamba state on the path is only on
# host, its device match still runs to that node (device KV) and mamba_host_hit_length=1 asks for the
# state; the spec's device match ends at a node whose state is on device. Not compared then.
KNOWN_HIMAMBA = KNOWN_MAMBA | {"mamba-lru-stamps", "mamba-host-boundary"}
# HiRadixCache 0.5.17 under write-back or selective write-through, "best-is-backed-up" (a different
# contract): its best_match_node is the deepest matched node that is backed up, the spec's the deepest
# with data on any tier; they differ when the deepest matched nodes are only on device (not backed up
# yet). The machine then expects the deepest backed-up page. Under write-through they coincide.


def _pages(ps: int, prefix: tuple, key_len: int):
    """Page prefixes of a node whose key (length key_len) ends `prefix`."""
    start = len(prefix) - key_len
    return [prefix[: i] for i in range(start + ps, len(prefix) + 1, ps)]


def walk_tree(root) -> list[tuple]:
    """(node, prefix) for every node below `root` of a tree whose nodes are Python objects."""
    out, stack = [], [(root, ())]
    while stack:
        n, pre = stack.pop()
        for c in n.children.values():
            p = pre + tuple(c.key.token_ids)
            out.append((c, p))
            stack.append((c, p))
    return out


class RadixNodes:
    """Node helpers for SGLang trees whose nodes are Python objects (`root_node`, `children`, `key`,
    `parent`): RadixCache and the 0.5.17 caches. Expects `self.cache` and `self.info`."""

    def alive(self, node) -> bool:
        root, ps = self.cache.root_node, self.info.page_size
        while node is not root:
            p = node.parent
            if p is None or p.children.get(node.key.child_key(ps)) is not node:
                return False
            node = p
        return True

    def node_prefix(self, node) -> Prefix:
        keys = []
        while node is not self.cache.root_node:
            keys.append(tuple(node.key.token_ids))
            node = node.parent
        return tuple(t for k in reversed(keys) for t in k)

    def lock(self, node):
        self.cache.inc_lock_ref(node)
        return node

    def locked_prefix(self, lock) -> Prefix:
        return self.node_prefix(lock)

    def unlock(self, lock):
        self.cache.dec_lock_ref(lock)

    def _nodes(self):
        return walk_tree(self.cache.root_node)



def cpu_stand_ins(pinning: bool = True) -> None:
    """Copy with torch where sgl_kernel's copies would (absent, or stood in for by the shim), and,
    with `pinning` (no CUDA), skip pinned-memory registration."""
    import sglang.srt.mem_cache.memory_pool_host as mph
    import sglang.srt.mem_cache.pool_host.common as phc
    import sglang.srt.mem_cache.pool_host.mha as mha

    from . import kernels

    if pinning:
        phc._cuda_host_register = lambda *a, **k: None  # 0.5.23 passes a granularity too
    kernels.install(mha, mph)
    try:  # 0.5.23's mamba host pool imports the same copies (under CUDA only)
        import sglang.srt.mem_cache.pool_host.mamba as mamba_host
    except ImportError:
        return
    kernels.install(mamba_host)


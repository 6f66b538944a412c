"""Derived bookkeeping in one place: eviction candidate sets and evictable/protected sizes.

Every change to a node goes through `touch(node)`, which takes back the node's previous
contribution and adds its new one, so no call site adjusts a size or a set by hand.
R2/R3 recompute the same quantities from scratch and compare.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .node import TreeNode


def is_device_leaf(node: TreeNode) -> bool:
    """On device, and no child is on device."""
    if node.value is None:
        return False
    for c in node.children.values():  # a loop, not any(<generator>): this runs on every insert
        if c.value is not None:
            return False
    return True


def device_evictable(node: TreeNode) -> bool:
    """T4 (L1): unlocked device leaf that can lose its device copy: it has an L2 copy to demote
    to, or no host reference (a referenced node may not be deleted, T3)."""
    return (node.parent is not None and node.lock_ref == 0 and is_device_leaf(node)
            and (node.host_value is not None or node.host_ref == 0))


def host_evictable(node: TreeNode) -> bool:
    """T4 (L2): host-only (not on device), no host reference, and no children at all."""
    return (node.parent is not None and node.host_value is not None and node.value is None
            and node.host_ref == 0 and not node.children)


def contribution(node: TreeNode) -> dict:
    """Sizes one node adds to the cache-wide totals, keyed (component, tier, evictable|protected).

    A plain dict (each key occurs once per node): this runs twice per insert, and building a
    Counter cost more than the rest of the bookkeeping."""
    if node.parent is None:
        return {}
    n = len(node.key)
    dev_state = "protected" if node.lock_ref else "evictable"
    host_state = "protected" if (node.host_ref or node.value is not None) else "evictable"
    c = {}
    if node.value is not None:
        c["full", "device", dev_state] = n
    if node.host_value is not None:
        c["full", "host", host_state] = n
    if node.mamba_value is not None:
        c["mamba", "device", dev_state] = 1
    if node.mamba_host is not None:
        c["mamba", "host", host_state] = 1
    if node.swa:
        c["swa", "device", dev_state] = n
    if node.swa_host:
        c["swa", "host", host_state] = n
    return c


class Bookkeeping:
    """Holds the eviction sets and size totals, kept equal to what the tree implies."""

    def __init__(self) -> None:
        self.device_leaves: set[TreeNode] = set()
        self.host_leaves: set[TreeNode] = set()
        self.sizes: Counter = Counter()

    def touch(self, *nodes: TreeNode) -> None:
        """Re-derive each node's (and its parent's) entries after any change to it."""
        for node in nodes:
            self._update(node)
            if node.parent is not None:  # a child on device settles the parent's leafness without a scan
                self._update(node.parent, node.value is not None)

    def forget(self, node: TreeNode) -> None:
        """Take back a detached node's contribution."""
        self._apply(node, {}, False, False)

    def _update(self, node: TreeNode, has_device_child: bool = False) -> None:
        """`has_device_child`: known to have a child on device (a shared prefix may have thousands
        of children; scanning them on every insert below it made insert O(children))."""
        dev = False if has_device_child else device_evictable(node)
        self._apply(node, contribution(node), dev, host_evictable(node))

    def _apply(self, node: TreeNode, contrib: dict, dev: bool, host: bool) -> None:
        sizes = self.sizes
        if node.acct:
            old, old_dev, old_host = node.acct
            if old_dev == dev and old_host == host and old == contrib:
                return  # the common case for a parent touched for its leafness: nothing moved
            for k, v in old.items():
                sizes[k] -= v
        for k, v in contrib.items():
            sizes[k] += v
        (self.device_leaves.add if dev else self.device_leaves.discard)(node)
        (self.host_leaves.add if host else self.host_leaves.discard)(node)
        node.acct = (contrib, dev, host)

    def size(self, component: str, tier: str, state: str) -> int:
        return self.sizes[component, tier, state]

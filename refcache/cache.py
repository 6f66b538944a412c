"""HiCache: the reference hierarchical prefix cache (L1 device, L2 host; L3 in `storage`).

Read DESIGN.md §2 beside this file: each public method here is one operation there. The rules
that keep the tree sound are stated where they are enforced:
- device closure (T1): a node on device has its parent on device, so device nodes are a prefix
  of every path; inserts take slots for host-only nodes on their path and loads bring whole paths.
- locks and host references count along the path to the root, so a split copies them and a
  release walks the same path back.
- an in-flight operation owns the slots it writes until it is acknowledged by `poll`.
"""

from __future__ import annotations

import functools
import heapq
import struct
from array import array
from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

import torch

from .bookkeeping import Bookkeeping, device_evictable
from .config import CacheConfig, WritePolicy
from .errors import (
    ComponentError,
    InvalidAnchorError,
    InvalidIndicesError,
    InvalidKeyError,
    LockError,
    PoolExhaustedError,
    UnknownNodeError,
)
from .node import TreeNode
from .pages import edge_match, page_align
from .pools import INDEX_DTYPE, KVPool, StatePool, copy_kv
from .prefetch import PrefetchMixin
from .tp import RankGroup, SingleRank
from .transfer import (
    CopyJob,
    CudaExecutor,
    DeterministicExecutor,
    Executor,
    Operation,
    OpKind,
    OpState,
    PartStatus,
    PoolTransfer,
    Segment,
    resolve,
)

POISON = float("nan")


@functools.lru_cache(maxsize=4096)
def _int64_packer(n: int):
    """A compiled `struct` packer of `n` int64s (struct's own format cache holds 100 formats and
    is cleared when full, so varied request lengths would recompile the format on every call)."""
    return struct.Struct(f"<{n}q").pack


def _check_int64(key: tuple) -> None:
    """Raise TypeError/OverflowError unless every token is a 64-bit integer (has `__index__`).

    Packing accepts exactly what `array("q")` does and costs half as much (one C loop, no array
    object); on a refusal the array is built to raise its more precise message."""
    try:
        _int64_packer(len(key))(*key)
    except struct.error:
        array("q", key)  # raises TypeError / OverflowError naming the bad token
        raise TypeError("a token is not a 64-bit integer") from None


class MatchResult(NamedTuple):
    """What `match_prefix` found. Lengths are in tokens."""

    device_indices: torch.Tensor
    last_device_node: TreeNode
    last_host_node: TreeNode
    best_match_node: TreeNode
    host_hit_length: int

    @property
    def device_len(self) -> int:
        return int(self.device_indices.numel())


class InsertResult(NamedTuple):
    """`cached_len`: leading tokens whose indices the tree did not take; the caller still owns
    and must free `device_indices[:cached_len]`. `mamba_slot_used`: the tree took the slot."""

    cached_len: int
    mamba_slot_used: bool


class HiCache(PrefetchMixin):
    """Radix tree over token pages with device, host and storage tiers and sidecar components.

    `storage` (and `state_storage`, for mamba states) are L3 backends from `refcache.storage`;
    `ranks` is the TP rank group (`refcache.tp`), a single rank by default."""

    def __init__(self, config: CacheConfig, executor: Executor | None = None, storage=None,
                 state_storage=None, ranks: RankGroup | None = None):
        self.config = c = config
        dev = c.torch_device
        pin = torch.cuda.is_available()
        cpu = torch.device("cpu")
        self.page_size = c.page_size
        self.device_kv = KVPool("L1 KV", c.device_tokens, c.page_size, c.num_layers, c.num_heads,
                                c.head_dim, c.dtype, dev, page_first=False)
        self.host_kv = KVPool("L2 KV", c.host_tokens, c.page_size, c.num_layers, c.num_heads,
                              c.head_dim, c.dtype, cpu, page_first=True, pin=pin)
        self.device_state = self.host_state = None
        if c.has("mamba"):
            self.device_state = StatePool("L1 mamba", c.device_mamba_slots, c.mamba_state_dim, c.dtype, dev)
            self.host_state = StatePool("L2 mamba", c.host_mamba_slots, c.mamba_state_dim, c.dtype, cpu, pin)
        if executor is None:
            executor = CudaExecutor(dev) if dev.type == "cuda" else DeterministicExecutor(auto_complete=True)
        self.executor = executor
        self.root = TreeNode(page_size=self.page_size)
        self._nodes: dict[int, TreeNode] = {self.root.id: self.root}
        self.book = Bookkeeping()
        self.ops: dict[int, Operation] = {}
        self._busy: dict[int, Operation] = {}  # node id -> the in-flight op with a segment on it
        self._caller_pages: set[int] = set()  # L1 KV pages allocated to callers, not yet in the tree
        self._caller_states: set[int] = set()  # L1 mamba slots allocated to callers
        self._caller_swa = 0  # SWA tokens reserved for callers' allocations
        self._locks: Counter = Counter()  # node id -> locks callers hold on it
        self._locked_with_state: set[int] = set()  # caller-locked nodes that had a mamba state (T5)
        self.swa_capacity = c.extra.get("device_swa_tokens", c.device_tokens)
        self._clock = 0
        self.storage, self.state_storage = storage, state_storage
        self.ranks = ranks or SingleRank()
        self._prefetches: dict[str, Operation] = {}  # request id -> its prefetch, while it waits

    # ================================================================================ input
    def _key(self, tokens: Sequence[int] | torch.Tensor, truncate: bool) -> tuple[int, ...]:
        if isinstance(tokens, torch.Tensor):
            if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.dim() != 1:
                raise InvalidKeyError(f"token tensor must be 1-D integer, got {tokens.dtype} {tuple(tokens.shape)}")
            tokens = tokens.tolist()
        try:
            if type(tokens) in (list, tuple):  # keep the caller's int objects; packing only validates
                key = tuple(tokens)
                _check_int64(key)
            else:
                key = tuple(array("q", tokens))  # one C loop; anything without __index__ is refused
        except (TypeError, OverflowError) as e:
            raise InvalidKeyError(f"tokens must be 64-bit integers: {e}") from None
        if truncate:
            return key[: page_align(len(key), self.page_size)]
        if len(key) % self.page_size:
            raise InvalidKeyError(f"{len(key)} tokens is not a whole number of pages (page_size={self.page_size})")
        return key

    def _check_node(self, node: TreeNode) -> TreeNode:
        if not isinstance(node, TreeNode) or self._nodes.get(node.id) is not node:
            raise UnknownNodeError(f"{node!r} is not attached to this cache")
        return node

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    # ============================================================= component match-end rules
    def _window_ok(self, node: TreeNode, tiers: str) -> bool:
        """SWA: every node in the last `swa_window` tokens ending at `node` has SWA data in `tiers`."""
        covered = 0
        n = node
        while n.parent is not None and covered < self.config.swa_window:
            if not (n.swa or (tiers == "any" and n.swa_host)):
                return False
            covered += len(n.key)
            n = n.parent
        return True

    def valid_end(self, node: TreeNode, tiers: str) -> bool:
        """Whether every component accepts `node` as a match end, using data on the device
        (`tiers='device'`) or on device or host (`tiers='any'`)."""
        if node.parent is None:
            return True
        if tiers == "device" and node.value is None:
            return False
        if node.value is None and node.host_value is None:
            return False
        side = self.config.sidecar
        if side == "mamba":
            return node.mamba_value is not None or (tiers == "any" and node.mamba_host is not None)
        if side == "swa":
            return self._window_ok(node, tiers)
        return True

    def is_tombstone(self, node: TreeNode) -> bool:
        """No value of the defining component on any tier: the sidecar's, or full's when alone."""
        side = self.config.sidecar
        if side == "mamba":
            return node.mamba_value is None and node.mamba_host is None
        if side == "swa":
            return not node.swa and not node.swa_host
        return node.value is None and node.host_value is None

    # ============================================================================== match
    def match_prefix(self, tokens: Sequence[int] | torch.Tensor) -> MatchResult:
        """Longest cached prefix of `tokens` (truncated to whole pages); splits the node the match
        ends inside, and stamps the path as recently used."""
        key = self._key(tokens, truncate=True)
        path = self._walk(key, split=True)
        now = self._tick()
        for n in path:
            n.last_access = now
            n.hit_count += 1
        self._maybe_backup_selective(path, keep=path[-1] if path else None)
        last_dev = last_host = best = self.root
        for n in path:
            last_host = n
            if n.value is not None and self.valid_end(n, "device"):
                last_dev = n
            if self.valid_end(n, "any"):
                best = n
        chunks = []
        for n in path:
            chunks.append(n.value)
            if n is last_dev:
                break
        dev_idx = torch.cat(chunks) if last_dev is not self.root else self._empty_indices()
        host_hit, counting = 0, last_dev is self.root
        for n in path:
            if counting:
                host_hit += len(n.key)
            if n is best:
                break
            counting = counting or n is last_dev
        return MatchResult(dev_idx, last_dev, last_host, best, host_hit if best is not last_dev else 0)

    def _empty_indices(self) -> torch.Tensor:
        return torch.empty(0, dtype=INDEX_DTYPE, device=self.device_kv.allocator.index_device)

    def _walk(self, key: tuple[int, ...], split: bool) -> list[TreeNode]:
        """Nodes along `key` that hold data on some tier, splitting the last one if the key ends
        inside it."""
        ps = self.page_size
        node, pos, path = self.root, 0, []
        while pos < len(key):
            child = node.children.get(key[pos : pos + ps])
            if child is None or (child.value is None and child.host_value is None):
                break
            m = edge_match(child.key, key, pos, ps)
            if m < len(child.key):
                if split:
                    path.append(self._split(child, m))
                break
            path.append(child)
            pos += m
            node = child
        return path

    def _split(self, child: TreeNode, at: int) -> TreeNode:
        """Cut `child` at token offset `at`; the new upper node is returned, `child` keeps the
        tail and the mamba state (valid only for the full prefix)."""
        ps = self.page_size
        parent = child.parent
        h = child._hashes  # None stays None: both halves compute theirs on first use
        upper = TreeNode(child.key[:at], parent, None if h is None else h[: at // ps])
        child.key, child.hashes = child.key[at:], None if h is None else h[at // ps :]
        if child.value is not None:
            upper.value, child.value = child.value[:at], child.value[at:]
        if child.host_value is not None:
            upper.host_value, child.host_value = child.host_value[:at], child.host_value[at:]
        upper.swa, upper.swa_host = child.swa, child.swa_host
        upper.lock_ref, upper.host_ref = child.lock_ref, child.host_ref
        upper.last_access, upper.hit_count = child.last_access, child.hit_count
        parent.children[upper.key[:ps]] = upper
        upper.children[child.key[:ps]] = child
        child.parent = upper
        self._nodes[upper.id] = upper
        op = self._busy.get(child.id)
        if op is not None:  # the op now covers both halves
            for i, s in enumerate(op.segments):
                if s.node is child:
                    cut = lambda t, lo, hi: None if t is None else t[lo:hi]  # noqa: E731
                    op.segments[i : i + 1] = [Segment(upper, cut(s.device, 0, at), cut(s.host, 0, at)),
                                              Segment(child, cut(s.device, at, None), cut(s.host, at, None))]
                    self._busy[upper.id] = op
                    break
            if child in op.swa_nodes:
                op.swa_nodes.append(upper)
                self._busy[upper.id] = op
        self.book.touch(upper, child)
        return upper

    # ============================================================================= insert
    def insert(self, tokens: Sequence[int] | torch.Tensor, device_indices: torch.Tensor,
               mamba_slot: torch.Tensor | None = None) -> InsertResult:
        """Put `tokens` (whole pages) with their L1 slots into the tree.

        The tree takes the slots of tokens it does not already hold on device; the slots of the
        leading `cached_len` tokens stay the caller's to free (they duplicate cached data). When a
        load-back is in flight on the path, nothing is taken. With mamba, the state slot for the
        exact prefix is taken if the end node has none on device.
        """
        key = self._key(tokens, truncate=False)
        alloc = self.device_kv.allocator
        alloc.check_indices(device_indices)
        if device_indices.numel() != len(key):
            raise InvalidIndicesError(f"{device_indices.numel()} indices for {len(key)} tokens")
        pages = alloc.pages_of(device_indices)
        if len(set(pages)) != len(pages) or not self._caller_pages.issuperset(pages):
            raise InvalidIndicesError("insert needs slots the caller allocated with alloc_device and still owns")
        self._check_state_arg(mamba_slot)
        if not key:
            return InsertResult(0, False)

        now, ps = self._tick(), self.page_size
        node, pos, cached, touched, changed = self.root, 0, 0, [], []
        for child, start, m in self._descend(self.root, key, now):
            if child.value is not None:
                child.hit_count += 1
                cached = start + m
            elif child.id in self._busy:  # a load-back is bringing it: take nothing
                return InsertResult(len(key), False)
            else:  # host-only or data-less: the caller's fresh KV makes it device-resident again
                self._adopt(child, device_indices[start : start + m], pages[start // ps : (start + m) // ps])
                changed.append(child)
            touched.append(child)
            node, pos = child, start + m
        if pos < len(key):
            leaf = self._add_leaf(node, key[pos:], None, now)  # hashes on first use
            self._adopt(leaf, device_indices[pos:], pages[pos // ps :])
            touched.append(leaf)
            changed.append(leaf)
            node = leaf
        used = False
        if (mamba_slot is not None and node.mamba_value is None and node.value is not None
                and node.id not in self._busy):  # a load may be bringing its state
            node.mamba_value = mamba_slot
            self._caller_states.discard(int(mamba_slot.item()))
            changed.append(node)
            used = True
        self.book.touch(*changed)  # nodes only passed (stamped) keep their bookkeeping
        if self.config.write_policy is WritePolicy.WRITE_THROUGH:
            for n in touched:
                self._try_backup(n)
        else:
            self._maybe_backup_selective(touched)
        return InsertResult(cached, used)

    def _descend(self, node: TreeNode, key: tuple[int, ...], now: int):
        """Walk `key` down from `node`, splitting the node it ends inside and stamping each node
        passed; yields (node, offset of its key in `key`, its length)."""
        ps, pos = self.page_size, 0
        while pos < len(key):
            child = node.children.get(key[pos : pos + ps])
            if child is None:
                return
            m = edge_match(child.key, key, pos, ps)
            if m < len(child.key):
                child = self._split(child, m)
            child.last_access = now
            yield child, pos, m
            node, pos = child, pos + m

    def _add_leaf(self, parent: TreeNode, key: tuple[int, ...], hashes: list[int] | None, now: int) -> TreeNode:
        leaf = TreeNode(key, parent, hashes)
        leaf.last_access = now
        parent.children[key[: self.page_size]] = leaf
        self._nodes[leaf.id] = leaf
        return leaf

    def _adopt(self, node: TreeNode, indices: torch.Tensor, pages: list[int]) -> None:
        """The tree takes the caller's slots `indices` (already validated: their `pages`)."""
        node.value = indices
        node.swa = self.config.sidecar == "swa"
        self._caller_pages.difference_update(pages)
        if node.swa:
            self._caller_swa -= len(pages) * self.page_size

    def _check_state_arg(self, slot: torch.Tensor | None) -> None:
        if not self.config.has("mamba"):
            if slot is not None:
                raise ComponentError("mamba_slot given but this cache has no mamba component")
            return
        if slot is None:
            raise ComponentError("this cache has a mamba component: insert needs mamba_slot")
        self.device_state.allocator.check_indices(slot)
        if slot.numel() != 1 or int(slot.item()) not in self._caller_states:
            raise InvalidIndicesError("mamba_slot must be one slot the caller allocated with alloc_mamba")

    # ========================================================================= allocation
    def alloc_device(self, n_tokens: int, evict: bool = True) -> torch.Tensor:
        """L1 slots for a request's KV (whole pages), evicting LRU data if allowed.

        Raises PoolExhaustedError, with nothing evicted, when even full eviction could not make
        room; under write-back, evictions may instead wait for backups (poll, then retry)."""
        alloc = self.device_kv.allocator
        if n_tokens < 0 or n_tokens % self.page_size:
            raise InvalidIndicesError(f"{n_tokens} tokens is not a whole number of pages")
        swa_need = n_tokens if self.config.sidecar == "swa" else 0
        self._make_room_device(n_tokens, swa_need, evict)
        idx = alloc.alloc(n_tokens)
        self._caller_pages.update(alloc.pages_of(idx))
        self._caller_swa += swa_need
        return idx

    def free_device(self, indices: torch.Tensor) -> None:
        """Give back L1 slots the caller owns (e.g. the `cached_len` duplicates of an insert)."""
        pages = self.device_kv.allocator.pages_of(indices)
        if len(set(pages)) != len(pages) or not self._caller_pages.issuperset(pages):
            raise InvalidIndicesError("free_device: slots not owned by the caller")
        self.device_kv.allocator.free(indices)
        self._caller_pages.difference_update(pages)
        if self.config.sidecar == "swa":
            self._caller_swa -= len(pages) * self.page_size

    def alloc_mamba(self, evict: bool = True) -> torch.Tensor:
        """One L1 mamba state slot for a request, evicting LRU states if allowed."""
        if not self.config.has("mamba"):
            raise ComponentError("this cache has no mamba component")
        slot = self._alloc_state(evict)
        self._caller_states.add(int(slot.item()))
        return slot

    def free_mamba(self, slot: torch.Tensor) -> None:
        if not self.config.has("mamba"):
            raise ComponentError("this cache has no mamba component")
        self.device_state.allocator.check_indices(slot)
        s = int(slot.item()) if slot.numel() == 1 else -1
        if s not in self._caller_states:
            raise InvalidIndicesError("free_mamba: slot not owned by the caller")
        self.device_state.allocator.free(slot)
        self._caller_states.discard(s)

    def swa_available(self) -> int:
        """SWA device tokens neither held by nodes, nor reserved by callers or loads."""
        used = self.book.size("swa", "device", "evictable") + self.book.size("swa", "device", "protected")
        return self.swa_capacity - used - self._caller_swa - sum(self._op_swa(op) for op in self.ops.values())

    def _op_swa(self, op: Operation) -> int:
        return sum(len(n.key) for n in op.swa_nodes) if op.kind is OpKind.LOAD else 0

    def _make_room_device(self, n_tokens: int, swa_tokens: int, evict: bool) -> None:
        alloc = self.device_kv.allocator
        short = n_tokens - alloc.available()
        swa_short = swa_tokens - self.swa_available() if swa_tokens else 0
        if short <= 0 and swa_short <= 0:
            return
        if not evict:
            raise PoolExhaustedError(f"L1 has {alloc.available()} free tokens, {n_tokens} needed")
        if short > self.book.size("full", "device", "evictable"):
            raise PoolExhaustedError(
                f"L1: {n_tokens} tokens needed, {alloc.available()} free and "
                f"{self.book.size('full', 'device', 'evictable')} evictable")
        if swa_short > self.book.size("swa", "device", "evictable"):
            raise PoolExhaustedError(f"L1 SWA: {swa_tokens} tokens needed, {self.swa_available()} free")
        if swa_short > 0:
            self.evict_swa(swa_short)
        if short > 0:
            self.evict(short)
        if alloc.available() < n_tokens or (swa_tokens and self.swa_available() < swa_tokens):
            raise PoolExhaustedError(
                f"L1: only {alloc.available()} tokens free after eviction ({n_tokens} needed); "
                "write-back evictions wait for their backups: poll and retry")

    def _alloc_state(self, evict: bool) -> torch.Tensor:
        alloc = self.device_state.allocator
        slot = alloc.alloc(1)
        if slot is None and evict:
            self.evict_mamba(1)
            slot = alloc.alloc(1)
        if slot is None:
            raise PoolExhaustedError("L1 mamba state pool is full and nothing can be evicted")
        return slot

    def _alloc_host(self, n_tokens: int) -> torch.Tensor:
        alloc = self.host_kv.allocator
        short = n_tokens - alloc.available()
        if short > 0:
            if short > self.book.size("full", "host", "evictable"):
                raise PoolExhaustedError(f"L2: {n_tokens} tokens needed, {alloc.available()} free and "
                                         f"{self.book.size('full', 'host', 'evictable')} evictable")
            self.evict_host(short)
        idx = alloc.alloc(n_tokens)
        if idx is None:
            raise PoolExhaustedError(f"L2: only {alloc.available()} tokens free after eviction")
        return idx

    def _alloc_host_state(self) -> torch.Tensor | None:
        """One L2 mamba slot, evicting host leaves until one frees; None if none can."""
        alloc = self.host_state.allocator
        slot = alloc.alloc(1)
        while slot is None and self.evict_host(self.page_size):
            slot = alloc.alloc(1)
        return slot

    # ============================================================================== locks
    def lock(self, node: TreeNode) -> TreeNode:
        """Protect the device data of `node`'s path from eviction; returns the node actually
        locked: the deepest node at or above `node` that is on device (a bottom segment that is
        only on the host is skipped — locking it would protect nothing). Unlock that node."""
        self._check_node(node)
        while node.parent is not None and node.value is None:
            node = node.parent
        if node.parent is None:
            return node
        self._locks[node.id] += 1
        if node.mamba_value is not None:
            self._locked_with_state.add(node.id)
        self._add_lock(node, +1)
        return node

    def unlock(self, node: TreeNode) -> None:
        """Release one lock taken with `lock` (on the node it returned)."""
        self._check_node(node)
        if node.parent is None:
            return
        if self._locks[node.id] <= 0:
            raise LockError(f"{node!r} is not locked by a caller")
        self._locks[node.id] -= 1
        if not self._locks[node.id]:
            del self._locks[node.id]
            self._locked_with_state.discard(node.id)
        self._add_lock(node, -1)

    def _add_lock(self, node: TreeNode, delta: int) -> None:
        path = list(node.path_to_root())
        for n in path:
            n.lock_ref += delta
        self.book.touch(*path)

    def _add_host_ref(self, node: TreeNode, delta: int) -> None:
        path = list(node.path_to_root())
        for n in path:
            n.host_ref += delta
        self.book.touch(*path)

    # =========================================================================== eviction
    def evict(self, n_tokens: int) -> int:
        """Free L1 KV of unlocked device leaves, LRU first, until `n_tokens` are freed.

        A leaf with L2 data is demoted; without, it is deleted (or, under write-back, backed up
        and demoted when the backup completes). Returns the L1 tokens freed now, cascade
        deletions included."""
        if n_tokens < 0:
            raise ValueError("n_tokens must be >= 0")
        alloc = self.device_kv.allocator
        start = alloc.available()  # counting frees here includes cascade deletions
        heap = [(n.last_access, n.id, n) for n in self.book.device_leaves]
        heapq.heapify(heap)
        while alloc.available() - start < n_tokens and heap:
            _, _, node = heapq.heappop(heap)
            if not device_evictable(node) or self._nodes.get(node.id) is not node:
                continue
            ancestors = list(node.parent.path_to_root())
            self._evict_one(node)
            self._requeue(heap, ancestors, device_evictable)
        return alloc.available() - start

    def _requeue(self, heap: list, ancestors: list[TreeNode], evictable) -> None:
        """After an eviction (and its cascade), queue the nearest surviving ancestor if it became
        evictable."""
        for a in ancestors:
            if self._nodes.get(a.id) is a:
                if evictable(a):
                    heapq.heappush(heap, (a.last_access, a.id, a))
                return

    def _evict_one(self, node: TreeNode) -> int:
        """Evict one unlocked device leaf; returns 0 when deferred to its write-back backup."""
        n = len(node.key)
        if node.host_value is not None:
            self._drop_device(node)
            self._cascade(node)
        elif self.config.write_policy is WritePolicy.WRITE_BACK and self._try_backup(node, demote=True):
            return 0
        elif node.children:
            self._drop_device(node)  # host-only children keep it as a data-less interior node
        else:
            self._delete(node)
        return n

    def evict_host(self, n_tokens: int) -> int:
        """Free L2 data of host-only, unreferenced leaves, LRU first. Returns tokens freed."""
        if n_tokens < 0:
            raise ValueError("n_tokens must be >= 0")
        alloc = self.host_kv.allocator
        start = alloc.available()
        heap = [(n.last_access, n.id, n) for n in self.book.host_leaves]
        heapq.heapify(heap)
        while alloc.available() - start < n_tokens and heap:
            _, _, node = heapq.heappop(heap)
            if node not in self.book.host_leaves:
                continue
            ancestors = list(node.parent.path_to_root())
            self._delete(node)
            self._requeue(heap, ancestors, lambda a: a in self.book.host_leaves)
        return alloc.available() - start

    def evict_mamba(self, n_states: int) -> int:
        """Free L1 mamba states of unlocked nodes, LRU first: a device leaf is evicted whole, an
        interior node becomes a device tombstone. Returns states freed."""
        if not self.config.has("mamba"):
            raise ComponentError("this cache has no mamba component")
        return self._evict_sidecar(n_states, lambda n: n.mamba_value is not None, self._drop_mamba,
                                   self.device_state.allocator.available)

    def evict_swa(self, n_tokens: int) -> int:
        """Free L1 SWA KV of unlocked nodes, LRU first (interior nodes become SWA tombstones).
        Returns SWA tokens freed."""
        if self.config.sidecar != "swa":
            return 0
        return self._evict_sidecar(n_tokens, lambda n: n.swa, self._drop_swa, self.swa_available)

    def _evict_sidecar(self, amount: int, holds, drop, measure) -> int:
        start = measure()  # frees counted where they happen, cascades included
        while measure() - start < amount:
            cands = [n for n in self._nodes.values()
                     if n.parent is not None and n.lock_ref == 0 and holds(n) and n.id not in self._busy]
            if not cands:
                break
            node = min(cands, key=lambda n: (n.last_access, n.id))
            if device_evictable(node):
                if not self._evict_one(node):  # deferred until its write-back backup completes
                    break
            else:
                drop(node)
                self.book.touch(node)
        return measure() - start

    def _drop_mamba(self, node: TreeNode) -> None:
        if node.mamba_value is not None:
            self.device_state.allocator.free(node.mamba_value)
            node.mamba_value = None

    def _drop_swa(self, node: TreeNode) -> None:
        node.swa = False

    def _drop_device(self, node: TreeNode) -> None:
        """Free every L1 value of `node` (it stays in the tree)."""
        self.device_kv.allocator.free(node.value)
        node.value = None
        self._drop_swa(node)
        if self.device_state is not None:
            self._drop_mamba(node)
        self.book.touch(node)

    def _drop_host(self, node: TreeNode) -> None:
        if node.host_value is not None:
            self.host_kv.allocator.free(node.host_value)
            node.host_value = None
        if node.mamba_host is not None:
            self.host_state.allocator.free(node.mamba_host.host_indices)
            node.mamba_host = None
        node.swa_host = False

    def _delete(self, node: TreeNode) -> None:
        """Remove a childless, unlocked, unreferenced node with all its values, then cascade."""
        assert not node.children and node.lock_ref == 0 and node.host_ref == 0, node
        if node.value is not None:
            self._drop_device(node)
        self._drop_host(node)
        parent = node.parent
        del parent.children[node.key[: self.page_size]]
        del self._nodes[node.id]
        self.book.forget(node)
        node.parent = None
        self.book.touch(parent)
        self._cascade(parent)

    def _cascade(self, node: TreeNode) -> None:
        """Delete `node` if it became a childless tombstone nobody needs (and so on upward)."""
        if (node.parent is not None and not node.children and node.lock_ref == 0
                and node.host_ref == 0 and node.id not in self._busy and self.is_tombstone(node)):
            self._delete(node)

    # ============================================================================= backup
    def write_backup(self, node: TreeNode) -> Operation | None:
        """Start copying `node`'s L1 KV (and mamba state) to L2. None if it is already on L2 or
        being backed up. Raises PoolExhaustedError when L2 cannot make room."""
        self._check_node(node)
        if node.value is None:
            raise InvalidAnchorError(f"{node!r} has no device KV to back up")
        return self._start_backup(node, demote=False)

    def _try_backup(self, node: TreeNode, demote: bool = False) -> bool:
        if node.value is None:
            return False
        try:
            return self._start_backup(node, demote) is not None
        except PoolExhaustedError:
            return False

    def _maybe_backup_selective(self, nodes: list[TreeNode], keep: TreeNode | None = None) -> None:
        """Back up the `nodes` hit often enough (selective write-through). `keep`, the end of a path
        being matched, holds a host reference meanwhile: their room in L2 must not come from it."""
        if self.config.write_policy is not WritePolicy.WRITE_THROUGH_SELECTIVE:
            return
        due = [n for n in nodes if n.hit_count >= self.config.backup_after_hits]
        if not due:
            return
        if keep is not None:
            self._add_host_ref(keep, +1)
        try:
            for n in due:
                self._try_backup(n)
        finally:
            if keep is not None:
                self._add_host_ref(keep, -1)

    def _start_backup(self, node: TreeNode, demote: bool) -> Operation | None:
        if node.host_value is not None or node.id in self._busy:
            return None
        self._add_lock(node, +1)  # making room in L2 may cascade: keep this node meanwhile
        try:
            host_idx = self._alloc_host(len(node.key))
        except PoolExhaustedError:
            self._add_lock(node, -1)
            raise
        transfers = []
        if node.mamba_value is not None:
            slot = self._alloc_host_state()
            if slot is not None:
                transfers.append(PoolTransfer("mamba", slot, node.mamba_value))
        op = Operation(OpKind.BACKUP, [Segment(node, node.value, host_idx)], transfers,
                       locked=node, demote_on_done=demote, swa_nodes=[node] if node.swa else [])
        self._submit(op)
        return op

    # ========================================================================== load back
    def load_back(self, node: TreeNode) -> Operation | None:
        """Bring onto L1 everything `node` needs to serve as a device match end: the full KV of
        the path from the first node not on device down to `node`, its mamba state, the SWA
        window. `node` must be a valid match end on device or host (use `best_match_node`).
        None when nothing is missing or a load of that path is already in flight."""
        self._check_node(node)
        if node.parent is None:
            return None
        if not self.valid_end(node, "any"):
            raise InvalidAnchorError(f"{node!r} is not a match end for every component "
                                     "(anchor load-back at best_match_node)")
        path = []
        top = node
        while top.parent is not None and top.value is None:
            path.append(top)
            top = top.parent
        path.reverse()
        if any(n.host_value is None for n in path):
            raise InvalidAnchorError(f"{node!r}: a node between it and the device has no L2 data")
        need_state = self.config.has("mamba") and node.mamba_value is None
        swa_nodes = []
        if self.config.sidecar == "swa":
            covered, n = 0, node
            while n.parent is not None and covered < self.config.swa_window:
                if not n.swa:
                    swa_nodes.append(n)
                covered += len(n.key)
                n = n.parent
        if any(n.id in self._busy for n in path + swa_nodes + [node]):
            return None
        if not path and not need_state and not swa_nodes:
            return None
        n_tokens = sum(len(n.key) for n in path)
        swa_tokens = sum(len(n.key) for n in swa_nodes)
        locked = top if top.parent is not None else None
        # protect the device ancestor and the L2 path before making room: eviction may run
        if locked is not None:
            self._add_lock(locked, +1)
        self._add_host_ref(node, +1)
        dev = None
        try:
            self._make_room_device(n_tokens, swa_tokens, evict=True)
            dev = self.device_kv.allocator.alloc(n_tokens)
            state = self._alloc_state(evict=True) if need_state else None
        except PoolExhaustedError:
            if dev is not None:
                self.device_kv.allocator.free(dev)
            if locked is not None:
                self._add_lock(locked, -1)
            self._add_host_ref(node, -1)
            raise
        segments, off = [], 0
        for n in path:
            segments.append(Segment(n, dev[off : off + len(n.key)], n.host_value))
            off += len(n.key)
        transfers = [PoolTransfer("mamba", node.mamba_host.host_indices, state)] if need_state else []
        op = Operation(OpKind.LOAD, segments, transfers, anchor=node, swa_nodes=swa_nodes,
                       locked=locked, host_refed=node)
        self._submit(op)
        return op

    # ================================================================ operations and poll
    def _submit(self, op: Operation, jobs: list[CopyJob] | None = None) -> None:
        jobs = self._copy_jobs(op) if jobs is None else jobs
        self.ops[op.id] = op
        if op.kind in (OpKind.BACKUP, OpKind.LOAD):  # ops that set node values when acknowledged
            for n in op.nodes():
                self._busy[n.id] = op
        self.executor.submit(op, jobs)

    def _copy_jobs(self, op: Operation) -> list[CopyJob]:
        """The copies of `op`: one job for its KV, one per pool transfer (resolved afresh)."""
        dev_idx = [s.device for s in op.segments]
        host_idx = [s.host for s in op.segments]
        dev = torch.cat(dev_idx) if dev_idx else self._empty_indices()
        host = torch.cat(host_idx) if host_idx else torch.empty(0, dtype=INDEX_DTYPE)
        resolved = resolve(op.pool_transfers, self.executor.copy_device)
        if op.kind is OpKind.BACKUP:
            src, dst, s_idx, d_idx = self.device_kv, self.host_kv, dev, host
            s_state, d_state = self.device_state, self.host_state
            pick = lambda t: (t.device_indices, t.host_indices)  # noqa: E731
        else:
            src, dst, s_idx, d_idx = self.host_kv, self.device_kv, host, dev
            s_state, d_state = self.host_state, self.device_state
            pick = lambda t: (t.host_indices, t.device_indices)  # noqa: E731

        def kv_run():
            if d_idx.numel():
                copy_kv(src, s_idx, dst, d_idx)

        def kv_poison():
            if d_idx.numel():
                dst.fill_pages(d_idx, POISON)

        jobs = [CopyJob("kv", kv_run, kv_poison)]
        for part, t in zip(op.parts[1:], resolved, strict=False):
            s, d = pick(t)

            def run(s=s, d=d):
                for a, b in zip(s.tolist(), d.tolist(), strict=True):  # row copies: async and safe into pinned memory
                    d_state.data[b].copy_(s_state.data[a], non_blocking=True)

            def poison(d=d):
                d_state.data[d.to(d_state.data.device).long()] = POISON

            jobs.append(CopyJob(part, run, poison))
        return jobs

    def poll(self) -> list[Operation]:
        """Acknowledge every operation whose parts have all finished: apply what it did, or,
        if a part failed, release everything it held. Returns the operations finished."""
        finished = []
        for op in list(self.ops.values()):
            if op.kind is OpKind.PREFETCH:  # ends through prefetch_progress / abort, then drains
                if op.state is OpState.DRAINING and self._drain(op):
                    finished.append(op)
                continue
            st = self.executor.status(op.id)
            if not st or PartStatus.PENDING in st.values():
                continue  # never finish while any part (a pool transfer too) is in flight (X2)
            if op.kind is OpKind.STORE:
                self._finish(op, OpState.DONE if all(s is PartStatus.DONE for s in st.values()) else OpState.FAILED)
            elif all(s is PartStatus.DONE for s in st.values()):
                self._ack(op)
            else:
                self._release(op, OpState.FAILED)
            finished.append(op)
        return finished

    def _finish(self, op: Operation, state: OpState) -> None:
        op.state = state
        del self.ops[op.id]
        if op.prefetch is not None and self._prefetches.get(op.prefetch.request_id) is op:
            del self._prefetches[op.prefetch.request_id]
        for n in op.nodes():
            if self._busy.get(n.id) is op:
                del self._busy[n.id]
        self.executor.forget(op.id)
        if op.locked is not None:
            self._add_lock(op.locked, -1)
        if op.host_refed is not None:
            self._add_host_ref(op.host_refed, -1)

    def _ack(self, op: Operation) -> None:
        if op.kind is OpKind.BACKUP:
            for s in op.segments:
                s.node.host_value = s.host
            for t in op.pool_transfers:
                op.segments[-1].node.mamba_host = t  # the record itself: it must still be intact
            for n in op.swa_nodes:
                n.swa_host = True
        else:
            for s in op.segments:
                s.node.value = s.device
            for t in op.pool_transfers:
                op.anchor.mamba_value = t.device_indices
            for n in op.swa_nodes:
                n.swa = True
        self._finish(op, OpState.DONE)
        self.book.touch(*[s.node for s in op.segments], *op.swa_nodes)
        if op.demote_on_done:
            node = op.segments[-1].node
            if self._nodes.get(node.id) is node and device_evictable(node):
                self._drop_device(node)
                self._cascade(node)

    def _owned_slots(self, op: Operation) -> list[tuple[str, torch.Tensor]]:
        """(pool name, slots) an in-flight op owns: the destinations it writes before handing them
        to nodes (R1 counts them; a failed op frees them)."""
        if op.kind is OpKind.BACKUP:
            return ([("host_kv", s.host) for s in op.segments]
                    + [("host_state", t.host_indices) for t in op.pool_transfers])
        if op.kind is OpKind.LOAD:
            return ([("device_kv", s.device) for s in op.segments]
                    + [("device_state", t.device_indices) for t in op.pool_transfers])
        if op.kind is OpKind.PREFETCH:
            return ([("host_kv", self.prefetch_owned_host(op))]
                    + [("host_state", t.host_indices) for t in op.pool_transfers])
        return []

    def _release(self, op: Operation, state: OpState) -> None:
        """Free every slot `op` allocated and drop its lock and host reference."""
        pools = {"device_kv": self.device_kv, "host_kv": self.host_kv,
                 "device_state": self.device_state, "host_state": self.host_state}
        for name, slots in self._owned_slots(op):
            pools[name].allocator.free(slots)
        self._finish(op, state)
        self.book.touch(*[s.node for s in op.segments])
        for s in op.segments:
            if self._nodes.get(s.node.id) is s.node:
                self._cascade(s.node)

    # ============================================================================ queries
    def nodes(self) -> list[TreeNode]:
        """Every attached node except the root."""
        return [n for n in self._nodes.values() if n.parent is not None]

    def caller_locks(self) -> dict[int, int]:
        return {k: v for k, v in self._locks.items() if v}

    def check_invariants(self, check_data: bool = False) -> list:
        """Every invariant of DESIGN §3 that applies, as a list of violations (empty when sound).
        `check_data` also reads every page and state back (D1; needs data written by `refcache.data`)."""
        from .invariants import check_all

        return check_all(self.snapshot(with_data=check_data))

    def snapshot(self, with_data: bool = False):
        """A tensor-free description of the tree, pools and operations (see `refcache.snapshot`)."""
        from .snapshot import take_snapshot

        return take_snapshot(self, with_data=with_data)

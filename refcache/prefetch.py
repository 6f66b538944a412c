"""The L3 tier: write-back to storage and prefetch from it, with TP-rank agreement.

A prefetch is an operation whose parts are its pages (one L3 read each) and its pool transfers
(the mamba state of the prefix it ends). The request waiting on it asks `prefetch_progress`;
the cache terminates the prefetch only when the policy allows it *and* no pool transfer is in
flight (bug class 1), with every TP rank agreeing. Terminating inserts the leading pages that
arrived under `last_host_node`; slots whose reads are still running are freed once those reads
settle (the op drains), never while something may still write into them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .config import PrefetchPolicy
from .errors import InvalidAnchorError, PoolExhaustedError, UnknownOperationError
from .node import TreeNode
from .pages import ROOT_HASH, page_hashes, prefetch_length
from .pools import INDEX_DTYPE
from .tp import agree_hit_length, agree_termination
from .transfer import CopyJob, Operation, OpKind, OpState, PartStatus, PoolTransfer

if TYPE_CHECKING:
    from .cache import HiCache


@dataclass(eq=False)
class PrefetchState:
    """What a prefetch operation fetches and what it still owns."""

    request_id: str
    key: tuple[int, ...]
    hashes: list[int]
    host: torch.Tensor  # L2 slots of every page; those not yet handed to nodes are the op's
    handed: int = 0  # leading pages whose slots now belong to tree nodes
    deadline: int = 0
    aborted: bool = False


class PrefetchMixin:
    """Storage write-back, prefetch, progress and abort for `HiCache`."""

    # ------------------------------------------------------------------------- L2 -> L3
    def write_backup_storage(self: HiCache, node: TreeNode) -> Operation | None:
        """Start writing `node`'s L2 pages (and its L2 mamba state) to L3, keyed by chain hash."""
        self._check_node(node)
        if self.storage is None:
            return None
        if node.host_value is None:
            raise InvalidAnchorError(f"{node!r} has no L2 data to write to storage")
        if node.id in self._busy:
            return None
        ps = self.page_size
        jobs_pages = list(zip(node.hashes, node.host_value.view(-1, ps), strict=True))
        transfers = []
        if node.mamba_host is not None and self.state_storage is not None:
            transfers.append(PoolTransfer("mamba", node.mamba_host.host_indices, None))
        op = Operation(OpKind.STORE, [], transfers, host_refed=node, anchor=node,
                       kv_parts=[f"page:{i}" for i in range(len(jobs_pages))])
        self._add_host_ref(node, +1)
        storage, state_storage, host_kv, host_state = self.storage, self.state_storage, self.host_kv, self.host_state
        end_hash = node.hashes[-1]
        jobs = []
        for part, (h, slots) in zip(op.kv_parts, jobs_pages, strict=True):
            jobs.append(CopyJob(part, lambda h=h, s=slots: storage.put(h, host_kv.read_pages(s)[0]) is not False))
        for part, t in zip(op.parts[len(op.kv_parts):], transfers, strict=True):
            jobs.append(CopyJob(part, lambda t=t: state_storage.put(
                end_hash, host_state.data[int(t.host_indices.view(-1)[0])].clone()) is not False))
        self._submit(op, jobs)
        return op

    # ------------------------------------------------------------------------- L3 -> L2
    def prefetch(self: HiCache, request_id: str, last_host_node: TreeNode, tokens) -> Operation | None:
        """Fetch from L3 the pages of `tokens` (the continuation past `last_host_node`) that
        storage holds, into L2; they join the tree under `last_host_node` on termination.

        L2 is made room for by eviction; when even that cannot fit the run, the run is truncated
        to the page-aligned size that fits, or dropped below `prefetch_threshold`. Returns None
        when nothing is worth fetching."""
        node = self._check_node(last_host_node)
        if request_id in self._prefetches:
            raise ValueError(f"request {request_id!r} already has a prefetch in flight")
        if node.parent is not None and node.value is None and node.host_value is None:
            raise InvalidAnchorError(f"{node!r} holds no data: not a last_host_node")
        key = self._key(tokens, truncate=True)
        if self.storage is None or not key:
            return None
        ps, threshold = self.page_size, self.config.prefetch_threshold
        hashes = page_hashes(node.hashes[-1] if node.hashes else ROOT_HASH, key, ps)
        hit = agree_hit_length(self.ranks, self.storage.exists(hashes) * ps)
        if hit < max(threshold, 1):
            return None
        if node.parent is not None:
            self._add_host_ref(node, +1)  # keep the anchor while making room in L2
        try:
            try:
                host = self._alloc_host(hit)
            except PoolExhaustedError:
                room = self.host_kv.allocator.available() + self.book.size("full", "host", "evictable")
                hit = prefetch_length(hit, room, ps, threshold)
                if hit == 0:
                    raise
                host = self._alloc_host(hit)
        except PoolExhaustedError:
            if node.parent is not None:
                self._add_host_ref(node, -1)
            return None
        n_pages = hit // ps
        transfers = []
        end_hash = hashes[n_pages - 1]
        if self.config.has("mamba") and self.state_storage is not None and self.state_storage.exists([end_hash]):
            slot = self._alloc_host_state()
            if slot is not None:
                transfers.append(PoolTransfer("mamba", slot, None))
        op = Operation(OpKind.PREFETCH, [], transfers, host_refed=node if node.parent is not None else None,
                       anchor=node, kv_parts=[f"page:{i}" for i in range(n_pages)])
        op.prefetch = PrefetchState(request_id, key[:hit], hashes[:n_pages], host,
                                    deadline=self._clock + self.config.prefetch_timeout_steps)
        storage, state_storage, host_kv, host_state = self.storage, self.state_storage, self.host_kv, self.host_state

        def read_page(h: int, slots: torch.Tensor) -> bool:
            page = storage.get(h)
            if page is None:
                return False  # a miss (or a torn/corrupt page) is a failed part, never wrong data
            host_kv.write_pages(slots, page.unsqueeze(0))
            return True

        def read_state(t: PoolTransfer) -> bool:
            state = state_storage.get(end_hash)
            if state is None:
                return False
            host_state.data[int(t.host_indices.view(-1)[0])] = state
            return True

        jobs = [CopyJob(part, lambda h=h, s=host[i * ps:(i + 1) * ps]: read_page(h, s),
                        lambda s=host[i * ps:(i + 1) * ps]: host_kv.fill_pages(s, float("nan")))
                for i, (part, h) in enumerate(zip(op.kv_parts, op.prefetch.hashes, strict=True))]
        jobs += [CopyJob(part, lambda t=t: read_state(t)) for part, t in zip(op.parts[n_pages:], transfers, strict=True)]
        self._prefetches[request_id] = op
        self._submit(op, jobs)
        return op

    def prefetch_progress(self: HiCache, request_id: str) -> bool:
        """Whether the request may stop waiting. When it may, the prefetch is terminated here:
        the leading pages that arrived join the tree and the rest is released."""
        op = self._prefetches.get(request_id)
        if op is None:
            raise UnknownOperationError(f"no prefetch in flight for request {request_id!r}")
        now = self._tick()
        st = self.executor.status(op.id)
        settled = all(st.get(p) is not PartStatus.PENDING for p in op.parts)
        policy = self.config.prefetch_policy
        if policy is PrefetchPolicy.BEST_EFFORT:
            can = True
        elif policy is PrefetchPolicy.WAIT_COMPLETE:
            can = settled
        else:
            can = settled or now >= op.prefetch.deadline
        pool_in_flight = any(st.get(p) is PartStatus.PENDING for p in op.parts[len(op.kv_parts):])
        if pool_in_flight:
            can = False  # never terminate while a pool transfer is in flight (X2)
        if not agree_termination(self.ranks, can, op.prefetch.aborted):
            return False
        if pool_in_flight:  # another rank terminated: this rank gives up its part and drains
            self._prefetches.pop(request_id)
            op.prefetch.aborted = True
            self._detach_prefetch(op)
            return True
        self._terminate_prefetch(op, st)
        return True

    def abort_prefetch(self: HiCache, request_id: str) -> None:
        """The request is gone: release the anchor and every slot, now or once its reads settle."""
        op = self._prefetches.pop(request_id, None)
        if op is None:
            raise UnknownOperationError(f"no prefetch in flight for request {request_id!r}")
        op.prefetch.aborted = True
        self._detach_prefetch(op)

    def _terminate_prefetch(self: HiCache, op: Operation, st: dict) -> None:
        pf = op.prefetch
        ps = self.page_size
        n = 0
        while n < len(pf.hashes) and st.get(op.kv_parts[n]) is PartStatus.DONE:
            n += 1
        del self._prefetches[pf.request_id]
        end = self._insert_host(op.anchor, pf, n)
        for t in list(op.pool_transfers):
            if (end is not None and n == len(pf.hashes) and end.mamba_host is None and end.host_value is not None
                    and st.get(op.parts[len(op.kv_parts)]) is PartStatus.DONE):
                end.mamba_host = t  # the record itself, as a backup would leave it
                self.book.touch(end)
                op.pool_transfers.remove(t)
                op.fingerprints = [x.fingerprint() for x in op.pool_transfers]
        pf.key = pf.key[: pf.handed * ps]
        self._detach_prefetch(op)

    def _insert_host(self: HiCache, anchor: TreeNode, pf: PrefetchState, n_pages: int) -> TreeNode | None:
        """Hang the first `n_pages` fetched pages under `anchor` as host-only nodes; pages the tree
        already holds keep the tree's copy. Returns the node ending the inserted prefix."""
        ps = self.page_size
        key = pf.key[: n_pages * ps]
        node, pos, now = anchor, 0, self._tick()
        for child, start, m in self._descend(anchor, key, now):
            slots = pf.host[start:start + m]
            if child.value is None and child.host_value is None:  # data-less interior: it takes the pages
                child.host_value = slots
                child.swa_host = self.config.sidecar == "swa"
                self.book.touch(child)
            else:
                self._free_host_slots(slots)  # the tree already holds these pages
            node, pos = child, start + m
        if not key:
            return None
        if pos < len(key):
            leaf = self._add_leaf(node, key[pos:], pf.hashes[pos // ps:n_pages], now)
            leaf.host_value = pf.host[pos:len(key)]
            leaf.swa_host = self.config.sidecar == "swa"
            self.book.touch(leaf)
            node = leaf
        pf.handed = n_pages
        return node

    def _free_host_slots(self: HiCache, slots: torch.Tensor) -> None:
        if slots.numel():
            self.host_kv.allocator.free(slots)

    def _detach_prefetch(self: HiCache, op: Operation) -> None:
        """The request no longer waits: drop the anchor, then drain (free what is settled)."""
        if op.host_refed is not None:
            self._add_host_ref(op.host_refed, -1)
            op.host_refed = None
        op.state = OpState.DRAINING
        self._drain(op)

    def _drain(self: HiCache, op: Operation) -> bool:
        """Free a detached prefetch's leftover slots once no part may still write into them."""
        st = self.executor.status(op.id)
        if any(s is PartStatus.PENDING for s in st.values()):
            return False
        pf = op.prefetch
        ps = self.page_size
        self._free_host_slots(pf.host[pf.handed * ps:])
        pf.host = pf.host[: pf.handed * ps]
        for t in op.pool_transfers:
            self.host_state.allocator.free(t.host_indices)
        op.pool_transfers = []
        op.fingerprints = []
        self._finish(op, OpState.ABORTED if pf.aborted else OpState.DONE)
        return True

    def prefetch_owned_host(self: HiCache, op: Operation) -> torch.Tensor:
        """L2 slots a prefetch still owns (for accounting)."""
        if op.prefetch is None:
            return torch.empty(0, dtype=INDEX_DTYPE)
        return op.prefetch.host[op.prefetch.handed * self.page_size:]

"""Asynchronous transfers: operations, pool-transfer records, and the two executors.

An operation moves KV between tiers and carries *pool transfers*: sidecar copies of other
components (the mamba state slot) that ride with the KV. Each part completes on its own; the
cache acknowledges an operation only when every part is done (X2).

Executors run the copies. `DeterministicExecutor` (CPU) performs nothing until the caller says
which part completes or fails, so tests choose the interleaving. `CudaExecutor` issues the
copies on a side stream and reports a part done when its CUDA event has fired.

Records held by tree nodes are never mutated here: `resolve` builds fresh records whose indices
are in the form the copy uses (X1; bug class 3 is the in-place version).
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .pools import canonical_device

if TYPE_CHECKING:
    from .node import TreeNode

COPY_INDEX_DTYPE = torch.int32
"""Index dtype the copy paths take (the stored form is int64); resolution converts."""


@dataclass(eq=False)
class PoolTransfer:
    """A sidecar copy between a host pool slot and a device pool slot of one named pool."""

    name: str
    host_indices: torch.Tensor | None
    device_indices: torch.Tensor | None

    def fingerprint(self) -> tuple:
        """Values, dtype and device of both index tensors: what X1 compares over time."""
        def fp(t):
            return None if t is None else (tuple(t.tolist()), str(t.dtype), t.device.type)
        return (self.name, fp(self.host_indices), fp(self.device_indices))


class OpKind(str, enum.Enum):
    BACKUP = "backup"  # L1 -> L2
    LOAD = "load"  # L2 -> L1
    PREFETCH = "prefetch"  # L3 -> L2
    STORE = "store"  # L2 -> L3


class OpState(str, enum.Enum):
    IN_FLIGHT = "in_flight"
    DRAINING = "draining"  # a prefetch its request no longer waits on; freed once its reads settle
    DONE = "done"
    FAILED = "failed"
    ABORTED = "aborted"


@dataclass(eq=False)
class Segment:
    """The part of an operation that belongs to one node: its device and host slots."""

    node: TreeNode
    device: torch.Tensor | None
    host: torch.Tensor | None


_op_ids = itertools.count(1)


@dataclass(eq=False)
class Operation:
    """One asynchronous transfer and everything it holds until it is acknowledged."""

    kind: OpKind
    segments: list[Segment]
    pool_transfers: list[PoolTransfer] = field(default_factory=list)
    locked: TreeNode | None = None  # node whose root path this op holds a lock on
    host_refed: TreeNode | None = None  # node whose root path this op holds a host_ref on
    anchor: TreeNode | None = None
    demote_on_done: bool = False  # write-back eviction waiting for this backup
    swa_nodes: list = field(default_factory=list)  # nodes whose SWA KV this op moves
    kv_parts: list[str] = field(default_factory=lambda: ["kv"])  # prefetch/store: one part per page
    prefetch: object = None  # PrefetchState of a prefetch
    id: int = field(default_factory=lambda: next(_op_ids))
    state: OpState = OpState.IN_FLIGHT
    fingerprints: list[tuple] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.fingerprints = [t.fingerprint() for t in self.pool_transfers]

    @property
    def parts(self) -> list[str]:
        """Names of the independently completing parts: the KV ('kv', or one per page) then one
        per pool transfer."""
        return self.kv_parts + [f"pool:{i}:{t.name}" for i, t in enumerate(self.pool_transfers)]

    def nodes(self) -> list[TreeNode]:
        """Every node this op works on (segments, SWA nodes, anchor), each once."""
        out: dict[int, TreeNode] = {}
        for n in [s.node for s in self.segments] + list(self.swa_nodes) + [self.anchor]:
            if n is not None:
                out.setdefault(n.id, n)
        return list(out.values())


@dataclass
class CopyJob:
    """One part's copy: a callable that moves the bytes, run by the executor. It returns False
    (or raises a StorageError) when the part failed, e.g. an L3 miss or a corrupt page."""

    part: str
    run: Callable[[], None]
    poison: Callable[[], None] | None = None


def resolve(transfers: list[PoolTransfer], device: torch.device) -> list[PoolTransfer]:
    """Fresh records with both index tensors in copy form (`COPY_INDEX_DTYPE` on `device`).

    The input records are left untouched: tree nodes may hold them (X1).
    """
    def conv(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device=device, dtype=COPY_INDEX_DTYPE)

    return [PoolTransfer(t.name, conv(t.host_indices), conv(t.device_indices)) for t in transfers]


class PartStatus(str, enum.Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


def run_job(job: CopyJob) -> PartStatus:
    """Run one part; a False return or a storage fault makes it a failed part."""
    from .errors import StorageError

    try:
        ok = job.run()
    except StorageError:
        return PartStatus.FAILED
    return PartStatus.FAILED if ok is False else PartStatus.DONE


class Executor:
    """Runs the copies of submitted operations and reports each part's status."""

    copy_device: torch.device

    def submit(self, op: Operation, jobs: list[CopyJob]) -> None:
        raise NotImplementedError

    def status(self, op_id: int) -> dict[str, PartStatus]:
        raise NotImplementedError

    def forget(self, op_id: int) -> None:
        """Drop an acknowledged or aborted operation's bookkeeping."""
        raise NotImplementedError

    def pending_ops(self) -> set[int]:
        """Ids of operations with at least one part not yet done or failed."""
        raise NotImplementedError


class DeterministicExecutor(Executor):
    """CPU executor in which the caller completes or fails each part, in any order.

    Destinations are poisoned on submit, so data read before its copy completes is wrong
    and the data oracle notices.
    """

    def __init__(self, copy_device: torch.device | str = "cpu", auto_complete: bool = False):
        self.copy_device = canonical_device(copy_device)
        self.auto_complete = auto_complete
        self._jobs: dict[int, dict[str, CopyJob]] = {}
        self._status: dict[int, dict[str, PartStatus]] = {}

    def submit(self, op: Operation, jobs: list[CopyJob]) -> None:
        self._jobs[op.id] = {j.part: j for j in jobs}
        self._status[op.id] = {j.part: PartStatus.PENDING for j in jobs}
        for j in jobs:
            if j.poison is not None:
                j.poison()
        if self.auto_complete:
            for j in jobs:
                self.complete(op.id, j.part)

    def status(self, op_id: int) -> dict[str, PartStatus]:
        return dict(self._status.get(op_id, {}))

    def forget(self, op_id: int) -> None:
        """Drop a finished op's bookkeeping. Parts still pending stay: a copy already issued cannot
        be recalled and still lands when completed, as on a GPU (X2 reports such an op)."""
        if PartStatus.PENDING in self._status.get(op_id, {}).values():
            return
        self._jobs.pop(op_id, None)
        self._status.pop(op_id, None)

    def pending_ops(self) -> set[int]:
        return {i for i, st in self._status.items() if PartStatus.PENDING in st.values()}

    def pending_parts(self) -> list[tuple[int, str]]:
        """(op id, part) for every part still pending, in submission order."""
        return [(i, p) for i, st in self._status.items() for p, s in st.items() if s is PartStatus.PENDING]

    def complete(self, op_id: int, part: str | None = None) -> None:
        """Run and finish one pending part (or every pending part of the op when `part` is None)."""
        st = self._status.get(op_id)
        if st is None:
            raise KeyError(f"no operation {op_id} in the executor")
        parts = [part] if part is not None else [p for p, s in st.items() if s is PartStatus.PENDING]
        for p in parts:
            if st.get(p) is not PartStatus.PENDING:
                raise KeyError(f"part {p!r} of operation {op_id} is not pending")
            st[p] = run_job(self._jobs[op_id][p])
        if self.copy_device.type == "cuda":  # "complete" means landed: the copies run async on the stream
            torch.cuda.current_stream(self.copy_device).synchronize()

    def fail(self, op_id: int, part: str = "kv") -> None:
        """Fail one pending part: its copy never happens."""
        st = self._status.get(op_id)
        if st is None or st.get(part) is not PartStatus.PENDING:
            raise KeyError(f"part {part!r} of operation {op_id} is not pending")
        st[part] = PartStatus.FAILED

    def complete_all(self) -> None:
        for op_id, part in self.pending_parts():
            self.complete(op_id, part)


class CudaExecutor(Executor):
    """Issues each part's copies on a dedicated copy stream and tracks it with a CUDA event.

    The copy stream first waits for the compute stream, so copies see finished KV; host
    memory is pinned, so `non_blocking` copies are truly asynchronous.
    """

    def __init__(self, device: torch.device | str = "cuda"):
        self.copy_device = canonical_device(device)
        self.stream = torch.cuda.Stream(device=self.copy_device)
        self._events: dict[int, dict[str, torch.cuda.Event]] = {}
        self._jobs: dict[int, list[CopyJob]] = {}
        self._failed: dict[int, set[str]] = {}

    def submit(self, op: Operation, jobs: list[CopyJob]) -> None:
        self.stream.wait_stream(torch.cuda.current_stream(self.copy_device))
        events = {}
        with torch.cuda.stream(self.stream):
            for j in jobs:
                if run_job(j) is PartStatus.FAILED:
                    self._failed.setdefault(op.id, set()).add(j.part)
                ev = torch.cuda.Event()
                ev.record(self.stream)
                events[j.part] = ev
        self._events[op.id] = events
        self._jobs[op.id] = jobs  # keep index tensors alive until the copies have run

    def status(self, op_id: int) -> dict[str, PartStatus]:
        failed = self._failed.get(op_id, set())
        return {p: (PartStatus.PENDING if not ev.query() else PartStatus.FAILED if p in failed else PartStatus.DONE)
                for p, ev in self._events.get(op_id, {}).items()}

    def forget(self, op_id: int) -> None:
        self._events.pop(op_id, None)
        self._jobs.pop(op_id, None)
        self._failed.pop(op_id, None)

    def pending_ops(self) -> set[int]:
        return {i for i, evs in self._events.items() if not all(e.query() for e in evs.values())}

    def pending_parts(self) -> list[tuple[int, str]]:
        """(op id, part) for every part whose copies the GPU has not finished, in submission order."""
        return [(i, p) for i, evs in self._events.items() for p, e in evs.items() if not e.query()]

    def wait(self, op_id: int, part: str) -> None:
        """Block until one part's copies are done (the GPU decides when)."""
        self._events[op_id][part].synchronize()

    def complete_all(self) -> None:
        """Block until every submitted copy is done."""
        self.stream.synchronize()

    def synchronize(self) -> None:
        self.stream.synchronize()

"""A pure-Python, tensor-free picture of a cache: what invariants, models and reports read.

Slot tensors become tuples of slot numbers; records become their fingerprints; with
`with_data`, each node also says whether its pages and states hold the expected bytes (D1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .bookkeeping import contribution, device_evictable, host_evictable

if TYPE_CHECKING:
    from .cache import HiCache


def _slots(t) -> tuple[int, ...] | None:
    return None if t is None else tuple(t.tolist())


@dataclass(frozen=True)
class NodeSnap:
    id: int
    parent: int | None
    key: tuple[int, ...]
    children: tuple[tuple[tuple[int, ...], int], ...]  # (first page, child id)
    device: tuple[int, ...] | None
    host: tuple[int, ...] | None
    mamba: int | None
    mamba_host: int | None
    mamba_host_form: tuple | None  # (dtype, device type) of the node's L2 mamba record
    swa: bool
    swa_host: bool
    lock_ref: int
    host_ref: int
    last_access: int
    hashes: tuple[int, ...]
    data_ok: tuple[bool, bool, bool] | None = None  # device pages, host pages, mamba states

    @property
    def tiers(self) -> str:
        return ("D" if self.device is not None else "") + ("H" if self.host is not None else "")


@dataclass(frozen=True)
class OpSnap:
    id: int
    kind: str
    segments: tuple[tuple[int, tuple[int, ...] | None, tuple[int, ...] | None], ...]
    pool_transfers: tuple[tuple[str, tuple[int, ...] | None, tuple[int, ...] | None], ...]
    records_intact: bool
    locked: int | None
    host_refed: int | None
    anchor: int | None
    swa_nodes: tuple[int, ...]
    parts: tuple[tuple[str, str], ...]  # (part, executor status)
    state: str = "in_flight"
    owned: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (pool, slots) the op owns until it ends
    kv_parts: int = 1
    aborted: bool = False


@dataclass(frozen=True)
class PoolSnap:
    name: str
    capacity: int
    page_size: int
    free_pages: tuple[int, ...]
    allocated_pages: frozenset[int]


@dataclass(frozen=True)
class Snapshot:
    page_size: int
    components: tuple[str, ...]
    swa_window: int
    write_policy: str
    root: int
    nodes: dict[int, NodeSnap]
    registered: frozenset[int]
    ops: tuple[OpSnap, ...]
    pools: dict[str, PoolSnap]
    caller_pages: frozenset[int]
    caller_states: frozenset[int]
    caller_swa: int
    swa_capacity: int
    caller_locks: dict[int, int]
    locked_with_state: frozenset[int]
    device_leaves: frozenset[int]
    host_leaves: frozenset[int]
    sizes: dict[tuple[str, str, str], int]
    derived_sizes: dict[tuple[str, str, str], int]
    derived_device_leaves: frozenset[int]
    derived_host_leaves: frozenset[int]
    executor_pending: frozenset[int]
    storage: dict[str, tuple[int, int | None]] = field(default_factory=dict)  # name -> (pages stored, capacity)
    extra: dict = field(default_factory=dict)

    @property
    def sidecar(self) -> str | None:
        return self.components[1] if len(self.components) > 1 else None

    def children(self, node_id: int) -> list[NodeSnap]:
        return [self.nodes[c] for _, c in self.nodes[node_id].children if c in self.nodes]


def take_snapshot(cache: HiCache, with_data: bool = False) -> Snapshot:
    from . import data as data_mod

    nodes: dict[int, NodeSnap] = {}
    derived = {}
    dev_leaves, host_leaves = set(), set()
    stack = [cache.root]
    while stack:
        n = stack.pop()
        stack.extend(n.children.values())
        rec = n.mamba_host
        ok = data_mod.node_data_ok(cache, n) if with_data and n.parent is not None else None
        nodes[n.id] = NodeSnap(
            id=n.id, parent=None if n.parent is None else n.parent.id, key=tuple(n.key),
            children=tuple((k, c.id) for k, c in n.children.items()),
            device=_slots(n.value), host=_slots(n.host_value),
            mamba=None if n.mamba_value is None else int(n.mamba_value.view(-1)[0]),
            mamba_host=None if rec is None else int(rec.host_indices.view(-1)[0]),
            mamba_host_form=None if rec is None else (str(rec.host_indices.dtype), rec.host_indices.device.type),
            swa=n.swa, swa_host=n.swa_host, lock_ref=n.lock_ref, host_ref=n.host_ref,
            last_access=n.last_access, hashes=tuple(n.hashes), data_ok=ok)
        for k, v in contribution(n).items():
            derived[k] = derived.get(k, 0) + v
        if device_evictable(n):
            dev_leaves.add(n.id)
        if host_evictable(n):
            host_leaves.add(n.id)
    ops = []
    for op in cache.ops.values():
        st = cache.executor.status(op.id)
        ops.append(OpSnap(
            id=op.id, kind=op.kind.value,
            segments=tuple((s.node.id, _slots(s.device), _slots(s.host)) for s in op.segments),
            pool_transfers=tuple((t.name, _slots(t.host_indices), _slots(t.device_indices))
                                 for t in op.pool_transfers),
            records_intact=[t.fingerprint() for t in op.pool_transfers] == op.fingerprints,
            locked=None if op.locked is None else op.locked.id,
            host_refed=None if op.host_refed is None else op.host_refed.id,
            anchor=None if op.anchor is None else op.anchor.id,
            swa_nodes=tuple(n.id for n in op.swa_nodes),
            parts=tuple((p, st[p].value if p in st else "unknown") for p in op.parts),
            state=op.state.value, owned=tuple((pool, _slots(t)) for pool, t in cache._owned_slots(op)), kv_parts=len(op.kv_parts),
            aborted=bool(op.prefetch is not None and op.prefetch.aborted)))
    pools = {}
    for key, pool in (("device_kv", cache.device_kv), ("host_kv", cache.host_kv),
                      ("device_state", cache.device_state), ("host_state", cache.host_state)):
        if pool is not None:
            a = pool.allocator
            pools[key] = PoolSnap(a.name, a.capacity, a.page_size, tuple(a.free_pages()), a.allocated_pages())
    c = cache.config
    return Snapshot(
        page_size=c.page_size, components=c.components, swa_window=c.swa_window,
        write_policy=c.write_policy.value, root=cache.root.id, nodes=nodes,
        registered=frozenset(cache._nodes), ops=tuple(ops), pools=pools,
        caller_pages=frozenset(cache._caller_pages), caller_states=frozenset(cache._caller_states),
        caller_swa=cache._caller_swa, swa_capacity=cache.swa_capacity,
        caller_locks=cache.caller_locks(), locked_with_state=frozenset(cache._locked_with_state),
        device_leaves=frozenset(n.id for n in cache.book.device_leaves),
        host_leaves=frozenset(n.id for n in cache.book.host_leaves),
        sizes={k: v for k, v in cache.book.sizes.items() if v},
        derived_sizes={k: v for k, v in derived.items() if v},
        derived_device_leaves=frozenset(dev_leaves), derived_host_leaves=frozenset(host_leaves),
        executor_pending=frozenset(cache.executor.pending_ops()),
        storage={name: (len(st), st.capacity) for name, st in (("L3 KV", cache.storage), ("L3 mamba", cache.state_storage))
                 if st is not None})

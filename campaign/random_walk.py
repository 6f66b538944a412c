"""A seeded random walk over the cache's operations, checking every invariant after each step.

It drives the public API the way a serving engine would (requests sharing prefixes, locks held
across steps, transfers finishing in any order, failures), so it finds a broken invariant with
the exact step list that reached it. The Hypothesis machines (stateful_tests/) shrink such lists;
this walker is the cheap always-on explorer, and it runs unchanged on CUDA.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from refcache import CacheConfig, DeterministicExecutor, HiCache, PoolExhaustedError, RefCacheError
from refcache.data import pages_ok, write_request
from refcache.invariants import Violation
from refcache.storage import MemoryStorage


@dataclass
class WalkResult:
    steps: int = 0
    violations: list[Violation] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


class RandomWalk:
    """One cache, one RNG, and the callers' state (held locks)."""

    def __init__(self, config: CacheConfig, seed: int, manual_executor: bool | None = None):
        manual = config.torch_device.type == "cpu" if manual_executor is None else manual_executor
        c = config
        page_shape = (c.num_layers, 2, c.page_size, c.num_heads, c.head_dim)
        self.storage = MemoryStorage(c.host_tokens // c.page_size * 2, page_shape, c.dtype)
        self.state_storage = MemoryStorage(c.host_mamba_slots * 2, (c.mamba_state_dim,), c.dtype)
        self.cache = HiCache(config, DeterministicExecutor(copy_device=config.device) if manual else None,
                             storage=self.storage, state_storage=self.state_storage)
        self.requests: list[str] = []
        self._next_request = 0
        self.manual = manual
        self.rng = random.Random(seed)
        self.locks: list = []
        ps = config.page_size
        # a few shared stems so requests overlap, diverge and re-converge
        self.stems = [[self.rng.randrange(50) for _ in range(ps * self.rng.randint(1, 4))] for _ in range(4)]
        self.pages = [[self.rng.randrange(50) for _ in range(ps)] for _ in range(3)]  # suffixes recur

    def _tokens(self) -> list[int]:
        r = self.rng
        toks = list(r.choice(self.stems))
        for _ in range(r.randint(0, 3)):
            toks += r.choice(self.pages)
        return toks

    def step(self) -> str:
        r, c = self.rng, self.cache
        action = r.choices(
            ["insert", "match", "lock", "unlock", "evict", "evict_host", "backup", "load",
             "complete", "fail", "poll", "evict_side", "store", "prefetch", "progress", "abort", "fault"],
            weights=[6, 4, 2, 2, 3, 2, 1, 3, 5, 1, 3, 1, 3, 3, 3, 1, 1])[0]
        try:
            return self._do(action, r, c)
        except PoolExhaustedError as e:
            return f"{action}: pool exhausted ({e})"

    def _do(self, action: str, r: random.Random, c: HiCache) -> str:
        if action == "insert":
            toks = self._tokens()
            idx, slot = write_request(c, toks)
            res = c.insert(toks, idx, slot)
            if res.cached_len:
                c.free_device(idx[: res.cached_len])
            if slot is not None and not res.mamba_slot_used:
                c.free_mamba(slot)
            return f"insert({len(toks)} tokens) -> cached {res.cached_len}"
        if action == "match":
            toks = self._tokens()
            m = c.match_prefix(toks)
            if not pages_ok(c, toks, m.device_indices):
                raise AssertionError("D1: match served pages with wrong bytes")
            return f"match -> device {m.device_len}, host +{m.host_hit_length}"
        nodes = c.nodes()
        if action == "lock" and nodes:
            n = c.lock(r.choice(nodes))
            if n.parent is not None:
                self.locks.append(n)
            return f"lock -> {n!r}"
        if action == "unlock" and self.locks:
            n = self.locks.pop(r.randrange(len(self.locks)))
            c.unlock(n)
            return f"unlock {n!r}"
        if action == "evict":
            return f"evict -> {c.evict(r.choice([c.page_size, 4 * c.page_size, 10**6]))}"
        if action == "evict_host":
            return f"evict_host -> {c.evict_host(r.choice([c.page_size, 10**6]))}"
        if action == "evict_side" and c.config.sidecar:
            n = c.evict_mamba(1) if c.config.sidecar == "mamba" else c.evict_swa(c.page_size * 2)
            return f"evict_{c.config.sidecar} -> {n}"
        if action == "backup":
            cands = [n for n in nodes if n.value is not None]
            if cands:
                op = c.write_backup(r.choice(cands))
                return f"backup -> {op and op.id}"
        if action == "load":
            m = c.match_prefix(self._tokens())
            op = c.load_back(m.best_match_node)
            return f"load_back -> {op and op.id}"
        if action == "store":
            cands = [n for n in nodes if n.host_value is not None]
            if cands:
                op = c.write_backup_storage(r.choice(cands))
                return f"store -> {op and op.id}"
        if action == "prefetch":
            toks = self._tokens()
            m = c.match_prefix(toks)
            rid = f"r{self._next_request}"
            self._next_request += 1
            done = sum(len(n.key) for n in m.last_host_node.path_to_root())
            op = c.prefetch(rid, m.last_host_node, toks[done:])
            if op is not None:
                self.requests.append(rid)
            return f"prefetch {rid} -> {op and op.id}"
        if action in ("progress", "abort") and self.requests:
            rid = r.choice(self.requests)
            if action == "abort":
                c.abort_prefetch(rid)
                self.requests.remove(rid)
                return f"abort {rid}"
            ended = c.prefetch_progress(rid)
            if ended:
                self.requests.remove(rid)
            return f"progress {rid} -> {ended}"
        if action == "fault" and len(self.storage):
            kind = r.choice(["io_error", "torn"])
            self.storage.faults.inject(kind, "get", None, 1)
            return f"fault next storage get: {kind}"
        if action in ("complete", "fail") and self.manual:
            parts = c.executor.pending_parts()
            if parts:
                op_id, part = r.choice(parts)
                getattr(c.executor, action)(op_id, part)
                return f"{action} op {op_id} part {part}"
        if action == "poll" or not self.manual:
            return f"poll -> {[op.id for op in c.poll()]}"
        return f"{action}: nothing to do"


def run_walk(config: CacheConfig, seed: int, steps: int, check_data: bool = True,
             manual_executor: bool | None = None) -> WalkResult:
    """Walk `steps` steps; stop at the first step after which an invariant is broken."""
    w = RandomWalk(config, seed, manual_executor)
    out = WalkResult()
    for i in range(steps):
        try:
            line = w.step()
        except (RefCacheError, AssertionError) as e:
            out.log.append(f"{i}: {type(e).__name__}: {e}")
            out.violations.append(Violation("API", f"step {i} raised {type(e).__name__}: {e}"))
            break
        out.log.append(f"{i}: {line}")
        out.counts[line.split(" ")[0]] = out.counts.get(line.split(" ")[0], 0) + 1
        out.steps = i + 1
        v = w.cache.check_invariants(check_data=check_data)
        if v:
            out.violations = v
            break
    return out


CONFIGS: dict[str, dict] = {
    "full/write_through": dict(write_policy="write_through"),
    "full/selective": dict(write_policy="write_through_selective"),
    "full/write_back": dict(write_policy="write_back"),
    "full/wait_complete": dict(prefetch_policy="wait_complete"),
    "full/timeout": dict(prefetch_policy="timeout"),
    "mamba/wait_complete": dict(components=("full", "mamba"), prefetch_policy="wait_complete", device_mamba_slots=4),
    "mamba/write_through": dict(components=("full", "mamba"), device_mamba_slots=4, host_mamba_slots=6),
    "mamba/write_back": dict(components=("full", "mamba"), write_policy="write_back", device_mamba_slots=4),
    "swa/write_through": dict(components=("full", "swa"), swa_window=4, extra={"device_swa_tokens": 16}),
}


def small_config(name: str, device: str = "cpu") -> CacheConfig:
    """Small pools so that eviction and exhaustion happen all the time."""
    return CacheConfig(page_size=2, device_tokens=24, host_tokens=32, device=device, prefetch_threshold=2,
                       prefetch_timeout_steps=6, **CONFIGS[name])

"""The campaign's rare-event detectors (stateful_tests/events.py): each scenario drives a real
cache into one rare path, step by step as the machines do, and the detector must name it; each
has a twin (or a first step) where the path is not taken and the event must not be recorded, so
every assertion can fail. One scenario runs a real machine's rules through the installed hook."""

from __future__ import annotations

import sys

import pytest
import torch

from refcache import CacheConfig, DeterministicExecutor, HiCache, PoolExhaustedError
from refcache.pages import ROOT_HASH, page_hashes
from refcache.storage import MemoryStorage
from refcache.tp import RankGroup
from stateful_tests import events, machines
from stateful_tests.peer_ranks import PeerRanks, PeerView

PS = 2


class Driver:
    """A stand-in for a machine: a cache and its storages, each step observed the way
    `CacheMachine._step` observes it (snapshot before, snapshot after, the step's text)."""

    def __init__(self, ranks: RankGroup | None = None, **kw):
        cfg = CacheConfig(**{"page_size": PS, "device_tokens": 16, "host_tokens": 24, "prefetch_threshold": PS,
                             "write_policy": "write_through", **kw})
        self.page = (cfg.num_layers, 2, PS, cfg.num_heads, cfg.head_dim)
        self.storage = MemoryStorage(64, self.page, cfg.dtype)
        self.state_storage = MemoryStorage(64, (cfg.mamba_state_dim,), cfg.dtype) if cfg.has("mamba") else None
        self.cache = HiCache(cfg, executor=DeterministicExecutor(), storage=self.storage,
                             state_storage=self.state_storage, ranks=ranks)
        self.prefetching: dict = {}
        self.snap = self.cache.snapshot()

    def step(self, what: str) -> set[str]:
        snap = self.cache.snapshot()
        got = events.detect(self, what, self.snap, snap)
        self.snap = snap
        return got

    # ---- operations, each one observed step
    def insert(self, tokens: list[int]) -> set[str]:
        c = self.cache
        idx = c.alloc_device(len(tokens))
        slot = c.alloc_mamba() if c.config.has("mamba") else None
        res = c.insert(tokens, idx, slot)
        if res.cached_len:
            c.free_device(idx[: res.cached_len])
        if slot is not None and not res.mamba_slot_used:
            c.free_mamba(slot)
        return self.step(f"insert {tokens}")

    def settle(self) -> set[str]:
        self.cache.executor.complete_all()
        return self.step("complete all") | self.step(f"poll -> {[op.id for op in self.cache.poll()]}")

    def node(self, tokens: list[int]):
        return self.cache.match_prefix(tokens).last_host_node

    def seed(self, tokens: list[int], skip: tuple[int, ...] = (), state: bool = True) -> list[int]:
        """Another instance wrote these pages (but those at `skip`) and the final state to L3."""
        hashes = page_hashes(ROOT_HASH, tokens, PS)
        for i, h in enumerate(hashes):
            if i not in skip:
                self.storage.put(h, torch.zeros(self.page, dtype=self.cache.config.dtype))
        if state and self.state_storage is not None:
            self.state_storage.put(hashes[-1], torch.zeros(self.cache.config.mamba_state_dim,
                                                           dtype=self.cache.config.dtype))
        return hashes

    def prefetch(self, rid: str, tokens: list[int]) -> tuple[object, set[str]]:
        m = self.cache.match_prefix(tokens)
        anchor = list(self.cache_prefix(m.last_host_node))
        op = self.cache.prefetch(rid, m.last_host_node, tokens[len(anchor):])
        got = len(op.prefetch.key) if op is not None else 0
        if op is not None:
            self.prefetching[rid] = (op, tuple(anchor), op.prefetch.key)
        return op, self.step(f"prefetch {rid} {tokens[len(anchor):]} after {anchor} -> {got} tokens")

    def progress(self, rid: str) -> tuple[bool, set[str]]:
        done = self.cache.prefetch_progress(rid)
        if done:
            del self.prefetching[rid]
        return done, self.step(f"progress {rid} -> {done}")

    @staticmethod
    def cache_prefix(node) -> tuple[int, ...]:
        out = []
        while node.parent is not None:
            out[:0] = node.key
            node = node.parent
        return tuple(out)


@pytest.fixture(autouse=True)
def _fresh_counts():
    events.reset()
    yield
    events.reset()


T4 = [1, 1, 2, 2, 3, 3, 4, 4]  # four pages


# ------------------------------------------------------------------------ clean steps
def test_a_clean_trivial_step_records_no_event():
    d = Driver()
    assert d.insert([1, 1, 2, 2]) == set()
    assert d.settle() == set()
    assert d.step(f"match {[1, 1]}") == set()  # a split with nothing in flight is ordinary


# ------------------------------------------------------------------------ prefetch
@pytest.mark.parametrize("host_tokens, truncated", [(4, True), (24, False)])
def test_prefetch_truncated_when_l2_cannot_make_room(host_tokens, truncated):
    d = Driver(host_tokens=host_tokens)
    d.seed(T4)
    op, ev = d.prefetch("r", T4)
    assert len(op.prefetch.key) == (4 if truncated else 8)
    assert ("prefetch_truncated" in ev) is truncated
    assert "host_pool_exhausted" not in ev and "storage_hole" not in ev


@pytest.mark.parametrize("threshold, started", [(4, False), (2, True)])
def test_prefetch_below_threshold(threshold, started):
    d = Driver(prefetch_threshold=threshold)
    d.seed([5, 5])  # one page stored: 2 tokens
    op, ev = d.prefetch("r", [5, 5])
    assert (op is not None) is started
    assert ("prefetch_below_threshold" in ev) is not started


def test_prefetch_with_no_l2_at_all_is_host_pool_exhaustion():
    d = Driver(host_tokens=4, prefetch_threshold=4, write_policy="write_through")
    d.insert([9, 9, 8, 8])  # backed up, then locked: L2 holds it and nothing is evictable
    d.settle()
    d.cache.lock(d.node([9, 9, 8, 8]))
    d.seed(T4)
    op, ev = d.prefetch("r", T4)
    assert op is None and "host_pool_exhausted" in ev and "prefetch_truncated" not in ev


@pytest.mark.parametrize("hole", [True, False])
def test_storage_hole_stops_the_prefetch(hole):
    d = Driver()
    d.seed(T4, skip=(1,) if hole else (1, 2, 3))  # page 1 missing; with a hole pages 2 and 3 are there
    op, ev = d.prefetch("r", T4)
    assert len(op.prefetch.key) == PS
    assert ("storage_hole" in ev) is hole


def test_storage_io_error():
    d = Driver()
    d.seed([1, 1, 2, 2])
    op, _ = d.prefetch("r", [1, 1, 2, 2])
    d.cache.executor.complete(op.id, "page:0")
    assert d.step(f"complete op {op.id} page:0") == set()
    d.storage.faults.inject("io_error", "get")
    d.cache.executor.complete(op.id, "page:1")
    assert d.step(f"complete op {op.id} page:1") == {"storage_io_error"}


def test_torn_record_and_read_miss():
    d = Driver()
    d.seed([1, 1, 2, 2])
    op, _ = d.prefetch("r", [1, 1, 2, 2])
    d.storage.faults.inject("torn", "get")
    d.cache.executor.complete(op.id, "page:0")
    assert d.step(f"complete op {op.id} page:0") == {"torn_record"}
    d.storage.delete(op.prefetch.hashes[1])  # the page vanished between exists() and the read
    d.cache.executor.complete(op.id, "page:1")
    assert d.step(f"complete op {op.id} page:1") == {"prefetch_read_miss"}


@pytest.mark.parametrize("pool_done", [False, True])
def test_termination_refused_while_the_pool_transfer_is_in_flight(pool_done):
    d = Driver(components=("full", "mamba"), device_mamba_slots=4, host_mamba_slots=6, prefetch_policy="best_effort")
    d.seed([1, 1, 2, 2])
    op, _ = d.prefetch("r", [1, 1, 2, 2])
    assert op.pool_transfers, "the state is fetched with the pages"
    d.cache.executor.complete(op.id, "page:0")
    d.cache.executor.complete(op.id, "page:1")
    assert d.step(f"complete op {op.id} KV parts") == set()
    if pool_done:
        d.cache.executor.complete(op.id, op.parts[-1])
        assert d.step(f"complete op {op.id} {op.parts[-1]}") == set()
    done, ev = d.progress("r")
    assert done is pool_done
    assert ("prefetch_terminated_pool_pending" in ev) is not pool_done


@pytest.mark.parametrize("timeout_steps, fired", [(0, True), (50, False)])
def test_prefetch_timeout(timeout_steps, fired):
    d = Driver(prefetch_policy="timeout", prefetch_timeout_steps=timeout_steps)
    d.seed([1, 1, 2, 2])
    op, _ = d.prefetch("r", [1, 1, 2, 2])
    d.cache.executor.complete(op.id, "page:0")
    done, ev = d.progress("r")
    assert done is fired and ("prefetch_timeout" in ev) is fired


@pytest.mark.parametrize("terminated", [True, False])
def test_tp_peer_pulls_this_rank_into_termination(terminated):
    ranks = PeerRanks()
    d = Driver(ranks, components=("full", "mamba"), device_mamba_slots=4, host_mamba_slots=6,
               prefetch_policy="wait_complete")
    d.seed([1, 1, 2, 2])
    op, ev = d.prefetch("r", [1, 1, 2, 2])
    assert "tp_disagreement" not in ev  # the peer holds every page too
    d.cache.executor.complete(op.id, "page:0")
    d.cache.executor.complete(op.id, "page:1")
    d.step(f"complete op {op.id} KV parts")
    ranks.view = PeerView(terminated=terminated)  # the peer's timeout fired; this rank's state transfer is in flight
    done, ev = d.progress("r")
    assert done is terminated
    assert ("tp_terminated_with_pool_in_flight" in ev) is terminated
    assert ("tp_disagreement" in ev) is terminated
    assert ("prefetch_terminated_pool_pending" in ev) is not terminated


@pytest.mark.parametrize("cap", [PS, None])
def test_tp_hit_capped_is_not_an_l2_truncation(cap):
    ranks = PeerRanks()
    ranks.view = PeerView(hit_cap=cap)  # the peer's storage holds one page (or all of them)
    d = Driver(ranks)
    d.seed(T4)
    op, ev = d.prefetch("r", T4)
    assert len(op.prefetch.key) == (PS if cap else len(T4))
    assert ("tp_hit_capped" in ev) is bool(cap) and ("tp_disagreement" in ev) is bool(cap)
    assert "prefetch_truncated" not in ev


@pytest.mark.parametrize("in_flight", [True, False])
def test_prefetch_aborted_in_flight_then_drained(in_flight):
    d = Driver()
    d.seed([1, 1, 2, 2])
    op, _ = d.prefetch("r", [1, 1, 2, 2])
    if not in_flight:
        d.cache.executor.complete_all()
        d.step("complete all")
    d.cache.abort_prefetch("r")
    del d.prefetching["r"]
    assert ("prefetch_aborted_in_flight" in d.step("abort r")) is in_flight
    if in_flight:
        assert "prefetch_drained_after_detach" in d.settle()


# ------------------------------------------------------------------------ L1 <-> L2
def test_load_while_backup_in_flight():
    d = Driver(write_policy="write_through_selective", backup_after_hits=100)  # no automatic backups
    d.insert([1, 1])
    d.insert([1, 1, 2, 2])
    c = d.cache
    c.write_backup(d.node([1, 1, 2, 2]))
    d.settle()
    c.evict(PS)  # [2, 2] is demoted to L2
    assert d.step("evict 2 -> 2") == set()
    c.write_backup(d.node([1, 1]))  # the device parent's backup stays in flight
    d.step("backup (1, 1) -> 3")
    op = c.load_back(c.match_prefix([1, 1, 2, 2]).best_match_node)
    assert op is not None and "load_while_backup_in_flight" in d.step(f"load_back (1, 1, 2, 2) -> {op.id}")


def test_split_under_an_inflight_backup():
    d = Driver()
    d.insert([1, 1, 2, 2])  # write-through: the backup of the whole node is in flight
    d.cache.match_prefix([1, 1])  # the match ends inside it: split
    assert "split_under_inflight_op" in d.step(f"match {[1, 1]}")


def test_write_back_deferred_eviction_then_demoted_on_ack():
    d = Driver(write_policy="write_back")
    d.insert([1, 1, 2, 2])
    d.cache.evict(10**6)
    assert "write_back_deferred_eviction" in d.step("evict 1000000 -> 0")
    assert "write_back_demoted_on_ack" in d.settle()
    assert d.cache.match_prefix([1, 1, 2, 2]).device_len == 0


@pytest.mark.parametrize("part, events_", [("kv", {"failed_transfer_part"}),
                                           (None, set())])
def test_failed_transfer_part_releases_the_op(part, events_):
    d = Driver()
    d.insert([1, 1, 2, 2])
    (op_id,) = d.cache.ops
    if part is not None:
        d.cache.executor.fail(op_id, part)
    assert d.settle() == events_


def test_write_through_backup_without_l2_room():
    d = Driver(host_tokens=2)
    assert "host_pool_exhausted" in d.insert([1, 1, 2, 2])  # 4 tokens cannot fit a 2-token L2
    assert "host_pool_exhausted" not in Driver(host_tokens=4).insert([1, 1, 2, 2])


def test_device_pool_exhausted():
    d = Driver(device_tokens=4)
    d.insert([1, 1, 2, 2])
    d.cache.lock(d.node([1, 1, 2, 2]))
    with pytest.raises(PoolExhaustedError):
        d.cache.alloc_device(2)
    assert d.step("alloc 2 -> PoolExhausted") == {"device_pool_exhausted_nothing_evictable"}


# ------------------------------------------------------------------------ tree shape
@pytest.mark.parametrize("components, cascade", [(("full", "mamba"), True), (("full",), False)])
def test_cascade_through_a_mamba_tombstone(components, cascade):
    """[1,1] splits off as an interior node without a state (a mamba tombstone); evicting both
    leaves deletes it by cascade. Without mamba, it holds KV and is evicted as a leaf of its own:
    also two deletions in a chain, but not a cascade."""
    d = Driver(components=components, write_policy="write_through_selective", backup_after_hits=100)
    d.insert([1, 1, 2, 2])
    d.insert([1, 1, 3, 3])
    n_before = len(d.cache.nodes())
    d.cache.evict(10**6)
    ev = d.step("evict 1000000 -> 8")
    assert n_before == 3 and not d.cache.nodes()
    assert ("cascade_through_tombstones" in ev) is cascade
    assert ("cascade_deleted_kv_tombstone" in ev) is cascade


@pytest.mark.parametrize("side, kw", [
    ("mamba", dict(components=("full", "mamba"), device_mamba_slots=4, host_mamba_slots=6)),
    ("swa", dict(components=("full", "swa"), swa_window=4, extra={"device_swa_tokens": 12}))])
def test_sidecar_tombstone_created(side, kw):
    d = Driver(write_policy="write_through_selective", backup_after_hits=100, **kw)
    d.insert([1, 1])
    d.insert([1, 1, 2, 2])  # [1,1] is interior and keeps its sidecar data
    assert f"{side}_tombstone_created" not in d.step(f"evict_{side} -> 0")
    # LRU ties go to the older node: the interior one loses its sidecar data and keeps its KV
    d.cache.evict_mamba(1) if side == "mamba" else d.cache.evict_swa(PS)
    interior = d.node([1, 1])
    assert interior.value is not None and d.cache.is_tombstone(interior)
    assert f"{side}_tombstone_created" in d.step(f"evict_{side} -> 1")


def test_lock_on_host_only_bottom():
    d = Driver()
    d.insert([1, 1])
    d.insert([1, 1, 2, 2])
    d.settle()
    d.cache.lock(d.node([1, 1]))
    assert "lock_on_host_only_bottom" not in d.step("lock (1, 1)")
    d.cache.evict(PS)  # the unlocked leaf [2,2] is demoted: host only
    d.step("evict 2 -> 2")
    bottom = d.node([1, 1, 2, 2])
    assert bottom.value is None and d.cache.lock(bottom).key == (1, 1)
    assert "lock_on_host_only_bottom" in d.step("lock (1, 1, 2, 2)")


# ------------------------------------------------------------------------ through a machine
def test_machine_steps_reach_the_installed_hook_and_count_rules():
    assert machines.STEP_HOOKS.count(events.observe) == 1
    events.install()  # idempotent
    assert machines.STEP_HOOKS.count(events.observe) == 1
    m = machines.MACHINES["full/write_through"]()
    m.first_request([1, 1, 2, 2])
    m.settle()
    assert not events.REACHED, events.REACHED  # clean, trivial steps
    m.pressure()  # one rule, two checked steps (evict, then evict_host)
    assert events.rules()["full/write_through"] == {"first_request": 1, "pressure": 1, "settle": 1}
    assert not events.ERRORS, events.ERRORS


def test_a_detector_failure_is_counted_never_raised():
    broken = type("Broken", (), {})()  # no cache: every detector that looks fails
    snap = Driver().snap
    events.observe(broken, "insert [1, 1]", snap, snap)
    assert sum(events.ERRORS.values()) == 1 and not events.REACHED
    assert set(events.never_reached()) == set(events.EVENTS)


# ------------------------------------------------------------------------ the campaign's report
def test_clean_exploration_reports_events_rules_and_branch_coverage(tmp_path):
    import time

    from campaign.pages import write_index
    from campaign.verify import Progress, explore_clean

    if sys.gettrace() is not None:
        pytest.skip("this process is traced already (pytest --cov, a debugger): the campaign does not measure then")
    clean, failures = explore_clean(3.0, 5, Progress(deadline=time.monotonic() + 3), tmp_path)
    cov = clean["coverage"]
    assert list(cov["events"]) == list(events.EVENTS) and cov["descriptions"] == events.EVENTS
    assert cov["never_reached"] == [n for n, c in cov["events"].items() if not c]
    first = next(iter(machines.MACHINES))
    assert sum(cov["rules"][first].values()) > 0, cov["rules"]
    total = cov["branches"]["total"]
    assert 0 < total["branches_covered"] < total["branches"] and total["statements_pct"] > 30, total
    assert cov["branches"]["refcache/cache.py"]["branches_covered"] > 0
    assert "separate import" in cov["measured"] and (tmp_path / "coverage" / "index.html").exists()
    assert not cov["detector_errors"] and not failures
    summary = {"budget_s": 3, "seed": 5, "device": "cpu", "bugs": [], "proofs": [], "crosshair": [],
               "conformance": [], "clean_failures": [], "machines": clean["machines"],
               "clean": {"steps": clean["steps"], "violations": 0}, "coverage": cov,
               "verdict": {"clean_ok": True, "bugs_detected": "0/0", "median_detection_s": None, "elapsed_s": 3,
                           "events_never_reached": cov["never_reached"]}}
    write_index(tmp_path, summary)
    page, md = (tmp_path / "index.html").read_text(), (tmp_path / "summary.md").read_text()
    assert "Rare events reached" in page and "Coverage of refcache/" in page and '<a href="coverage/index.html">' in page
    assert all(f"| {n} | NEVER |" in md for n in cov["never_reached"]) and "| refcache/cache.py |" in md

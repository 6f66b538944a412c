"""The upstream seed bugs reverted in SGLang 0.5.23 (conformance/targets/sglang/seeds.py): each
reverted seed's minimized operations fail on the reverted code and pass on clean code. Run in a
fresh process (one process holds one sglang version)."""

from __future__ import annotations

import pytest

from conformance import runner
from conformance.targets.sglang.seeds import SEEDS
from conformance.test_hicache import run_fresh

pytestmark = pytest.mark.conformance
REVERTED = [s.id for s in SEEDS.values() if s.patch is not None and s.calls]


@pytest.mark.parametrize("seed_id", REVERTED)
def test_seed_replay_fails_reverted_passes_clean(seed_id):
    s = SEEDS[seed_id]
    why = runner.unavailable_reason(s.target)
    if why:
        pytest.skip(why)
    assert 0 < len(s.calls) <= 10
    r = run_fresh(f"""
import json
from conformance.targets.sglang.seeds import replay_seed
print(json.dumps({{"clean": replay_seed({seed_id}, False), "reverted": replay_seed({seed_id}, True)}}))
""")
    assert r["clean"] is None, r["clean"]
    assert r["reverted"] is not None and any(x in r["reverted"] for x in s.signs), r["reverted"]


def test_every_seed_is_listed():
    assert set(SEEDS) == {27366, 26945, 23427, 25088, 23696}
    assert all(s.where for s in SEEDS.values() if s.patch is None)
    assert all(s.patch is not None and s.search and s.replay for s in SEEDS.values() if s.unobservable)
    assert all(s.calls for s in SEEDS.values() if s.patch is not None)  # every reverted seed has a replay


def test_23427_moved_transfers_are_never_read_again():
    """#23427 is reverted (`seed_23427`: the move writes its result back into the operation's own
    PoolTransfers) but not caught, on any device: 0.5.23 commits a backup or load-back onto its nodes
    from those transfers when the operation is queued, cloning the indices, before start_writing /
    start_loading moves them, and nothing reads the transfers after the move. Kept here, on the mamba
    targets under write-through and write-back, over backups, evictions, load-backs and L2 eviction:
    the sequence runs clean with the seed reverted ("seed"), and with the fixed move followed by
    out-of-range indices in the operation's transfers ("rebound": a reader after the move would meet
    them, whatever the kernel IO backend would have put there); writing into the tensors themselves,
    which the transfers share with the nodes ("in_place"), fails D1 at once, so the sequence does see
    a node's state polluted when it is."""
    why = runner.unavailable_reason("sglang-hicache-mamba")
    if why:
        pytest.skip(why)
    r = run_fresh("""
import contextlib, json
from unittest import mock
from conformance.machine import replay
from conformance.runner import machine
from conformance.targets.sglang.seeds import _load, seed_23427
_load()
from sglang.srt.mem_cache.hybrid_cache.hybrid_cache_controller import HybridCacheController as H
calls = [("insert", [1, 1, 1]), ("insert", [1, 1, 1, 2, 2]), ("insert", [3] * 8), ("evict", 100),
         ("load_back", [1, 1, 1, 2, 2]), ("insert", [4] * 12), ("insert", [5] * 12), ("evict", 100),
         ("load_back", [1, 1, 1])]
out = {}
for target in ("sglang-hicache-mamba", "sglang-hicache-mamba-write-back"):
    for mode in ("seed", "rebound", "in_place"):
        with seed_23427() if mode == "seed" else contextlib.nullcontext():
            inner, n = H.move_hybrid_indices, {"writes": 0, "loads": 0}

            def move(self, op, **k):
                moved = inner(self, op, **k)
                n["loads" if any(o is op for o in self.load_queue) else "writes"] += 1
                for t in op.pool_transfers or ():
                    for f in ("host_indices", "device_indices"):
                        v = getattr(t, f)
                        if v is not None and mode == "rebound":
                            setattr(t, f, v + 10**6)
                        elif v is not None and mode == "in_place":
                            v.zero_()
                return moved

            with mock.patch.object(H, "move_hybrid_indices", move):
                err = replay(machine(target), calls)
        out[f"{target} {mode}"] = {"error": None if err is None else str(err), **n}
print(json.dumps(out))
""")
    for target in ("sglang-hicache-mamba", "sglang-hicache-mamba-write-back"):
        for mode in ("seed", "rebound"):
            got = r[f"{target} {mode}"]
            assert got["error"] is None and got["writes"] >= 4 and got["loads"] >= 1, (target, mode, got)
        assert "D1: node" in (r[f"{target} in_place"]["error"] or ""), r[f"{target} in_place"]


def test_23427_decode_offload_stores_swa_pages_under_the_wrong_keys():
    """Where the moved transfers *are* read again: the PD decode side's DecodeKVCacheOffloadManager
    (decode_offload.py) writes with flush=True, so the move runs inside write(), and then backs the
    SWA sidecar up to L3 from its own PoolTransfer's host_indices. With the seed reverted those are
    the moved ones, sorted by the layer-first direct move, while the page keys stay in token order: a
    second request whose SWA host slots wrap around the free list ([12..17, 0, 1]) lands in L3 with
    every SWA page under another page's key; its KV pages (the anchor's indices, returned apart from
    the move) stay right, and clean 0.5.23 stores every page under its own key."""
    why = runner.unavailable_reason("sglang-hicache-mamba")
    if why:
        pytest.skip(why)
    r = run_fresh("""
import json
from conformance.targets.sglang.decode_offload import offload_and_read_back
from conformance.targets.sglang.seeds import seed_23427
runs = [[1] * 12, [2] * 8]
clean = offload_and_read_back(runs)
with seed_23427():
    seeded = offload_and_read_back(runs)
print(json.dumps({"clean": clean, "seed": seeded}))
""")
    assert r["clean"] == [], r["clean"]
    assert r["seed"] and all(w.startswith("SWA page (2") for w in r["seed"]), r["seed"]
    assert "SWA page (2, 2): L3 holds (2, 2, 2, 2, 2, 2, 2, 2)" in r["seed"], r["seed"]


def test_23427_search_finds_it_from_nothing():
    """`mutants --seeds` hunts #23427 with the decode-offload property search (no machine target can
    show it): from random finished requests, with the seed reverted, it finds SWA pages stored under
    another prefix's key and shrinks the sequence to a few requests."""
    why = runner.unavailable_reason("sglang-hicache-mamba")
    if why:
        pytest.skip(why)
    r = run_fresh("""
import json
from conformance.mutants import run_seed
print(json.dumps(run_seed(23427, 90, seed=0)))
""")
    assert r["caught"], r
    assert r["check"].startswith("SWA page") and 0 < r["operations"] <= 4, r

"""The vLLM 0.33.0 targets: bounded runs against the abstract model, the mutants caught (and their
minimized operations clean on the unpatched target), the contract differences kept demonstrated.
Everything skips, with the reason, when vLLM 0.33.0 is not installed
(`python -m conformance.targets.vllm.install`).

Budget per target: CONFORMANCE_BUDGET_S seconds (default 4), seed 0.
"""

from __future__ import annotations

import importlib
import os

import pytest

from conformance import runner
from conformance.target import TargetError
from conformance.targets import vllm as vllm_targets
from conformance.targets.vllm import mutants, shim

pytestmark = pytest.mark.conformance
BUDGET = float(os.environ.get("CONFORMANCE_BUDGET_S", "4"))
NAMES = list(vllm_targets.TARGETS)


_WHY = shim.missing_reason()
needs_vllm = pytest.mark.skipif(bool(_WHY), reason=_WHY)


def test_registered_with_the_runner():
    assert set(NAMES) <= set(runner.TARGETS)
    assert all(runner.TARGETS[n].requires for n in NAMES)


@needs_vllm
@pytest.mark.parametrize("name", NAMES)
def test_vllm_target_agrees(name):
    r = runner.run_target(name, BUDGET, seed=0)
    assert r["steps"] > 0, r
    assert r["violations"] == 0, r["failure_report"]


@needs_vllm
@pytest.mark.parametrize("name", list(mutants.MUTANTS))
def test_mutant_caught_and_clean_target_passes(name):
    """The patched vLLM fails the machine with the bug's own signature; the operations it was
    minimized to run clean on unpatched vLLM (the failure is the mutant's, not the mapping's)."""
    r = mutants.run(name, budget_s=30, seed=0, shrink_s=3)
    assert r["caught"], r.get("failure_report") or r
    assert r["calls"], r
    assert runner.replay_calls(r["target"], r["calls"]) is None


# ------------------------------------------------------------------ contract differences
LOOKUP_RECENCY = [("insert", [1, 1]), ("insert", [2, 2]), ("match", [1, 1]), ("evict", 1)]


@needs_vllm
@pytest.mark.parametrize("name", ["refcache", "vllm-prefix", "vllm-offload-lru"])
def test_lookup_does_not_refresh_recency(name):
    """Contract difference: in vLLM a lookup (get_computed_blocks, or the offloading manager's
    lookup) changes no recency; only a request that holds the blocks and finishes does. The spec
    refreshes the matched path on match, so after insert A, insert B, match A, evict one page the
    spec evicts B and vLLM evicts A. Judged here with the "lru-recency" allowance lifted."""
    err = runner.replay_calls(name, LOOKUP_RECENCY, strict=True)
    if name == "refcache":
        assert err is None, err
    else:
        assert err is not None and "spec recency" in err and "(1, 1)" in err, f"vLLM now refreshes on lookup: {err}"


@needs_vllm
def test_release_order_is_judged():
    """Without the lookup, the release order decides: A released before B, so A goes first, as
    the spec says too (the eviction-order check is live on these targets, not only allowed away)."""
    calls = [("insert", [1, 1]), ("insert", [2, 2]), ("evict", 1)]
    for name in ("vllm-prefix", "vllm-offload-lru", "vllm-offload-arc"):
        assert runner.replay_calls(name, calls, strict=True) is None


SWA_DUP = [("insert", [1] * 6), ("insert", [1] * 6), ("evict", 1), ("insert", [1] * 6)]


@needs_vllm
def test_swa_duplicates_full_blocks():
    """Contract difference (hybrid full + SWA): once a page's sliding-window block is evicted but
    its full-attention block is not, vLLM's usable hit stops short, it recomputes, and files a
    second full block under the same hash; the model's insert counts those pages as cached. The
    target reports them as cached (the machine agrees); here the duplicates are shown directly."""
    from conformance.targets.vllm.block_pool import VLLMPrefixCache

    t = VLLMPrefixCache("swa")
    for op, arg in SWA_DUP[:3]:
        if op == "insert":
            t.insert(arg, t.alloc(arg))
        else:
            t.evict(arg * t.info.page_size)
    kv = t.alloc(SWA_DUP[3][1])
    got = t.insert(SWA_DUP[3][1], kv)
    assert kv[1] < got.cached_len, (kv, got)  # vLLM's own hit is shorter than what was cached
    assert len(t._cached((1, 1))) == 2  # two blocks under one hash
    assert t.check() == []
    assert runner.replay_calls("vllm-prefix-swa", SWA_DUP, strict=True) is None


@needs_vllm
def test_engine_cap_duplicates_the_last_block():
    """Contract difference (the scheduler's hit cap): inserting a fully cached prompt again, vLLM
    hits all but its last block (the last token is recomputed for logits) and files the recomputed
    block beside the cached one under the same hash; the model counts the whole prompt as cached."""
    from conformance.targets.vllm.block_pool import engine_capped

    t = engine_capped()
    tokens = [1, 1, 2, 2]
    t.insert(tokens, t.alloc(tokens))
    kv = t.alloc(tokens)
    got = t.insert(tokens, kv)
    assert (kv[1], got.cached_len) == (2, 4)
    assert len(t._cached((1, 1, 2, 2))) == 2 and t.check() == []


@needs_vllm
def test_mamba_duplicates_state_blocks():
    """Contract difference (hybrid full + mamba, align mode): the end page's full block evicted,
    its state kept; a re-insert hits nothing usable, recomputes, and files a second state block
    under the end page's hash, where the model reuses the cached state (no new slot)."""
    from conformance.targets.vllm.block_pool import VLLMPrefixCache

    t = VLLMPrefixCache("mamba")
    tokens = [1, 1, 1, 1]
    t.insert(tokens, t.alloc(tokens))
    assert t.evict(t.info.page_size) == t.info.page_size
    assert {p: (g.dev, g.mamba) for p, g in t.abstract().pages.items()} == {(1, 1): (True, False),
                                                                          (1, 1, 1, 1): (False, True)}
    kv = t.alloc(tokens)
    got = t.insert(tokens, kv)
    assert kv[1] == 0 and got.cached_len == 2 and got.mamba_used is False
    assert len(t._cached((1, 1, 1, 1), 1)) == 2 and t.check() == []


REFUSED_STORE = [("insert", [1, 1, 1, 1]), ("insert", [2, 2]), ("insert", [1] * 8), ("evict", 1)]


@needs_vllm
def test_refused_store_still_refreshes_what_it_offered():
    """Finding, classified "our mapping wrong" (found on a 3-chunk LRU store): a request whose
    prepare_store is refused (no room) has still used the ready chunks it offered, and vLLM's LRU
    makes them recent when the request finishes. The driver's release clock first ignored refused
    requests, so after insert A AA, insert B, a refused insert of A..AAAA, evict one page, it
    expected AA to go before B. Now it stamps them, and vLLM's choice (B) agrees."""
    from conformance.machine import machine_for, replay
    from conformance.targets.vllm.offload import VLLMOffload

    assert replay(machine_for(lambda: VLLMOffload("lru", chunks=3), "vllm-offload-lru-3"), REFUSED_STORE) is None
    t = VLLMOffload("lru", chunks=3)
    for _op, arg in REFUSED_STORE[:2]:
        t.insert(arg, t.alloc(arg))
    with pytest.raises(TargetError):
        t.alloc(REFUSED_STORE[2][1])
    t.evict(2)
    assert set(t.abstract().pages) == {(1, 1), (1, 1, 1, 1)}  # B went, the refused request's pages stayed


# ---------------------------------------------------------------------------------- shim
def test_missing_vllm_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv(shim.HOME_ENV, str(tmp_path))
    why = shim.missing_reason()
    assert "python -m conformance.targets.vllm.install" in why and str(tmp_path) in why


@needs_vllm
def test_standins_only_for_vllm_files():
    """A missing module imported by anything but vLLM's own files still fails."""
    shim.load()
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("zmq_refcache_absent")
    assert "vllm.v1.core.block_pool" in importlib.sys.modules
    assert not getattr(importlib.sys.modules["vllm.v1.core.block_pool"], "__refcache_standin__", False)

"""Mutants of the caches under test: each one a known bug class patched into one target, to show
that the conformance machine fails on that target when it should (a suite that cannot fail proves
nothing).

    python -m conformance.mutants NAME [--budget S] [--seed N]   # one JSON line: the run's result
    python -m conformance.mutants --seeds [--budget S]           # the five upstream seed bugs, one line each

A mutant runs in this process when it can, else in a child process: one process can hold only one
sglang version, and the patch has to be applied where the cache runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from unittest import mock

from . import runner
from .targets.sglang import shim
from .targets.sglang.common import HIMAMBA_REAL


@dataclass(frozen=True)
class Mutant:
    target: str
    bug: str
    patch: Callable[[], contextlib.AbstractContextManager]
    signs: tuple[str, ...]  # what the minimized failure's message shows (any one of them)


def _split_drops_lock(cls, method: str):
    """The classic bug: a split gives the new upper node no lock count."""
    orig = getattr(cls, method)

    def split(self, *a, **k):
        upper = orig(self, *a, **k)
        upper.lock_ref = 0
        return upper

    return mock.patch.object(cls, method, split)


def _refcache_split_drops_lock():
    from refcache.cache import HiCache

    return _split_drops_lock(HiCache, "_split")


def _radix_split_drops_lock():
    shim.load("0.5.23", real=HIMAMBA_REAL)  # the real set every 0.5.23 target asks for
    from sglang.srt.mem_cache.radix_cache import RadixCache

    return _split_drops_lock(RadixCache, "_split_node")


def _hiradix_split_keeps_host():
    """The lower half of a split keeps the whole host copy (refcache's seeded bug
    `split_keeps_whole_host_value`, here in SGLang's HiCache)."""
    shim.load(runner.TARGETS["sglang-hiradix"].sglang, real=HIMAMBA_REAL)
    from sglang.srt.mem_cache.hiradix_cache import HiRadixCache

    orig = HiRadixCache._split_node

    def split(self, key, child, split_len):
        whole = child.host_value
        upper = orig(self, key, child, split_len)
        if whole is not None:
            child.host_value = whole
        return upper

    return mock.patch.object(HiRadixCache, "_split_node", split)


def _hiradix_load_back_locks_parent():
    """A load-back's lock anchored one node too high (bug class 4): the loaded node is left
    unprotected while its copy is in flight, and the acknowledgement later unlocks a node that the
    load never locked."""
    shim.load(runner.TARGETS["sglang-hiradix"].sglang, real=HIMAMBA_REAL)
    from sglang.srt.mem_cache.hiradix_cache import HiRadixCache

    orig = HiRadixCache.load_back

    def load_back(self, node, mem_quota=None):
        got = orig(self, node, mem_quota)
        if got is not None and node.parent is not self.root_node:
            self.dec_lock_ref(node)
            self.inc_lock_ref(node.parent)
        return got

    return mock.patch.object(HiRadixCache, "load_back", load_back)


def _hicache_split_drops_host():
    """A split gives the new upper node no host copy (SGLang 0.5.23's Python tree core): its host
    slots leak, and a later load-back of the upper half finds nothing to load."""
    from .targets.sglang.common import HICACHE_REAL

    shim.load(runner.TARGETS["sglang-hicache-python"].sglang, real=HICACHE_REAL)
    from sglang.srt.mem_cache.unified_cache.component_type import ComponentType
    from sglang.srt.mem_cache.unified_cache.unified_tree_core import UnifiedTreeCore

    orig = UnifiedTreeCore._split_node

    def split(self, key, child, split_len):
        upper, action = orig(self, key, child, split_len)
        upper.component_data[ComponentType.FULL].host_value = None
        return upper, action

    return mock.patch.object(UnifiedTreeCore, "_split_node", split)


def _swa_component():
    from .targets.sglang.common import HICACHE_REAL

    shim.load(runner.TARGETS["sglang-hicache-swa"].sglang, real=HICACHE_REAL)
    from sglang.srt.mem_cache.unified_cache.components.swa import SWAComponent

    return SWAComponent


def _swa_load_back_keeps_mapping():
    """A load-back gives the nodes their reloaded SWA slots but leaves the full-to-SWA mapping as it
    was: the attention kernels, which reach SWA KV through that mapping, read stale slots."""
    cls = _swa_component()
    from sglang.srt.mem_cache.unified_cache.cache_action import RebuildFullToSWAMapping

    orig = cls.commit_hicache_transfer

    def commit(self, node, phase, transfers=(), *, cache_actions, **k):
        orig(self, node, phase, transfers, cache_actions=cache_actions, **k)
        cache_actions[:] = [a for a in cache_actions if not isinstance(a, RebuildFullToSWAMapping)]

    return mock.patch.object(cls, "commit_hicache_transfer", commit)


def _swa_match_ignores_window():
    """The match validator accepts any node holding SWA KV, however short the run of SWA KV before
    it: a match may end where sliding-window attention lacks the tokens it reads."""
    cls = _swa_component()

    def create(self, match_device_only=False):
        ct = self.component_type

        def validator(node):
            cd = node.component_data[ct]
            return cd.value is not None or (not match_device_only and cd.host_value is not None)

        return validator

    return mock.patch.object(cls, "create_match_validator", create)


def _swa_insert_skips_recovery():
    """An insert over nodes whose SWA KV was evicted keeps the tombstones (it never takes the
    request's SWA KV for them): the inserted prefix's window is not on device afterwards."""
    cls = _swa_component()

    def overlap(self, node, prefix_len, total_prefix_len, value_slice, params, result, cache_actions):
        return prefix_len

    return mock.patch.object(cls, "update_component_on_insert_overlap", overlap)


MUTANTS: dict[str, Mutant] = {
    "refcache-split-drops-lock": Mutant("refcache", "a split gives the upper node no lock count",
                                        _refcache_split_drops_lock, ("T2", "R2")),
    "sglang-radix-split-drops-lock": Mutant("sglang-radix", "a split gives the upper node no lock count",
                                            _radix_split_drops_lock, ("R2",)),
    # the tree holds more host slots than the pool handed out (R1 on the host tier), a later
    # load-back brings back more than the node's key, or host eviction frees shared slots twice
    "sglang-hiradix-split-keeps-host": Mutant("sglang-hiradix", "the lower half of a split keeps the whole host copy",
                                              _hiradix_split_keeps_host,
                                              ("device match after load_back", "Double-free", "R1: host pool")),
    "sglang-hiradix-load-back-locks-parent": Mutant("sglang-hiradix", "a load-back's lock anchored at the parent",
                                                    _hiradix_load_back_locks_parent, ("R2", "lock")),
    "sglang-hicache-split-drops-host": Mutant("sglang-hicache-python", "a split gives the upper node no host copy",
                                              _hicache_split_drops_host,
                                              ("R1: host pool", "sanity_check", "device match after load_back",
                                               "lost host")),
    "sglang-hicache-swa-load-back-keeps-mapping": Mutant(
        "sglang-hicache-swa", "a load-back leaves the full-to-SWA mapping stale", _swa_load_back_keeps_mapping,
        ("D1",)),
    "sglang-hicache-swa-match-ignores-window": Mutant(
        "sglang-hicache-swa", "a match may end where the SWA window is incomplete", _swa_match_ignores_window,
        ("match (device, best)", "D1")),
    "sglang-hicache-swa-insert-skips-recovery": Mutant(
        "sglang-hicache-swa", "an insert keeps its path's SWA tombstones", _swa_insert_skips_recovery,
        ("do not all hold SWA KV",)),
}


def run(name: str, budget_s: float = 30, seed: int = 0, shrink_s: float = 3) -> dict:
    """The conformance run of mutant `name`; adds `caught`: a violation whose report shows the bug."""
    m = MUTANTS[name]
    why = runner.unavailable_reason(m.target)
    if why:
        return {"target": m.target, "mutant": name, "steps": 0, "violations": 0, "caught": False, "skipped": why}
    if runner.needs_own_process(m.target):
        return _run_child(name, budget_s, seed, shrink_s)
    with m.patch():
        r = runner._run_here(m.target, budget_s, seed, shrink_s=shrink_s)
    head = (r["failure_report"] or "").split("--- as Hypothesis reported it")[0]  # the minimized failure ...
    finding = "\n".join(ln for ln in head.splitlines()[1:] if not re.match(r"\s+\d+: ", ln))  # ... less its steps
    return {**r, "mutant": name, "caught": r["violations"] == 1 and any(s in finding for s in m.signs)}


def _run_child(name: str, budget_s: float, seed: int, shrink_s: float) -> dict:
    args = [name, "--budget", str(budget_s), "--seed", str(seed), "--shrink", str(shrink_s)]
    p = runner._child(args, budget_s + 600, module="conformance.mutants")
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"mutant child failed (rc {p.returncode}): {p.stderr[-3000:]}")
    return json.loads(lines[-1])


def _seed_child(seed_id: int, budget_s: float, seed: int, shrink_s: float) -> dict:
    p = runner._child(["--seed-id", str(seed_id), "--budget", str(budget_s), "--seed", str(seed),
                       "--shrink", str(shrink_s)], budget_s + 600, module="conformance.mutants")
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"seed child failed (rc {p.returncode}): {p.stderr[-3000:]}")
    return json.loads(lines[-1])


def run_seed(seed_id: int, budget_s: float = 120, seed: int = 0, shrink_s: float = 10) -> dict:
    """The conformance run of upstream seed bug `seed_id` (conformance/targets/sglang/seeds.py)
    reverted in SGLang 0.5.23: {seed, target, caught, seconds, operations, check, steps}; for a seed
    with a property search (no machine target shows it), that search's run instead."""
    from .targets.sglang import seeds

    s = seeds.SEEDS[seed_id]
    if s.patch is None:
        return {"seed": seed_id, "target": s.target, "caught": False, "seconds": None, "operations": None,
                "check": None, "not_reverted": s.where}
    if s.search:  # no machine target can show it: its property search over the path that does
        why = shim.missing_reason(seeds.V_NEW)
        if why:
            return {"seed": seed_id, "target": s.search, "caught": False, "skipped": why}
        have = shim.loaded()
        if have is not None and have.version != seeds.V_NEW:
            return _seed_child(seed_id, budget_s, seed, shrink_s)
        return seeds.run_search(seed_id, budget_s, seed)
    why = runner.unavailable_reason(s.target)
    if why:
        return {"seed": seed_id, "target": s.target, "caught": False, "skipped": why}
    if runner.needs_own_process(s.target):
        return _seed_child(seed_id, budget_s, seed, shrink_s)
    with s.patch():
        r = runner._run_here(s.target, budget_s, seed, shrink_s=shrink_s)
    report = r["failure_report"] or ""
    head = report.split("--- as Hypothesis reported it")[0]
    m = re.search(r"minimized to (\d+) operations", head)
    finding = "\n".join(ln for ln in head.splitlines()[1:] if not re.match(r"\s+\d+: ", ln)).strip()
    lines = finding.splitlines()
    check = (lines[0] + (" " + lines[1].strip() if len(lines) > 1 and lines[0].endswith(":") else "")) if lines else None
    out = {"seed": seed_id, "target": s.target, "caught": r["violations"] == 1 and any(x in finding for x in s.signs),
           "seconds": r.get("elapsed_s"), "operations": int(m.group(1)) if m else None,
           "check": check[:300] if check else None, "steps": r["steps"]}
    if s.unobservable:  # run all the same: a failure would contradict the reason given
        out["unobservable"] = s.unobservable
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m conformance.mutants", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", nargs="?", choices=list(MUTANTS))
    ap.add_argument("--seeds", action="store_true", help="every upstream seed bug, reverted in SGLang 0.5.23")
    ap.add_argument("--seed-id", type=int, help="one upstream seed bug (its pull request number)")
    ap.add_argument("--budget", type=float, default=None, help="seconds per run (default 30; 120 per seed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shrink", type=float, default=None)
    a = ap.parse_args(argv)
    if a.seeds or a.seed_id is not None:
        from .targets.sglang import seeds

        ok = True
        for sid in ([a.seed_id] if a.seed_id is not None else list(seeds.SEEDS)):
            r = run_seed(sid, a.budget or 120, a.seed, 10 if a.shrink is None else a.shrink)
            print(json.dumps(r), flush=True)
            ok = ok and r["caught"]
        return 0 if ok else 1
    if a.name is None:
        ap.error("give a mutant NAME or --seeds")
    r = run(a.name, a.budget or 30, a.seed, 3 if a.shrink is None else a.shrink)
    print(json.dumps(r))
    return 0 if r["caught"] or r.get("skipped") else 1


if __name__ == "__main__":
    sys.exit(main())

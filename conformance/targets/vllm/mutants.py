"""Known vLLM bug classes patched into vLLM 0.33.0 at run time, to show the machine fails on the
vLLM targets when it should (a suite that cannot fail proves nothing).

    python -m conformance.targets.vllm.mutants NAME [--budget S] [--seed N]   # one JSON line

Each mutant is a `unittest.mock.patch` of one vLLM function, applied only for the run.
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

from conformance import runner

from . import shim


@dataclass(frozen=True)
class Mutant:
    target: str
    bug: str
    patch: Callable[[], contextlib.AbstractContextManager]
    signs: tuple[str, ...]  # what the minimized failure's message shows (any one of them)


def _touch_keeps_block_free():
    """A cache hit takes a reference (ref_cnt + 1) but leaves the block in the free queue, so the
    next allocation can evict and reuse a block a running request still reads."""
    shim.load()
    from vllm.v1.core.block_pool import BlockPool

    def touch(self, blocks):
        for block in blocks:
            if not block.is_null:
                block.ref_cnt += 1

    return mock.patch.object(BlockPool, "touch", touch)


def _free_drops_cached_blocks():
    """free_blocks decrements the ref counts but never queues the blocks that carry a hash: a
    freed cached block is neither free nor evictable, and the pool slowly leaks."""
    shim.load()
    from vllm.v1.core.block_pool import BlockPool

    orig = BlockPool.free_blocks

    def free_blocks(self, ordered_blocks):
        ordered_blocks = list(ordered_blocks)
        orig(self, [b for b in ordered_blocks if b.block_hash is None])
        for b in ordered_blocks:
            if b.block_hash is not None and not b.is_null:
                b.ref_cnt -= 1

    return mock.patch.object(BlockPool, "free_blocks", free_blocks)


def _hash_not_chained():
    """A block's hash covers its own tokens only, not its parent's hash: equal blocks under
    different prefixes share one hash, and a lookup serves another prefix's KV."""
    shim.load()
    from vllm.v1.core import kv_cache_utils as ku

    orig = ku.hash_block_tokens

    def hash_block_tokens(hash_function, parent_block_hash, curr_block_token_ids, extra_keys=None):
        return orig(hash_function, None, curr_block_token_ids, extra_keys)

    return mock.patch.object(ku, "hash_block_tokens", hash_block_tokens)


def _offload_load_keeps_ref():
    """complete_load forgets to drop the reference prepare_load took: a chunk read once is
    pinned for ever and the store can no longer evict it."""
    shim.load()
    from vllm.v1.kv_offload.cpu.manager import CPUOffloadingManager

    return mock.patch.object(CPUOffloadingManager, "complete_load", lambda self, keys, req_context: None)


MUTANTS: dict[str, Mutant] = {
    "vllm-touch-keeps-block-free": Mutant("vllm-prefix", "a cache hit does not take the block out of the free queue",
                                          _touch_keeps_block_free, ("R1", "while locked", "ref_cnt")),
    "vllm-free-drops-cached-block": Mutant("vllm-prefix", "a freed cached block is not returned to the free queue",
                                           _free_drops_cached_blocks, ("R1", "evictable device leaves remain")),
    "vllm-hash-not-chained": Mutant("vllm-prefix", "a block hash does not chain its parent's hash",
                                    _hash_not_chained, ("H1", "D1")),
    "vllm-offload-load-keeps-ref": Mutant("vllm-offload-lru", "complete_load does not release the load's reference",
                                          _offload_load_keeps_ref, ("R1", "ref_cnt", "expected change", "evictable")),
}


def run(name: str, budget_s: float = 30, seed: int = 0, shrink_s: float = 3) -> dict:
    """The conformance run of mutant `name`; adds `caught` (a violation whose minimized report
    shows the bug) and `calls` (the minimized operations, to replay on the clean target)."""
    m = MUTANTS[name]
    why = runner.unavailable_reason(m.target)
    if why:
        return {"target": m.target, "mutant": name, "steps": 0, "violations": 0, "caught": False, "skipped": why}
    cls = runner.machine(m.target)
    with m.patch():
        r = runner._run_here(m.target, budget_s, seed, shrink_s=shrink_s)
        calls = [list(c) for c in cls.last_calls] if r["violations"] else []
    head = (r["failure_report"] or "").split("--- as Hypothesis reported it")[0]  # the minimized failure ...
    finding = "\n".join(ln for ln in head.splitlines()[1:] if not re.match(r"\s+\d+: ", ln))  # ... less its steps
    small = re.findall(r"^\s+\d+: (\w+)\((.*)\)$", head, re.M)
    if small:
        calls = [[op, json.loads(a) if op != "lock" else (None if a == "match #None" else int(a.split("#")[1]))]
                 for op, a in small]
    return {**r, "mutant": name, "calls": calls,
            "caught": r["violations"] == 1 and any(s in finding for s in m.signs)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m conformance.targets.vllm.mutants", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=list(MUTANTS))
    ap.add_argument("--budget", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shrink", type=float, default=3.0)
    a = ap.parse_args(argv)
    r = run(a.name, a.budget, a.seed, a.shrink)
    print(json.dumps(r))
    return 0 if r["caught"] or r.get("skipped") else 1


if __name__ == "__main__":
    sys.exit(main())

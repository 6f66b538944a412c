"""match_prefix / insert throughput: refcache vs SGLang's RadixCache, same workload, one run.

    python benchmarks/bench_match_insert.py [--requests 2000] [--page-size 16] [--unified]

Workload (seeded): `--prefixes` shared system prompts of `--prefix-len` tokens; each request is
one of them plus a fresh suffix, and one request in three continues an earlier request (a
multi-turn chat: the earlier request's tokens plus a new turn). Every request does what a
scheduler does around the tree: match_prefix, take KV slots for the whole request, insert, free
the duplicates. Only the match_prefix and insert calls are timed (slots come from each cache's
own allocator path, untimed). Pools are sized so nothing is evicted: this measures the tree.

SGLang comes from the conformance shim (`python -m conformance.install` first); refcache runs in
device-only usage (no host tier traffic) on the CPU. Prints both, and the ratio.
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import time
from array import array
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conformance.targets.sglang import shim  # noqa: E402
from refcache import CacheConfig, DeterministicExecutor, HiCache  # noqa: E402


def workload(n: int, prefixes: int, prefix_len: int, suffix_len: int, page: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    systems = [[rng.randrange(32000) for _ in range(prefix_len)] for _ in range(prefixes)]
    reqs: list[list[int]] = []
    for _ in range(n):
        if reqs and rng.random() < 1 / 3:
            base = rng.choice(reqs)
        else:
            base = rng.choice(systems)
        t = base + [rng.randrange(32000) for _ in range(suffix_len)]
        reqs.append(t[: len(t) - len(t) % page])
    return reqs


class Timer:
    def __init__(self):
        self.match = self.insert = 0.0

    def result(self, name: str, reqs: list[list[int]]) -> dict:
        toks = sum(map(len, reqs))
        return {"name": name, "match_s": self.match, "insert_s": self.insert,
                "match_per_s": len(reqs) / self.match, "insert_per_s": len(reqs) / self.insert,
                "mtok_per_s": 2 * toks / (self.match + self.insert) / 1e6}


def run_refcache(reqs: list[list[int]], page: int, capacity: int) -> dict:
    cfg = CacheConfig(page_size=page, device_tokens=capacity, host_tokens=page, num_layers=1, num_heads=1,
                      head_dim=1, swa_window=page, write_policy="write_through_selective", backup_after_hits=10**9)
    c = HiCache(cfg, executor=DeterministicExecutor(auto_complete=True))
    tm = Timer()
    pc = time.perf_counter
    for t in reqs:
        t0 = pc()
        c.match_prefix(t)
        t1 = pc()
        idx = c.alloc_device(len(t), evict=False)
        t2 = pc()
        r = c.insert(t, idx)
        t3 = pc()
        if r.cached_len:
            c.free_device(idx[: r.cached_len])
        tm.match += t1 - t0
        tm.insert += t3 - t2
    return tm.result("refcache HiCache (device-only)", reqs)


class _Alloc:
    """A plain free-list allocator (the shape `create_simulated` expects); untimed."""

    def __init__(self, capacity: int, page: int):
        self.page, self.device = page, torch.device("cpu")
        self.free_pages = list(range(1, capacity // page + 1))

    def available_size(self) -> int:
        return len(self.free_pages) * self.page

    def alloc(self, n: int) -> torch.Tensor:
        k = n // self.page
        pages, self.free_pages = self.free_pages[:k], self.free_pages[k:]
        return (torch.tensor(pages, dtype=torch.int64)[:, None] * self.page + torch.arange(self.page)).reshape(-1)

    def free_segment(self, idx: torch.Tensor, start_pos: int = 0) -> None:
        self.free_pages.extend((idx[:: self.page] // self.page).tolist())


def unchecked_refcache():
    """Patches out refcache's input validation (token ints, slot pages and ownership) for one run,
    to show what it costs: the only difference from the plain run. Not a mode of the cache."""
    from unittest import mock

    from refcache.cache import HiCache
    from refcache.pools import PageAllocator

    def key(self, tokens, truncate):
        k = tuple(tokens)
        return k[: len(k) - len(k) % self.page_size] if truncate else k

    def pages(self, idx):
        return (idx[:: self.page_size] // self.page_size).tolist()

    return mock.patch.multiple(HiCache, _key=key), mock.patch.multiple(PageAllocator, pages_of=pages)


def run_refcache_unchecked(reqs: list[list[int]], page: int, capacity: int) -> dict:
    a, b = unchecked_refcache()
    with a, b:
        r = run_refcache(reqs, page, capacity)
    return dict(r, name="refcache, validation patched out")


def run_sglang_radix(reqs: list[list[int]], page: int, capacity: int) -> dict:
    from sglang.srt.mem_cache.radix_cache import RadixCache

    a = _Alloc(capacity, page)
    c = RadixCache.create_simulated(mock_allocator=a, page_size=page)
    return _time_sglang(c, a, reqs, f"SGLang {shim.loaded().version} RadixCache", frees_duplicates=False)


def run_sglang_unified(reqs: list[list[int]], page: int, capacity: int, core: str) -> dict:
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.unified_cache.component_type import ComponentType
    from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

    a = _Alloc(capacity, page)
    c = UnifiedRadixCache(CacheInitParams(disable=False, req_to_token_pool=None, token_to_kv_pool_allocator=a,
                                          page_size=page, tree_components=(ComponentType.FULL,),
                                          tree_core_backend=core))
    return _time_sglang(c, a, reqs, f"SGLang {shim.loaded().version} UnifiedRadixCache ({core} core)",
                        frees_duplicates=True)


def _time_sglang(c, a: _Alloc, reqs: list[list[int]], name: str, frees_duplicates: bool) -> dict:
    """The request cycle on an SGLang tree; `frees_duplicates`: its insert frees the slots of the
    prefix it already held (UnifiedRadixCache), else the caller does (RadixCache)."""
    from sglang.srt.mem_cache.base_prefix_cache import InsertParams, MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    tm = Timer()
    pc = time.perf_counter
    for t in reqs:
        t0 = pc()
        c.match_prefix(MatchPrefixParams(key=RadixKey(array("q", t))))
        t1 = pc()
        idx = a.alloc(len(t))
        t2 = pc()
        r = c.insert(InsertParams(key=RadixKey(array("q", t)), value=idx))
        t3 = pc()
        if not frees_duplicates and r.prefix_len:
            a.free_segment(idx[: r.prefix_len])
        tm.match += t1 - t0
        tm.insert += t3 - t2
    return tm.result(name, reqs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--prefixes", type=int, default=32)
    ap.add_argument("--prefix-len", type=int, default=512)
    ap.add_argument("--suffix-len", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3, help="runs per cache; the best is reported")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--unified", action="store_true", help="also UnifiedRadixCache, Python and Rust tree cores")
    ap.add_argument("--unchecked", action="store_true",
                    help="also refcache with its input validation patched out (what validation costs)")
    a = ap.parse_args(argv)
    why = shim.missing_reason("0.5.23")
    if why:
        print(f"cannot run: {why}")
        return 2
    shim.load("0.5.23")
    reqs = workload(a.requests, a.prefixes, a.prefix_len, a.suffix_len, a.page_size, a.seed)
    cap = sum(map(len, reqs)) + a.page_size
    runs = [("refcache", lambda: run_refcache(reqs, a.page_size, cap)),
            ("radix", lambda: run_sglang_radix(reqs, a.page_size, cap))]
    if a.unchecked:
        runs.append(("refcache-unchecked", lambda: run_refcache_unchecked(reqs, a.page_size, cap)))
    if a.unified:
        runs += [(f"unified-{k}", lambda k=k: run_sglang_unified(reqs, a.page_size, cap, k)) for k in ("python", "rust")]
    best: dict[str, dict] = {}
    for _ in range(a.repeat):  # interleaved, so drift hits every cache alike
        for key, fn in runs:
            r = fn()
            if key not in best or r["match_s"] + r["insert_s"] < best[key]["match_s"] + best[key]["insert_s"]:
                best[key] = r
    toks = sum(map(len, reqs))
    print(f"device: CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
          f"python {platform.python_version()}; {len(reqs)} requests, {toks} tokens, page {a.page_size}; "
          f"best of {a.repeat}")
    print(f"{'cache':46} {'match/s':>10} {'insert/s':>10} {'Mtok/s':>8}")
    for r in best.values():
        print(f"{r['name']:46} {r['match_per_s']:10.0f} {r['insert_per_s']:10.0f} {r['mtok_per_s']:8.2f}")
    rf, sg = best["refcache"], best["radix"]
    print(f"ratio refcache / SGLang RadixCache: match {rf['match_per_s'] / sg['match_per_s']:.2f}x, "
          f"insert {rf['insert_per_s'] / sg['insert_per_s']:.2f}x, "
          f"match+insert {(sg['match_s'] + sg['insert_s']) / (rf['match_s'] + rf['insert_s']):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

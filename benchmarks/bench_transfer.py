"""Paged L1<->L2 KV transfers against the contiguous pinned-copy ceiling of the same GPU, plus
match_prefix/insert throughput. One run prints everything (DESIGN.md §6 figures):

    PYTHONPATH=. python -m benchmarks.bench_transfer [--json PATH] [--quick]

- contiguous: one pinned<->device copy of the batch's byte count (the copy engine's ceiling);
- paged: n scattered pages of every layer, layer-first L1 [L, 2, slots, H, D] <-> page-first
  pinned L2 [pages, L, 2, page_size, H, D], through each mechanism of refcache.kernels, and a
  naive per-page `copy_` baseline; ratio = paged / contiguous at the same byte count;
- end to end: HiCache.write_backup / load_back of one scattered node, submit to done (wall clock);
- tree: match_prefix and insert operations per second.
Times are medians of CUDA-event intervals (after warm-up); each paged copy is checked on sampled pages.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

import torch

from refcache import CacheConfig, HiCache
from refcache.kernels import PageGeometry, copy_pages, triton_available

L, H, D, DTYPE = 32, 8, 128, torch.float16  # an 8B-class model's KV: 128 KiB per token
TOKEN_BYTES = L * 2 * H * D * 2
GIB = 1 << 30
MIB = 1 << 20


def cuda_time_ms(fn, reps: int, warmup: int = 2) -> float:
    """Median CUDA-event time of `fn` on the current stream (CPU issue time included)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def gibps(nbytes: int, ms: float) -> float:
    return nbytes / GIB / (ms / 1e3)


class Pools:
    """One device pool and one pinned host pool of `tokens` tokens, viewed at any page size."""

    def __init__(self, tokens: int):
        self.tokens = tokens
        self.dev = torch.empty((L, 2, tokens, H, D), dtype=DTYPE, device="cuda")
        self.host_flat = torch.empty(L * 2 * tokens * H * D, dtype=DTYPE, pin_memory=True)
        g = torch.Generator(device="cuda").manual_seed(0)
        self.dev.normal_(generator=g)
        self.host_flat.copy_(self.dev.view(-1))  # random data on both sides (never time zeros)

    def host(self, ps: int) -> torch.Tensor:
        return self.host_flat.view(self.tokens // ps, L, 2, ps, H, D)


def naive_copy(pools: Pools, ps: int, src_pages, dst_pages, to_host: bool) -> None:
    """One `copy_` per page: what a straightforward port does."""
    host = pools.host(ps)
    for a, b in zip(src_pages, dst_pages, strict=True):
        if to_host:
            host[b].copy_(pools.dev[:, :, a * ps:(a + 1) * ps], non_blocking=True)
        else:
            pools.dev[:, :, b * ps:(b + 1) * ps].copy_(host[a], non_blocking=True)


def paged_fn(pools: Pools, ps: int, mech: str, to_host: bool, dev_side: tuple, host_side: tuple):
    """The copy to time: (geometry, page tensor, page list) of each side."""
    (dg, dp, dev_pages), (hg, hp, host_pages) = dev_side, host_side
    host = pools.host(ps)
    if mech == "naive":
        src, dst = (dev_pages, host_pages) if to_host else (host_pages, dev_pages)
        return lambda: naive_copy(pools, ps, src, dst, to_host)
    if to_host:
        return lambda: copy_pages(pools.dev, dg, dp, host, hg, hp, mech)
    return lambda: copy_pages(host, hg, hp, pools.dev, dg, dp, mech)


def check_pages(pools: Pools, ps: int, src_pages, dst_pages, to_host: bool, rng: random.Random) -> None:
    torch.cuda.synchronize()
    host = pools.host(ps)
    for i in rng.sample(range(len(src_pages)), min(8, len(src_pages))):
        a, b = src_pages[i], dst_pages[i]
        d, h = (a, b) if to_host else (b, a)
        if not torch.equal(pools.dev[:, :, d * ps:(d + 1) * ps].cpu(), host[h]):
            raise AssertionError(f"page {i} wrong after the copy (page_size {ps}, {'D2H' if to_host else 'H2D'})")


def bench_paged(pools: Pools, page_sizes, batch_bytes, reps: int, naive_max_pages: int, rows: list, contig: dict):
    rng = random.Random(0)
    mechanisms = (["kernel"] if triton_available() else []) + ["copy_engine"]
    for ps in page_sizes:
        P = pools.tokens // ps
        dg = PageGeometry.of(pools.dev, ps, page_first=False)
        hg = PageGeometry.of(pools.host(ps), ps, page_first=True)
        for nbytes in batch_bytes:
            n = nbytes // (ps * TOKEN_BYTES)
            dev_pages, host_pages = rng.sample(range(P), n), rng.sample(range(P), n)  # scattered
            dp = torch.tensor(dev_pages, device="cuda")
            hp = torch.tensor(host_pages)  # the cache keeps host indices on the CPU
            for mech in mechanisms + (["naive"] if n <= naive_max_pages else []):
                res = {"page_size": ps, "pages": n, "MiB": nbytes // MIB, "mechanism": mech}
                for name, to_host in (("load_back_h2d", False), ("backup_d2h", True)):
                    fn = paged_fn(pools, ps, mech, to_host, (dg, dp, dev_pages), (hg, hp, host_pages))
                    r = max(1, reps // 2) if mech == "naive" else reps
                    ms = cuda_time_ms(fn, r, warmup=1 if mech == "naive" else 2)
                    src_l, dst_l = (dev_pages, host_pages) if to_host else (host_pages, dev_pages)
                    check_pages(pools, ps, src_l, dst_l, to_host, rng)
                    bw = gibps(nbytes, ms)
                    ref = contig[("d2h" if to_host else "h2d", nbytes)]
                    res[name] = round(bw, 2)
                    res[name + "_ratio"] = round(bw / ref, 3)
                rows.append(res)
                print(json.dumps(res), flush=True)


def bench_contiguous(pools: Pools, batch_bytes, reps: int) -> dict:
    out = {}
    for nbytes in batch_bytes:
        n = nbytes // 2
        d, h = pools.dev.view(-1)[:n], pools.host_flat[:n]
        out[("h2d", nbytes)] = gibps(nbytes, cuda_time_ms(lambda d=d, h=h: d.copy_(h, non_blocking=True), reps))
        out[("d2h", nbytes)] = gibps(nbytes, cuda_time_ms(lambda d=d, h=h: h.copy_(d, non_blocking=True), reps))
    return out


def bench_end_to_end(n_pages: int, ps: int, reps: int, device: str = "cuda") -> dict:
    """HiCache.write_backup and load_back of one node of `n_pages` scattered pages, wall clock from
    the call to the executor reporting every part done."""
    cfg = CacheConfig(page_size=ps, device_tokens=2 * n_pages * ps, host_tokens=2 * n_pages * ps, num_layers=L,
                      num_heads=H, head_dim=D, dtype=DTYPE, device=device, write_policy="write_back", swa_window=ps)
    c = HiCache(cfg)
    c.device_kv.data.normal_()
    rng = random.Random(1)
    hold = c.alloc_device(cfg.device_tokens).view(-1, ps)  # fragment L1 and L2: keep a random half of each
    keep = set(rng.sample(range(2 * n_pages), n_pages))
    c.free_device(hold[[p for p in range(2 * n_pages) if p not in keep]].reshape(-1))
    ha = c.host_kv.allocator
    hh = ha.alloc(cfg.host_tokens).view(-1, ps)
    hkeep = set(rng.sample(range(2 * n_pages), n_pages))
    ha.free(hh[[p for p in range(2 * n_pages) if p not in hkeep]].reshape(-1))
    nbytes = n_pages * ps * TOKEN_BYTES
    back, load = [], []
    for rep in range(reps + 1):
        toks = [rng.randrange(1 << 20) for _ in range(n_pages * ps)]
        idx = c.alloc_device(n_pages * ps, evict=False)
        c.insert(toks, idx)
        node = c.match_prefix(toks).last_device_node
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        c.write_backup(node)
        c.executor.complete_all()
        t1 = time.perf_counter()
        assert len(c.poll()) == 1 and node.host_value is not None
        c.evict(10**9)
        m = c.match_prefix(toks)
        assert m.device_len == 0 and m.host_hit_length == len(toks)
        t2 = time.perf_counter()
        c.load_back(m.best_match_node)
        c.executor.complete_all()
        t3 = time.perf_counter()
        assert len(c.poll()) == 1 and c.match_prefix(toks).device_len == len(toks)
        c.evict(10**9)
        c.evict_host(10**9)
        if rep:  # the first round warms up
            back.append(t1 - t0)
            load.append(t3 - t2)
    return {"page_size": ps, "pages": n_pages, "MiB": nbytes // MIB,
            "write_backup_GiBps": round(nbytes / GIB / statistics.median(back), 2),
            "load_back_GiBps": round(nbytes / GIB / statistics.median(load), 2)}


def bench_tree(device: str, n_requests: int) -> dict:
    """Insert (with its allocation) and match_prefix throughput on a serving-like workload: a few
    shared system prompts, then per-request turns."""
    ps = 16
    cfg = CacheConfig(page_size=ps, device_tokens=1 << 20, host_tokens=ps, num_layers=1, num_heads=1, head_dim=8,
                      device=device, write_policy="write_back", swa_window=ps)
    c = HiCache(cfg)
    rng = random.Random(2)
    stems = [[rng.randrange(32000) for _ in range(256)] for _ in range(8)]
    reqs = [rng.choice(stems) + [rng.randrange(32000) for _ in range(ps * rng.randint(1, 24))]
            for _ in range(n_requests)]
    t0 = time.perf_counter()
    for toks in reqs:
        idx = c.alloc_device(len(toks))
        res = c.insert(toks, idx)
        if res.cached_len:
            c.free_device(idx[: res.cached_len])
    t1 = time.perf_counter()
    for toks in reqs:
        c.match_prefix(toks)
    t2 = time.perf_counter()
    return {"device": device, "requests": n_requests, "insert_ops_per_s": round(n_requests / (t1 - t0)),
            "match_prefix_ops_per_s": round(n_requests / (t2 - t1))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write every number here")
    ap.add_argument("--quick", action="store_true", help="smaller batches and fewer repeats")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--sections", default="paged,e2e,tree", help="comma-separated: paged (with contiguous), e2e, tree")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_transfer needs CUDA; nothing measured", file=sys.stderr)
        return 2
    import importlib.metadata as md

    def version(p):
        try:
            return md.version(p)
        except md.PackageNotFoundError:
            return "absent"

    gpu = torch.cuda.get_device_name()
    header = (f"GPU: {gpu} | torch {torch.__version__} | triton {version('triton')} | "
              f"KV {L} layers x 2 x {H} heads x {D} dim {str(DTYPE).replace('torch.', '')} = {TOKEN_BYTES // 1024} KiB/token")
    print(header, flush=True)
    batch_bytes = [64 * MIB, 256 * MIB] if args.quick else [128 * MIB, 512 * MIB, 2 * GIB]
    page_sizes = [1, 16, 64]
    reps = 3 if args.quick else args.reps
    sections = set(args.sections.split(","))
    contig: dict = {}
    rows: list[dict] = []
    if "paged" in sections:
        pools = Pools(2 * max(batch_bytes) // TOKEN_BYTES)
        contig = bench_contiguous(pools, batch_bytes, reps)
        bench_paged(pools, page_sizes, batch_bytes, reps, naive_max_pages=1024, rows=rows, contig=contig)
        del pools
        torch.cuda.empty_cache()
    e2e = [bench_end_to_end(max(batch_bytes) // (16 * TOKEN_BYTES), 16, 3 if not args.quick else 2)] if "e2e" in sections else []
    tree = [bench_tree(d, 500 if args.quick else 2000) for d in ("cuda", "cpu")] if "tree" in sections else []

    print("\n" + header)
    print("contiguous pinned copy (copy engine, one cudaMemcpyAsync):")
    print(f"  {'MiB':>6} {'H2D GiB/s':>10} {'D2H GiB/s':>10}")
    for nb in batch_bytes if contig else []:
        print(f"  {nb // MIB:>6} {contig[('h2d', nb)]:>10.2f} {contig[('d2h', nb)]:>10.2f}")
    print("paged, scattered pages of all layers (ratio = paged / contiguous of the same size):")
    print(f"  {'page':>4} {'pages':>6} {'MiB':>6} {'mechanism':>12} {'load_back H2D':>14} {'ratio':>6} "
          f"{'backup D2H':>11} {'ratio':>6}")
    for r in rows:
        print(f"  {r['page_size']:>4} {r['pages']:>6} {r['MiB']:>6} {r['mechanism']:>12} {r['load_back_h2d']:>14.2f} "
              f"{r['load_back_h2d_ratio']:>6.2f} {r['backup_d2h']:>11.2f} {r['backup_d2h_ratio']:>6.2f}")
    print("end to end through HiCache (call to executor done, wall clock):")
    for r in e2e:
        print(f"  page {r['page_size']} x {r['pages']} pages ({r['MiB']} MiB): write_backup {r['write_backup_GiBps']} GiB/s, "
              f"load_back {r['load_back_GiBps']} GiB/s")
    print("radix tree:")
    for r in tree:
        print(f"  device={r['device']}: insert {r['insert_ops_per_s']} ops/s, match_prefix "
              f"{r['match_prefix_ops_per_s']} ops/s ({r['requests']} requests)")
    big = [r for r in rows if r["MiB"] == max(batch_bytes) // MIB and r["mechanism"] == "kernel"]
    if big:
        worst = min(min(r["load_back_h2d_ratio"], r["backup_d2h_ratio"]) for r in big)
        print(f"largest batch ({max(batch_bytes) // MIB} MiB), kernel: worst ratio {worst:.2f} (target >= 0.80)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": gpu, "header": header,
                       "contiguous": [{"MiB": nb // MIB, "h2d": contig[("h2d", nb)], "d2h": contig[("d2h", nb)]}
                                      for nb in batch_bytes if contig],
                       "paged": rows, "end_to_end": e2e, "tree": tree}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Paged L1<->L2 KV transfers against the contiguous pinned-copy ceiling of the same GPU, plus
match_prefix/insert throughput. One run prints everything (DESIGN.md §6 figures):

    PYTHONPATH=. python -m benchmarks.bench_transfer [--json PATH] [--quick]

- contiguous: one pinned<->device copy of the batch's byte count (the copy engine's ceiling);
- paged: n scattered pages of every layer, layer-first L1 [L, 2, slots, H, D] <-> page-first
  pinned L2 [pages, L, 2, page_size, H, D], through each mechanism of refcache.kernels, and a
  naive per-page `copy_` baseline; ratio = paged / contiguous at the same byte count;
- end to end: HiCache.write_backup / load_back of one scattered node, submit to done (wall clock);
- tree: match_prefix and insert operations per second;
- compare (`--sections compare`): refcache's paged copy beside SGLang 0.5.23's HiCache transfer ops
  (its JIT kernels, built from its sources by benchmarks/sglang_hicache.py) on the same bytes,
  page sizes and scattered pages, both directions, each side in its own layout, and both beside
  a contiguous pinned copy of the same byte count (see `bench_compare`).
Times are medians of CUDA-event intervals (after warm-up); each paged copy is checked on sampled pages.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from refcache import CacheConfig, HiCache
from refcache.kernels import DEFAULT_SHAPE, KernelShape, PageGeometry, copy_pages, select_mechanism, triton_available

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



# ------------------------------------------------------------------------------ refcache vs SGLang
SLEEP_CYCLES = 4_000_000  # ~2 ms of GPU spin ahead of a "queued" measurement


def time_ms(fn, reps: int, warmup: int, queued: bool) -> float:
    """Median CUDA-event time of `fn`. queued: the stream is kept busy (a ~2 ms spin) while the
    CPU issues the copy, as on a serving engine's copy stream, so Python and launch overhead are
    hidden up to that much; cold: the stream is idle, issue time included."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if queued:
            torch.cuda._sleep(SLEEP_CYCLES)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16) if t.element_size() == 2 else t.contiguous().view(torch.int32)


TUNING_SHAPES = [  # refcache kernel launch shapes tried with --variants (KernelShape fields); on the
    # H200 all of these landed within 1% of each other (benchmarks/RESULTS.md): (8192, 1, 4) was the
    # default before, DEFAULT_SHAPE is (8192, 8, 8)
    KernelShape(8192, 1, 4, False), KernelShape(8192, 1, 8, False), KernelShape(16384, 1, 8, False),
    KernelShape(4096, 2, 4, False), KernelShape(2048, 4, 4, False), KernelShape(2048, 8, 8, False),
    KernelShape(2048, 16, 8, False), KernelShape(8192, 1, 4, True), KernelShape(2048, 4, 4, True),
]
VARIANT_MECHANISMS = ("dma", "dma_batch", "copy_engine")


def _effective(shape: KernelShape, row_bytes: int) -> tuple:
    block = max(256, min(shape.block_bytes, 1 << (row_bytes - 1).bit_length()))
    runs = shape.runs if block >= row_bytes else 1
    return block, runs, max(1, min(shape.num_warps, runs * block // 512)), shape.streaming


@dataclass
class Case:
    """One page size and batch: scattered pages on both sides, their token indices, the views."""

    pools: Pools
    ps: int
    dev_pages: list
    host_pages: list
    sample: list

    shapes: tuple = ()

    def __post_init__(self):
        ps = self.ps
        self.host = self.pools.host(ps)
        self.dg = PageGeometry.of(self.pools.dev, ps, page_first=False)
        self.hg = PageGeometry.of(self.host, ps, page_first=True)
        self.dp = torch.tensor(self.dev_pages, device="cuda")  # the cache keeps device pages on the GPU,
        self.hp = torch.tensor(self.host_pages)  # host pages on the CPU
        self.dp_cpu = torch.tensor(self.dev_pages)
        offs = torch.arange(ps)
        self.dev_tok = (self.dp[:, None] * ps + offs.cuda()[None, :]).reshape(-1)
        self.host_tok_cpu = (self.hp[:, None] * ps + offs[None, :]).reshape(-1)
        self.host_tok_gpu = self.host_tok_cpu.cuda()

    def dev_page(self, i: int) -> torch.Tensor:
        d = self.dev_pages[i]
        return self.pools.dev[:, :, d * self.ps:(d + 1) * self.ps]

    def host_tokens(self, i: int) -> torch.Tensor:
        return self.host_tok_cpu[i * self.ps:(i + 1) * self.ps]

    # refcache: copy_pages / a kernel shape, between our two layouts
    def ours(self, to_host: bool, mech: str | None = None, shape: KernelShape | None = None, cpu_lists=False):
        from refcache.kernels import _copy_triton

        dev, dg, dp, host, hg, hp = self.pools.dev, self.dg, self.dp, self.host, self.hg, self.hp
        if cpu_lists:
            dp = self.dp_cpu
        if shape is not None:
            if to_host:
                return lambda: _copy_triton(dev, dg, dp, host, hg, hp, shape)
            return lambda: _copy_triton(host, hg, hp, dev, dg, dp, shape)
        if to_host:
            return lambda: copy_pages(dev, dg, dp, host, hg, hp, mech)
        return lambda: copy_pages(host, hg, hp, dev, dg, dp, mech)

    def ours_poison(self, to_host: bool) -> None:
        for i in self.sample:
            if to_host:
                self.host[self.host_pages[i]] = float("nan")
            else:
                self.dev_page(i).fill_(float("nan"))

    def ours_check(self) -> str | None:
        for i in self.sample:
            if not torch.equal(_bits(self.dev_page(i).cpu()), _bits(self.host[self.host_pages[i]])):
                return f"page {i} differs"
        return None

    # SGLang: one SGLangHostPool over the same bytes
    def theirs(self, side, to_host: bool):
        if to_host:
            return lambda: side.backup(self.dev_tok, self.host_tok_cpu, self.host_tok_gpu)
        return lambda: side.load(self.host_tok_gpu, self.dev_tok)

    def theirs_poison(self, side, to_host: bool) -> None:
        for i in self.sample:
            if to_host:
                side.poison_host(self.host_tokens(i))
            else:
                self.dev_page(i).fill_(float("nan"))

    def theirs_check(self, side) -> str | None:
        for i in self.sample:
            if not torch.equal(_bits(self.dev_page(i).cpu()), _bits(side.host_page(self.host_tokens(i)))):
                return f"page {i} differs"
        return None

    def entries(self, to_host: bool, sides: dict, variants: bool) -> dict:
        """name -> (copy, poison, check, what it runs)."""
        dev, host = (self.pools.dev, self.host) if to_host else (self.host, self.pools.dev)
        dgeo, hgeo = (self.dg, self.hg) if to_host else (self.hg, self.dg)
        dpl, hpl = (self.dp, self.hp) if to_host else (self.hp, self.dp)
        mech = select_mechanism(dev, dgeo, dpl, host, hgeo, hpl)
        poison, check = functools.partial(self.ours_poison, to_host), self.ours_check
        out = {"refcache": (self.ours(to_host), poison, check, f"copy_pages[{mech}] (device pages on the GPU)")}
        dpl = self.dp_cpu if to_host else self.hp
        hpl = self.hp if to_host else self.dp_cpu
        mech = select_mechanism(dev, dgeo, dpl, host, hgeo, hpl)
        out["refcache_cpu"] = (self.ours(to_host, cpu_lists=True), poison, check,
                               f"copy_pages[{mech}] (both page lists on the CPU)")
        if variants:
            row_bytes = self.hg.row_elems * self.host.element_size()
            seen = {_effective(DEFAULT_SHAPE, row_bytes)}
            for shape in self.shapes:
                eff = _effective(shape, row_bytes)
                if eff not in seen:
                    seen.add(eff)
                    name = f"k{shape.block_bytes // 1024}k_r{shape.runs}_w{shape.num_warps}" + ("_s" if shape.streaming else "")
                    out[name] = (self.ours(to_host, shape=shape), poison, check, str(eff))
            for m in VARIANT_MECHANISMS:
                out[m] = (self.ours(to_host, mech=m, cpu_lists=True), poison, check, m + " (CPU page lists)")
        for name, side in sides.items():
            out[name] = (self.theirs(side, to_host), functools.partial(self.theirs_poison, side, to_host),
                         functools.partial(self.theirs_check, side), side.kernel_names()["backup" if to_host else "load"])
        return out


def _reps(nbytes: int, reps: int) -> tuple[int, int]:
    return (reps, 2) if nbytes < GIB else (max(3, reps // 2), 1)


def measure(fn, poison, check, nbytes: int, reps: int, contig_of) -> dict:
    """Check (poisoned sample, one copy, bit-exact), then time queued and cold, then check again."""
    res = {}
    try:
        torch.cuda.synchronize()
        poison()
        fn()
        torch.cuda.synchronize()
        bad = check()
        if bad:
            raise AssertionError(bad)
        r, w = _reps(nbytes, reps)
        for mode in ("queued", "cold"):
            bw = gibps(nbytes, time_ms(fn, r, w, mode == "queued"))
            res[mode] = round(bw, 2)
            res[mode + "_vs_contig"] = round(bw / contig_of(mode), 3)
        bad = check()
        if bad:
            raise AssertionError(bad + " after timing")
    except Exception as e:  # noqa: BLE001 - one failing variant must not end the run
        res["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        torch.cuda.synchronize()
    return res


def _load_sglang(require: bool, info: dict):
    try:
        from benchmarks import sglang_hicache as S

        built = S.prebuild(D * H * torch.finfo(DTYPE).bits // 8)
        info["build"], info["log"] = built, S.LOG
        if all(v == "ok" for v in built.values()):
            return S
        print(f"SGLang build failed: {built}", file=sys.stderr, flush=True)
    except Exception as e:  # noqa: BLE001 - reported, and fatal only with --require-sglang
        info["error"] = f"{type(e).__name__}: {e}"
        print(f"SGLang HiCache ops unavailable: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    if require:
        raise SystemExit("--require-sglang: SGLang's HiCache ops could not be built or loaded (see above)")
    return None


def bench_compare(sizes, page_sizes, reps: int, variants: bool, require_sglang: bool, shapes=()) -> dict:
    """`_bench_compare` on a dedicated CUDA stream: a serving engine copies on its own streams, and
    some copy paths (cudaMemcpyBatchAsync, in SGLang's staged write-back and our dma_batch) refuse
    the legacy default stream and fall back to one copy per page there."""
    with torch.cuda.stream(torch.cuda.Stream()):
        return _bench_compare(sizes, page_sizes, reps, variants, require_sglang, shapes)


def _bench_compare(sizes, page_sizes, reps: int, variants: bool, require_sglang: bool, shapes=()) -> dict:
    """For each page size, batch size and direction, on one device pool [L, 2, tokens, H, D] and
    one pinned host buffer (each side views the same bytes in its own layout):
    - contiguous: one cudaMemcpyAsync of the batch's byte count (the copy engine);
    - refcache: `copy_pages` (its default choice) between the layer-first device pool and the
      page-first host pool [pages, L, 2, ps, H, D]; page lists: device pages on the GPU, host
      pages on the CPU, as the cache keeps them; refcache_cpu: the same with both page lists on
      the CPU, which lets `select_mechanism` use the copy engine for large pages;
    - sglang_pf / sglang_lf: SGLang's MHA host pool in its page_first layout (its default,
      [2, tokens, L, H, D]) and in layer_first ([2, L, tokens, H, D]), device pool per layer
      [tokens, H, D] (the same device bytes), io_backend "kernel" (its default); backup is one
      all-layer call, load is one call per layer (benchmarks/sglang_hicache.SGLangHostPool);
      token indices int64 on the GPU (host ones on the CPU where the op wants them there);
    - with `variants`, refcache kernel launch shapes and copy-engine mechanisms, for tuning.
    Every entry is first checked: sampled destination pages poisoned, one copy, compared bit for bit."""
    out = {"rows": [], "sglang": {}, "contiguous": []}
    sgl = _load_sglang(require_sglang, out["sglang"])
    pools = Pools(2 * max(sizes) // TOKEN_BYTES)
    rng = random.Random(0)
    contig = {}
    for nbytes in sizes:
        n = nbytes // 2
        d, h = pools.dev.view(-1)[:n], pools.host_flat[:n]
        r, w = _reps(nbytes, reps)
        for mode in ("queued", "cold"):
            q = mode == "queued"
            contig[("h2d", nbytes, mode)] = gibps(nbytes, time_ms(functools.partial(d.copy_, h, non_blocking=True), r, w, q))
            contig[("d2h", nbytes, mode)] = gibps(nbytes, time_ms(functools.partial(h.copy_, d, non_blocking=True), r, w, q))
        row = {f"{k[0]}_{k[2]}": round(v, 2) for k, v in contig.items() if k[1] == nbytes}
        out["contiguous"].append({"MiB": nbytes // MIB, **row})
        print(json.dumps(out["contiguous"][-1]), flush=True)
    for ps in page_sizes:
        P = pools.tokens // ps
        sides = {}
        if sgl is not None:
            for layout, name in (("page_first", "sglang_pf"), ("layer_first", "sglang_lf")):
                sides[name] = sgl.SGLangHostPool(pools.dev, pools.host_flat, ps, layout)
            out["sglang"][f"kernels_ps{ps}"] = {k: v.kernel_names() for k, v in sides.items()}
            print(f"page {ps}: SGLang kernels {out['sglang'][f'kernels_ps{ps}']}", flush=True)
        for nbytes in sizes:
            n = nbytes // (ps * TOKEN_BYTES)
            case = Case(pools, ps, rng.sample(range(P), n), rng.sample(range(P), n), rng.sample(range(n), min(8, n)),
                        tuple(shapes))
            for direction in ("d2h", "h2d"):
                for name, (fn, poison, check, what) in case.entries(direction == "d2h", sides, variants).items():
                    res = {"page_size": ps, "pages": n, "MiB": nbytes // MIB, "dir": direction, "name": name, "what": what}
                    res.update(measure(fn, poison, check, nbytes, reps,
                                       functools.partial(lambda d, nb, m: contig[(d, nb, m)], direction, nbytes)))
                    out["rows"].append(res)
                    print(json.dumps(res), flush=True)
    return out


def _f(x: float) -> str:
    return f"{x:7.2f}" if x else "    n/a"


def compare_table(cmp: dict) -> list[str]:
    """The refcache/SGLang/contiguous ratios, one line per (page size, MiB, direction)."""
    lines = []
    by = {}
    for r in cmp["rows"]:
        by.setdefault((r["page_size"], r["MiB"], r["dir"]), {})[r["name"]] = r
    for mode in ("queued", "cold"):
        lines.append(f"[{mode}] GiB/s. ref: refcache as the cache calls it (device pages on the GPU); ref_cpu: both "
                     "page lists on the CPU; sgl: SGLang's better layout; ratios to SGLang and to the contiguous copy")
        lines.append(f"  {'page':>4} {'MiB':>5} {'dir':>4} {'contig':>7} {'ref':>7} {'ref_cpu':>7} {'sgl_pf':>7} {'sgl_lf':>7} "
                     f"{'ref/sgl':>7} {'cpu/sgl':>7} {'ref/cont':>8} {'cpu/cont':>8} {'sgl/cont':>8}  best of ours")
        for (ps, mib, d), rows in sorted(by.items()):
            ref, rc = rows.get("refcache", {}), rows.get("refcache_cpu", {})
            pf, lf = rows.get("sglang_pf", {}), rows.get("sglang_lf", {})
            cont = ref.get(mode, 0) / ref.get(mode + "_vs_contig", 1) if ref.get(mode) else 0
            sg = max(pf.get(mode, 0), lf.get(mode, 0))
            others = [(r.get(mode, 0), n) for n, r in rows.items() if not n.startswith("sglang") and r.get(mode)]
            best = max(others) if others else (0, "-")
            r0, r1 = ref.get(mode, 0), rc.get(mode, 0)
            lines.append(f"  {ps:>4} {mib:>5} {d:>4} {_f(cont)} {_f(r0)} {_f(r1)} {_f(pf.get(mode, 0))} {_f(lf.get(mode, 0))} "
                         f"{(r0 / sg if sg else 0):7.3f} {(r1 / sg if sg else 0):7.3f} "
                         f"{(r0 / cont if cont else 0):8.3f} {(r1 / cont if cont else 0):8.3f} "
                         f"{(sg / cont if sg and cont else 0):8.3f}  "
                         f"{best[1]} {best[0]:.2f} ({best[0] / cont if cont else 0:.3f})")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write every number here")
    ap.add_argument("--quick", action="store_true", help="smaller batches and fewer repeats")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--sections", default="paged,e2e,tree",
                    help="comma-separated: paged (with contiguous), e2e, tree, compare (refcache vs SGLang)")
    ap.add_argument("--sizes", default="128,2048", help="compare: batch sizes in MiB")
    ap.add_argument("--page-sizes", default="1,16,64", help="compare: tokens per page")
    ap.add_argument("--variants", action="store_true", help="compare: also refcache's other copy mechanisms")
    ap.add_argument("--shapes", action="store_true", help="compare: also the kernel launch shapes of TUNING_SHAPES")
    ap.add_argument("--require-sglang", action="store_true", help="compare: fail if SGLang's ops cannot be built")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_transfer needs CUDA (a GPU and a CUDA build of torch); nothing measured", file=sys.stderr)
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
    cmp = None
    if "compare" in sections:
        sizes = [int(x) * MIB for x in args.sizes.split(",")]
        cmp = bench_compare(sizes, [int(x) for x in args.page_sizes.split(",")], args.reps,
                            args.variants or args.shapes, args.require_sglang, TUNING_SHAPES if args.shapes else ())
    e2e = [bench_end_to_end(max(batch_bytes) // (16 * TOKEN_BYTES), 16, 3 if not args.quick else 2)] if "e2e" in sections else []
    tree = [bench_tree(d, 500 if args.quick else 2000) for d in ("cuda", "cpu")] if "tree" in sections else []

    print("\n" + header)
    if cmp is not None:
        print("refcache vs SGLang 0.5.23 HiCache (sglang_pf: its page_first host layout, its default; "
              "sglang_lf: layer_first):")
        for line in compare_table(cmp):
            print(line)
    if contig:
        print("contiguous pinned copy (copy engine, one cudaMemcpyAsync):")
        print(f"  {'MiB':>6} {'H2D GiB/s':>10} {'D2H GiB/s':>10}")
        for nb in batch_bytes:
            print(f"  {nb // MIB:>6} {contig[('h2d', nb)]:>10.2f} {contig[('d2h', nb)]:>10.2f}")
        print("paged, scattered pages of all layers (ratio = paged / contiguous of the same size):")
        print(f"  {'page':>4} {'pages':>6} {'MiB':>6} {'mechanism':>12} {'load_back H2D':>14} {'ratio':>6} "
              f"{'backup D2H':>11} {'ratio':>6}")
        for r in rows:
            print(f"  {r['page_size']:>4} {r['pages']:>6} {r['MiB']:>6} {r['mechanism']:>12} {r['load_back_h2d']:>14.2f} "
                  f"{r['load_back_h2d_ratio']:>6.2f} {r['backup_d2h']:>11.2f} {r['backup_d2h_ratio']:>6.2f}")
    if e2e:
        print("end to end through HiCache (call to executor done, wall clock):")
    for r in e2e:
        print(f"  page {r['page_size']} x {r['pages']} pages ({r['MiB']} MiB): write_backup {r['write_backup_GiBps']} GiB/s, "
              f"load_back {r['load_back_GiBps']} GiB/s")
    if tree:
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
                       "paged": rows, "end_to_end": e2e, "tree": tree, "compare": cmp}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

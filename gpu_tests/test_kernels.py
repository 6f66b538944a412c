"""Paged copies (refcache.kernels) against an independent reference, bit for bit.

Sources hold random bits (NaN and inf patterns included: the copy moves words, not values);
destinations are poisoned with NaN first, and the whole destination is compared, so a page that
was not written, written twice, swapped, or written outside its place shows. Every mechanism,
both layouts, three dtypes, odd and realistic shapes, scattered/contiguous/reversed page lists.
The `torch` mechanism on CPU runs everywhere; everything touching CUDA skips without it.
"""

from __future__ import annotations

import random

import pytest
import torch

from refcache.kernels import MECHANISMS, PageGeometry, copy_pages, default_mechanism, triton_available
from refcache.pools import KVPool, copy_kv

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
SHAPES = [  # (layers, heads, head_dim, page_size)
    (1, 1, 1, 1),
    (3, 1, 3, 1),  # 6-byte rows in fp16: 2-byte words
    (2, 2, 8, 4),
    (5, 3, 7, 3),
    (4, 8, 128, 16),
    (2, 4, 64, 64),
]
PATTERNS = ["scattered", "contiguous", "reversed", "single", "all"]
_INT = {2: torch.int16, 4: torch.int32}


def random_bits(shape, dtype, device, gen: torch.Generator) -> torch.Tensor:
    """Uniform random bit patterns of `dtype` (NaNs, infs and subnormals included)."""
    it = _INT[torch.empty((), dtype=dtype).element_size()]
    info = torch.iinfo(it)
    return torch.randint(info.min, info.max, shape, dtype=it, generator=gen).view(dtype).to(device)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.cpu().view(_INT[t.element_size()])


def layer_first(L, H, D, slots, dtype, device, pin=False):
    return torch.empty((L, 2, slots, H, D), dtype=dtype, device=device, pin_memory=pin)


def page_first(L, H, D, ps, pages, dtype, device, pin=False):
    return torch.empty((pages, L, 2, ps, H, D), dtype=dtype, device=device, pin_memory=pin)


def page_of(t: torch.Tensor, page_first_layout: bool, ps: int, p: int) -> torch.Tensor:
    """Page p of a pool tensor as an [L, 2, ps, H, D] view, from the layout's definition."""
    return t[p] if page_first_layout else t[:, :, p * ps:(p + 1) * ps]


def reference(src, src_pf, dst, dst_pf, ps, src_pages, dst_pages) -> torch.Tensor:
    """What `dst` must become: a page-by-page copy on CPU, written without PageGeometry."""
    s, d = src.cpu(), dst.cpu().clone()
    for a, b in zip(src_pages, dst_pages, strict=True):
        page_of(d, dst_pf, ps, b).copy_(page_of(s, src_pf, ps, a))
    return d


def page_lists(pattern: str, n_src: int, n_dst: int, rng: random.Random) -> tuple[list[int], list[int]]:
    n = min(n_src, n_dst)
    if pattern == "single":
        return [rng.randrange(n_src)], [rng.randrange(n_dst)]
    if pattern == "contiguous":
        k = max(1, n // 2)
        a, b = rng.randrange(n_src - k + 1), rng.randrange(n_dst - k + 1)
        return list(range(a, a + k)), list(range(b, b + k))
    if pattern == "reversed":
        k = max(1, n // 2)
        return list(range(k))[::-1], list(range(n_dst - k, n_dst))
    if pattern == "all":
        return rng.sample(range(n_src), n), rng.sample(range(n_dst), n)
    k = max(1, n // 3)
    return rng.sample(range(n_src), k), rng.sample(range(n_dst), k)


def _run_case(direction, mechanism, dtype, shape, pattern, seed=0):
    L, H, D, ps = shape
    rng = random.Random(hash((direction, mechanism, str(dtype), shape, pattern, seed)) & 0xFFFF)
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    dev_pages, host_pages = 11, 13
    cpu_only = direction == "cpu"
    dev = "cpu" if cpu_only else "cuda"
    pin = not cpu_only
    if direction in ("d2h", "cpu"):
        src = layer_first(L, H, D, dev_pages * ps, dtype, dev)
        dst = page_first(L, H, D, ps, host_pages, dtype, "cpu", pin=pin)
        src_pf, dst_pf = False, True
    elif direction == "h2d":
        src = page_first(L, H, D, ps, host_pages, dtype, "cpu", pin=True)
        dst = layer_first(L, H, D, dev_pages * ps, dtype, dev)
        src_pf, dst_pf = True, False
    else:  # d2d: layer-first pool to a page-first staging buffer on the GPU
        src = layer_first(L, H, D, dev_pages * ps, dtype, dev)
        dst = page_first(L, H, D, ps, host_pages, dtype, dev)
        src_pf, dst_pf = False, True
    src.copy_(random_bits(src.shape, dtype, "cpu", gen))
    dst.fill_(float("nan"))
    sg, dg = PageGeometry.of(src, ps, src_pf), PageGeometry.of(dst, ps, dst_pf)
    n_src, n_dst = sg.num_pages(src), dg.num_pages(dst)
    assert (n_src, n_dst) == ((host_pages, dev_pages) if src_pf else (dev_pages, host_pages if dst_pf else dev_pages))
    sp, dp = page_lists(pattern, n_src, n_dst, rng)
    want = reference(src, src_pf, dst, dst_pf, ps, sp, dp)
    index_dev = "cuda" if (not cpu_only and rng.random() < 0.5) else "cpu"  # page lists may live anywhere
    side = torch.cuda.Stream() if not cpu_only else None
    if side is not None:  # run on a side stream: the copy must be ordered by the stream it was issued on
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            copy_pages(src, sg, torch.tensor(sp, device=index_dev), dst, dg, torch.tensor(dp, device=index_dev),
                       mechanism)
        side.synchronize()
    else:
        copy_pages(src, sg, torch.tensor(sp), dst, dg, torch.tensor(dp), mechanism)
    got = bits(dst)
    assert torch.equal(got, bits(want)), (
        f"{int((got != bits(want)).sum())} words differ ({direction}, {mechanism}, {dtype}, {shape}, {pattern})")


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_mechanism_on_cpu(dtype, shape, pattern):
    """The CPU fallback is the reference copy (runs without CUDA)."""
    _run_case("cpu", "torch", dtype, shape, pattern)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("direction", ["d2h", "h2d", "d2d"])
def test_copy_matches_reference_on_cuda(direction, mechanism, dtype, shape, pattern):
    """Every mechanism, both ways across PCIe and within the GPU, equals the reference copy."""
    if mechanism == "kernel" and not triton_available():
        pytest.skip("Triton is not installed")
    for seed in range(2):
        _run_case(direction, mechanism, dtype, shape, pattern, seed)


@needs_cuda
@pytest.mark.gpu
def test_default_mechanism_is_the_kernel_across_pcie():
    """With Triton present, pinned host <-> GPU copies use the kernel; pageable or CPU-only ones
    fall back to torch."""
    g = torch.empty(4, device="cuda")
    pinned, pageable = torch.empty(4, pin_memory=True), torch.empty(4)
    want = "kernel" if triton_available() else "copy_engine"
    assert default_mechanism(g, pinned) == want and default_mechanism(pinned, g) == want
    assert default_mechanism(g, pageable) == "torch" and default_mechanism(pageable, pageable) == "torch"


def _pool_pair(device, L=3, H=2, D=8, ps=4, dtype=torch.bfloat16):
    d = KVPool("L1", 16 * ps, ps, L, H, D, dtype, torch.device(device), page_first=False)
    h = KVPool("L2", 20 * ps, ps, L, H, D, dtype, torch.device("cpu"), page_first=True, pin=device == "cuda")
    return d, h


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("seed", range(5))
def test_kvpool_cuda_matches_cpu_fallback(seed):
    """The same sequence of pool operations on CUDA+pinned pools and on CPU pools leaves the same
    bytes: read_pages, write_pages (CPU, CUDA and pinned sources), copy_kv both ways, fill_pages."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    pools = {dev: _pool_pair(dev) for dev in ("cpu", "cuda")}
    for d, h in pools.values():
        d.data.copy_(random_bits(d.data.shape, d.data.dtype, "cpu", torch.Generator().manual_seed(seed)))
        h.data.fill_(float("nan"))
    ps = 4

    def slots(pages):
        return torch.tensor([p * ps + i for p in pages for i in range(ps)], dtype=torch.int64)

    for _ in range(12):
        op = rng.choice(["backup", "load", "write", "fill", "read"])
        dp, hp = page_lists(rng.choice(PATTERNS), 16, 20, rng)
        new = random_bits((len(dp), 3, 2, ps, 2, 8), torch.bfloat16, "cpu", gen)
        reads = {}
        for dev, (d, h) in pools.items():
            ds, hs = slots(dp).to(dev), slots(hp)
            if op == "backup":
                copy_kv(d, ds, h, hs)
            elif op == "load":
                copy_kv(h, hs, d, ds)
            elif op == "write":
                src = new.to(dev) if dev == "cpu" else rng.choice([new.cuda(), new.pin_memory(), new])
                d.write_pages(ds, src)
                h.write_pages(hs, src)
            elif op == "fill":
                d.fill_pages(ds, float("nan"))
            else:
                reads[dev] = (d.read_pages(ds).cpu(), h.read_pages(hs))
        torch.cuda.synchronize()
        if reads:
            assert torch.equal(bits(reads["cpu"][0]), bits(reads["cuda"][0]))
            assert torch.equal(bits(reads["cpu"][1]), bits(reads["cuda"][1]))
        for a, b in zip(pools["cpu"], pools["cuda"], strict=True):
            assert torch.equal(bits(a.data), bits(b.data)), f"pools diverge after {op}"


@needs_cuda
@pytest.mark.gpu
def test_copy_kv_is_asynchronous_and_stream_ordered():
    """A load issued on a side stream behind a long GPU job is not done until the stream passes it,
    and is right once it has (a kernel that ignored the current stream would race)."""
    d, h = _pool_pair("cuda", L=8, H=8, D=128, ps=16)
    gen = torch.Generator().manual_seed(7)
    h.data.copy_(random_bits(h.data.shape, h.data.dtype, "cpu", gen))
    ds = torch.arange(0, 16 * 16, dtype=torch.int64, device="cuda")
    hs = torch.arange(4 * 16, 20 * 16, dtype=torch.int64)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # keep the stream busy (~tens of ms)
        copy_kv(h, hs, d, ds)
        done = torch.cuda.Event()
        done.record(side)
    assert not done.query()
    done.synchronize()
    assert torch.equal(bits(d.read_pages(ds)), bits(h.read_pages(hs)))


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("engine", ["dma", "dma_batch"])
@pytest.mark.parametrize("direction", ["d2h", "h2d"])
def test_large_pages_with_cpu_page_lists_go_to_the_copy_engine(direction, engine, monkeypatch):
    """`copy_pages` with no mechanism named uses the copy engine (`dma` for the largest pages,
    `dma_batch` below that) for host<->device copies of large pages whose page lists are both on
    the CPU, the kernel otherwise (GPU-resident lists are never read back), and the result is the
    reference copy."""
    import refcache.kernels as K

    L, H, D, ps = 4, 2, 16, 8
    gen = torch.Generator().manual_seed(11)
    devp = layer_first(L, H, D, 11 * ps, torch.bfloat16, "cuda")
    hostp = page_first(L, H, D, ps, 13, torch.bfloat16, "cpu", pin=True)
    src, dst = (devp, hostp) if direction == "d2h" else (hostp, devp)
    src_pf, dst_pf = direction == "h2d", direction == "d2h"
    sg, dg = PageGeometry.of(src, ps, src_pf), PageGeometry.of(dst, ps, dst_pf)
    sp, dp = page_lists("scattered", sg.num_pages(src), dg.num_pages(dst), random.Random(5))
    cpu_s, cpu_d = torch.tensor(sp), torch.tensor(dp)
    base = "kernel" if triton_available() else "copy_engine"
    assert K.select_mechanism(src, sg, cpu_s, dst, dg, cpu_d) == base  # small pages: not worth a DMA each
    monkeypatch.setattr(K, "DMA_MIN_PAGE_BYTES", 1 if engine == "dma" else 1 << 40)
    monkeypatch.setattr(K, "DMA_MIN_RUN_BYTES", 1)
    monkeypatch.setattr(K, "DMA_BATCH_MIN_PAGE_BYTES", 1)
    if base == "kernel":
        assert K.select_mechanism(src, sg, cpu_s, dst, dg, cpu_d) == engine
        assert K.select_mechanism(src, sg, cpu_s.cuda(), dst, dg, cpu_d) == "kernel"
        assert K.select_mechanism(src, sg, cpu_s, dst, dg, cpu_d.cuda()) == "kernel"
        assert K.select_mechanism(devp, PageGeometry.of(devp, ps, False), cpu_s, devp.clone(),
                                  PageGeometry.of(devp, ps, False), cpu_d) == "kernel"  # within the GPU
    src.copy_(random_bits(src.shape, src.dtype, "cpu", gen))
    dst.fill_(float("nan"))
    want = reference(src, src_pf, dst, dst_pf, ps, sp, dp)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        copy_pages(src, sg, cpu_s, dst, dg, cpu_d)
    side.synchronize()
    assert torch.equal(bits(dst), bits(want))


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("mechanism", ["dma", "dma_batch"])
def test_copy_engine_mechanisms_on_the_default_stream(mechanism):
    """On the legacy default stream (which cudaMemcpyBatchAsync refuses) both copy-engine
    mechanisms still produce the reference copy, and leave no CUDA error behind for torch."""
    L, H, D, ps = 3, 2, 8, 4
    gen = torch.Generator().manual_seed(12)
    src = layer_first(L, H, D, 11 * ps, torch.float16, "cuda")
    dst = page_first(L, H, D, ps, 13, torch.float16, "cpu", pin=True)
    src.copy_(random_bits(src.shape, src.dtype, "cpu", gen))
    dst.fill_(float("nan"))
    sg, dg = PageGeometry.of(src, ps, False), PageGeometry.of(dst, ps, True)
    sp, dp = page_lists("scattered", sg.num_pages(src), dg.num_pages(dst), random.Random(6))
    want = reference(src, False, dst, True, ps, sp, dp)
    copy_pages(src, sg, torch.tensor(sp), dst, dg, torch.tensor(dp), mechanism)
    torch.cuda.synchronize()
    assert torch.equal(bits(dst), bits(want))
    torch.zeros(4, device="cuda").add_(1)  # a torch launch after it: no stale error surfaces
    torch.cuda.synchronize()

"""Paged KV copies between pools of any layout: one gather/scatter over every page and layer.

A pool stores each page as `rows` runs of `row_elems` contiguous elements (one run per layer and
K/V); run r of page p starts at `p * page_stride + r * row_stride`. Both layouts refcache uses
fit that description (`PageGeometry.of`): the layer-first device pool [L, 2, slots, H, D] and the
page-first host pool [pages, L, 2, page_size, H, D]. A transfer of n pages is then n * rows
independent runs, whatever the two layouts are.

Mechanisms (measured in benchmarks/bench_transfer.py and benchmarks/RESULTS.md; `copy_pages`
picks one with `select_mechanism`):
- `kernel`: one Triton launch; each program moves `KernelShape.runs` consecutive runs (one tile
  of each). Pinned host memory is read and written through its device pointer (UVA), so a
  scattered batch needs no staging and no per-page launch. Asynchronous on the current CUDA
  stream. On an H200 over PCIe 5 it reaches ~0.95 of a contiguous pinned copy device to host and
  ~0.925 host to device, whatever the launch shape: SM loads and stores across PCIe top out there.
- `dma`: one cudaMemcpy2DAsync per page (the copy engine, no staging); ~0.98 of the
  contiguous copy for pages of 8 MiB (64 tokens of an 8B-class model), worse than the kernel
  for small pages (a gap of a few microseconds per copy). Needs the page numbers on the CPU: chosen by default
  only when both page lists are CPU tensors and pages are large (`DMA_MIN_PAGE_BYTES`,
  `DMA_MIN_RUN_BYTES`). Asynchronous on the current stream.
- `dma_batch`: the kernel gathers (or scatters) the device side through a page-first staging
  buffer as large as the batch, one cudaMemcpyBatchAsync moves the host pages (one copy per
  page; on the legacy default stream, which the batch call refuses, one cudaMemcpyAsync per
  page). 0.94-0.97 of the contiguous copy for 2 MiB pages; chosen by default for pages of
  `DMA_BATCH_MIN_PAGE_BYTES` up to the `dma` threshold, CPU page lists only. Asynchronous on the
  current stream.
- `copy_engine`: gather on the GPU into a staging buffer, then one DMA copy per run of
  consecutive host pages (and the reverse for loads). Asynchronous on the current stream.
- `torch`: advanced indexing on [pages, rows, row_elems] views. The CPU path (and CUDA without Triton); synchronous
  across devices. It is the reference the others are checked against.
Triton is imported lazily: the CPU build of torch never needs it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

MECHANISMS = ("kernel", "copy_engine", "dma", "dma_batch", "torch")

_WORDS = {4: torch.int32, 2: torch.int16, 1: torch.uint8}
_BLOCK_BYTES = 8192  # bytes of one run one Triton program moves at most; 16 B per thread and access


@dataclass(frozen=True)
class PageGeometry:
    """Where a pool keeps page p's run r: elements [p*page_stride + r*row_stride, + row_elems)."""

    rows: int
    row_elems: int
    page_stride: int
    row_stride: int

    @staticmethod
    def of(data: torch.Tensor, page_size: int, page_first: bool) -> PageGeometry:
        """Geometry of a contiguous pool tensor: page-first [P, L, 2, ps, H, D] or layer-first
        [L, 2, slots, H, D]."""
        if not data.is_contiguous():
            raise ValueError("pool tensors must be contiguous")
        if page_first:
            _, L, two, ps, H, D = data.shape
            row = ps * H * D
            return PageGeometry(L * two, row, L * two * row, row)
        L, two, slots, H, D = data.shape
        row = page_size * H * D
        return PageGeometry(L * two, row, row, slots * H * D)

    def num_pages(self, data: torch.Tensor) -> int:
        """How many whole pages `data` holds in this geometry."""
        last = (self.rows - 1) * self.row_stride + self.row_elems  # extent of page 0
        return 0 if data.numel() < last else (data.numel() - last) // self.page_stride + 1

    def paged_view(self, data: torch.Tensor) -> torch.Tensor:
        """[pages, rows, row_elems] view of `data` (writes through it land in `data`)."""
        return data.view(-1).as_strided((self.num_pages(data), self.rows, self.row_elems),
                                        (self.page_stride, self.row_stride, 1))


@functools.cache
def triton_available() -> bool:
    """Whether the Triton kernel can run here (CUDA present and Triton importable)."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def default_mechanism(src: torch.Tensor, dst: torch.Tensor) -> str:
    """The mechanism `copy_pages` uses between these tensors: the kernel whenever CUDA is
    involved, every host side is pinned and Triton is there; torch otherwise."""
    if not (src.is_cuda or dst.is_cuda):
        return "torch"
    if any(not t.is_cuda and not t.is_pinned() for t in (src, dst)):
        return "torch"
    return "kernel" if triton_available() else "copy_engine"


# Copy-engine thresholds for CPU-resident page lists (H200, PCIe 5, benchmarks/RESULTS.md):
DMA_MIN_PAGE_BYTES = 4 << 20  # one 2D copy a page: 8 MiB pages 0.98 of contiguous, 2 MiB ones 0.88-0.93
DMA_MIN_RUN_BYTES = 64 << 10  # ... with runs (rows of the 2D copy) at least this long
DMA_BATCH_MIN_PAGE_BYTES = 1 << 20  # staging + one batched copy: 2 MiB pages 0.94-0.97, 128 KiB 0.80-0.89


def select_mechanism(src: torch.Tensor, src_geom: PageGeometry, src_pages: torch.Tensor,
                     dst: torch.Tensor, dst_geom: PageGeometry, dst_pages: torch.Tensor) -> str:
    """What `copy_pages` uses when no mechanism is named: `default_mechanism`, except that a
    host<->device copy of large pages whose page lists are both on the CPU goes to the copy
    engine (it needs the addresses on the CPU; reading GPU-resident lists back would block):
    `dma` for pages of `DMA_MIN_PAGE_BYTES` (runs of `DMA_MIN_RUN_BYTES`) and more, `dma_batch`
    for pages of `DMA_BATCH_MIN_PAGE_BYTES` and more when the host pool is page-first."""
    mech = default_mechanism(src, dst)
    if mech != "kernel" or src.is_cuda == dst.is_cuda or src_pages.is_cuda or dst_pages.is_cuda:
        return mech
    if not _dma_available():
        return mech
    es = src.element_size()
    run = src_geom.row_elems * es
    page = run * src_geom.rows
    if run >= DMA_MIN_RUN_BYTES and page >= DMA_MIN_PAGE_BYTES:
        return "dma"
    hg = dst_geom if src.is_cuda else src_geom
    if page >= DMA_BATCH_MIN_PAGE_BYTES and hg.page_stride == hg.rows * hg.row_elems and hg.row_stride == hg.row_elems:
        return "dma_batch"
    return mech


def copy_pages(src: torch.Tensor, src_geom: PageGeometry, src_pages: torch.Tensor,
               dst: torch.Tensor, dst_geom: PageGeometry, dst_pages: torch.Tensor,
               mechanism: str | None = None) -> None:
    """Copy page `src_pages[i]` of `src` to page `dst_pages[i]` of `dst`, every run of it.

    Pages are integer tensors on any device; destination pages must be distinct. The copy is
    bit-exact (it moves words, not values: NaN payloads survive). With `kernel` or `copy_engine`
    it is asynchronous on the current CUDA stream: the caller keeps both pools unchanged until
    the stream has passed it (the cache's operations hold their pages until acknowledged)."""
    if src.dtype != dst.dtype:
        raise ValueError(f"dtype mismatch: {src.dtype} -> {dst.dtype}")
    if (src_geom.rows, src_geom.row_elems) != (dst_geom.rows, dst_geom.row_elems):
        raise ValueError(f"page shapes differ: {src_geom} vs {dst_geom}")
    if src_pages.numel() != dst_pages.numel():
        raise ValueError(f"{src_pages.numel()} source pages but {dst_pages.numel()} destination pages")
    if src_pages.numel() == 0:
        return
    mechanism = mechanism or select_mechanism(src, src_geom, src_pages, dst, dst_geom, dst_pages)
    if mechanism == "kernel":
        _copy_triton(src, src_geom, src_pages, dst, dst_geom, dst_pages)
    elif mechanism == "copy_engine":
        _copy_engine(src, src_geom, src_pages, dst, dst_geom, dst_pages)
    elif mechanism == "dma":
        _copy_dma(src, src_geom, src_pages, dst, dst_geom, dst_pages)
    elif mechanism == "dma_batch":
        _copy_dma_batch(src, src_geom, src_pages, dst, dst_geom, dst_pages)
    elif mechanism == "torch":
        _copy_torch(src, src_geom, src_pages, dst, dst_geom, dst_pages)
    else:
        raise ValueError(f"unknown mechanism {mechanism!r}; known: {MECHANISMS}")


# ------------------------------------------------------------------------------------ torch
def _copy_torch(src, sg, sp, dst, dg, dp) -> None:
    vals = sg.paged_view(src)[sp.to(src.device, torch.int64)]
    dg.paged_view(dst)[dp.to(dst.device, torch.int64)] = vals.to(dst.device)


# ------------------------------------------------------------------------------ copy engine
def page_runs(pages: list[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive page numbers: (offset in `pages`, first page, length)."""
    runs: list[tuple[int, int, int]] = []
    for i, p in enumerate(pages):
        if runs and runs[-1][1] + runs[-1][2] == p:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((i, p, 1))
    return runs


def _copy_engine(src, sg, sp, dst, dg, dp) -> None:
    """GPU-side gather or scatter through a page-first staging buffer, DMA for the host side."""
    if src.is_cuda and dst.is_cuda:
        return _copy_torch(src, sg, sp, dst, dg, dp)
    dev = src.device if src.is_cuda else dst.device
    n = sp.numel()
    staging = torch.empty((n, sg.rows, sg.row_elems), dtype=src.dtype, device=dev)
    if src.is_cuda:  # D2H: gather on the GPU, then one DMA per run of host pages
        torch.index_select(sg.paged_view(src), 0, sp.to(dev, torch.int64), out=staging)
        host, hg, pages, to_host = dst, dg, dp, True
    else:  # H2D: one DMA per run of host pages, then scatter on the GPU
        host, hg, pages, to_host = src, sg, sp, False
    if hg.page_stride != hg.rows * hg.row_elems or hg.row_stride != hg.row_elems:
        raise ValueError("copy_engine needs a page-first host pool")
    flat = host.view(-1)
    per_page = hg.page_stride
    for i, p0, k in page_runs(pages.tolist()):
        h = flat[p0 * per_page:(p0 + k) * per_page]
        s = staging[i:i + k].view(-1)
        (h.copy_(s, non_blocking=True) if to_host else s.copy_(h, non_blocking=True))
    if not to_host:
        dg.paged_view(dst).index_copy_(0, dp.to(dev, torch.int64), staging)


# -------------------------------------------------------------------------- dma (copy engine)
@functools.cache
def _cudart():
    """The CUDA runtime torch loaded (ctypes), with the copy calls typed."""
    import ctypes

    torch.cuda.init()
    lib = None
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None:  # not on the loader path: the copy torch mapped
        with open("/proc/self/maps") as f:
            paths = sorted({ln.split()[-1] for ln in f if "libcudart.so" in ln})
        if not paths:
            raise RuntimeError("libcudart is not loaded")
        lib = ctypes.CDLL(paths[0])
    P, S = ctypes.c_void_p, ctypes.c_size_t
    lib.cudaMemcpy2DAsync.argtypes = [P, S, P, S, S, S, ctypes.c_int, P]
    lib.cudaMemcpy2DAsync.restype = ctypes.c_int
    lib.cudaMemcpyAsync.argtypes = [P, P, S, ctypes.c_int, P]
    lib.cudaMemcpyAsync.restype = ctypes.c_int
    lib.cudaGetLastError.restype = ctypes.c_int
    if hasattr(lib, "cudaMemcpyBatchAsync"):
        lib.cudaMemcpyBatchAsync.argtypes = [P, P, P, S, P, P, S, P]
        lib.cudaMemcpyBatchAsync.restype = ctypes.c_int
    return lib


@functools.cache
def _dma_available() -> bool:
    try:
        _cudart()
    except (OSError, RuntimeError, AttributeError):
        return False
    return True


def _cuda_check(err: int, what: str) -> None:
    if err:
        _cudart().cudaGetLastError()  # the runtime keeps the error as the last one: torch would report it next
        raise RuntimeError(f"{what} failed: cudaError {err}")


_CUDA_MEMCPY_DEFAULT = 4


def _copy_dma(src, sg, sp, dst, dg, dp) -> None:
    """One cudaMemcpy2DAsync per page (rows x run bytes, each side at its own pitch): the copy
    engine with no staging. Page lists on the GPU are read back first (a synchronization)."""
    lib = _cudart()
    es = src.element_size()
    dev = src.device if src.is_cuda else dst.device
    stream = torch.cuda.current_stream(dev).cuda_stream
    width, height = sg.row_elems * es, sg.rows
    spitch, dpitch = max(sg.row_stride * es, width), max(dg.row_stride * es, width)
    sps, dps = sg.page_stride * es, dg.page_stride * es
    sbase, dbase = src.data_ptr(), dst.data_ptr()
    for a, b in zip(sp.tolist(), dp.tolist(), strict=True):
        _cuda_check(lib.cudaMemcpy2DAsync(dbase + b * dps, dpitch, sbase + a * sps, spitch, width, height,
                                          _CUDA_MEMCPY_DEFAULT, stream), "cudaMemcpy2DAsync")


@functools.cache
def _batch_attrs(src_on_device: bool, device: int):
    """The one cudaMemcpyAttributes of a batch (stream-ordered source), and its index array."""
    import ctypes

    class Loc(ctypes.Structure):
        _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]

    class Attrs(ctypes.Structure):
        _fields_ = [("srcAccessOrder", ctypes.c_int), ("srcLocHint", Loc), ("dstLocHint", Loc),
                    ("flags", ctypes.c_uint)]

    dev_loc, host_loc = Loc(1, device), Loc(2, 0)  # cudaMemLocationTypeDevice / Host
    attrs = Attrs(1, dev_loc if src_on_device else host_loc, host_loc if src_on_device else dev_loc, 0)
    return attrs, (ctypes.c_size_t * 1)(0)


def _memcpy_batch(dsts, srcs, nbytes: int, src_on_device: bool, device: int, stream: int) -> None:
    """cudaMemcpyBatchAsync of equal-sized copies (CUDA 12.8+), stream-ordered; `dsts`, `srcs`
    uint64 numpy arrays of addresses."""
    import ctypes

    import numpy as np

    lib = _cudart()
    if stream == 0 or not hasattr(lib, "cudaMemcpyBatchAsync"):
        # the batch call refuses the legacy default stream (and needs CUDA 12.8+): one copy per page
        for dd, ss in zip(dsts.tolist(), srcs.tolist(), strict=True):
            _cuda_check(lib.cudaMemcpyAsync(dd, ss, nbytes, _CUDA_MEMCPY_DEFAULT, stream), "cudaMemcpyAsync")
        return
    attrs, idx = _batch_attrs(src_on_device, device)
    sizes = np.full(len(dsts), nbytes, dtype=np.uint64)
    _cuda_check(lib.cudaMemcpyBatchAsync(dsts.ctypes.data, srcs.ctypes.data, sizes.ctypes.data, len(dsts),
                                         ctypes.byref(attrs), idx, 1, stream), "cudaMemcpyBatchAsync")


def _copy_dma_batch(src, sg, sp, dst, dg, dp) -> None:
    """Device side gathered into (or scattered from) a page-first staging buffer by the kernel,
    host pages moved by one cudaMemcpyBatchAsync (one copy per page). Needs a page-first host."""
    if src.is_cuda and dst.is_cuda:
        return _copy_torch(src, sg, sp, dst, dg, dp)
    to_host = src.is_cuda
    dev = src.device if to_host else dst.device
    hg, hpages = (dg, dp) if to_host else (sg, sp)
    if hg.page_stride != hg.rows * hg.row_elems or hg.row_stride != hg.row_elems:
        raise ValueError("dma_batch needs a page-first host pool")
    n = sp.numel()
    staging = torch.empty((n, sg.rows, sg.row_elems), dtype=src.dtype, device=dev)
    stg, sgeom = staging, PageGeometry(sg.rows, sg.row_elems, sg.rows * sg.row_elems, sg.row_elems)
    ar = torch.arange(n, dtype=torch.int64, device=dev)
    es = src.element_size()
    page_bytes = hg.page_stride * es
    host = dst if to_host else src
    hp = hpages.cpu().numpy().astype("uint64")
    hosts = host.data_ptr() + hp * page_bytes  # uint64 throughout
    import numpy as np

    stages = stg.data_ptr() + np.arange(n, dtype=np.uint64) * np.uint64(page_bytes)
    stream = torch.cuda.current_stream(dev).cuda_stream
    if to_host:
        _copy_triton(src, sg, sp, stg, sgeom, ar)
        _memcpy_batch(hosts, stages, page_bytes, True, dev.index or 0, stream)
    else:
        _memcpy_batch(stages, hosts, page_bytes, False, dev.index or 0, stream)
        _copy_triton(stg, sgeom, ar, dst, dg, dp)


# ----------------------------------------------------------------------------------- triton
def _word_dtype(*byte_counts: int) -> torch.dtype:
    for w, dt in _WORDS.items():
        if all(b % w == 0 for b in byte_counts):
            return dt
    return torch.uint8


@dataclass(frozen=True)
class KernelShape:
    """Launch shape of the Triton page copy: each program moves `runs` consecutive runs (rows of
    one page, so consecutive bytes of a page-first pool) x one tile of `block_bytes` of each, with
    `num_warps` warps; `streaming` marks loads evict-first and stores streaming (.cs)."""

    block_bytes: int = _BLOCK_BYTES
    runs: int = 1
    num_warps: int = 4
    streaming: bool = False


DEFAULT_SHAPE = KernelShape(block_bytes=8192, runs=8, num_warps=8)  # H200: best or tied everywhere


def _copy_triton(src, sg, sp, dst, dg, dp, shape: KernelShape | None = None) -> None:
    shape = shape or DEFAULT_SHAPE
    es = src.element_size()
    wdt = _word_dtype(sg.row_elems * es, sg.page_stride * es, sg.row_stride * es,
                      dg.page_stride * es, dg.row_stride * es, src.data_ptr(), dst.data_ptr())
    ratio = torch.empty((), dtype=wdt).element_size()  # bytes per word
    dev = src.device if src.is_cuda else dst.device
    sw = src.view(-1).view(wdt)
    dw = dst.view(-1).view(wdt)

    def words(elems: int) -> int:
        return elems * es // ratio

    sp = sp.to(dev, torch.int64, non_blocking=True)
    dp = dp.to(dev, torch.int64, non_blocking=True)
    row_words = words(sg.row_elems)
    block = max(64, min(shape.block_bytes // ratio, 1 << (row_words - 1).bit_length()))  # a power of two
    runs = shape.runs if block >= row_words else 1  # several runs a program only when a tile holds a run
    launch_page_copy(sw, dw, sp, dp, sg.rows, row_words, words(sg.page_stride), words(sg.row_stride),
                     words(dg.page_stride), words(dg.row_stride), block=block, runs=runs,
                     num_warps=max(1, min(shape.num_warps, runs * block // 128)), streaming=shape.streaming)


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def page_copy(src, dst, src_pages, dst_pages, n_runs, rows, row_words,
                  src_page_stride, src_row_stride, dst_page_stride, dst_row_stride,
                  BLOCK: tl.constexpr, RUNS: tl.constexpr, STREAMING: tl.constexpr):
        run = tl.program_id(0) * RUNS + tl.arange(0, RUNS)  # RUNS consecutive (page, row) runs
        tile = tl.program_id(1)  # one BLOCK of each
        live = run < n_runs
        i = run // rows
        r = (run - i * rows).to(tl.int64)
        sp = tl.load(src_pages + i, mask=live, other=0)
        dp = tl.load(dst_pages + i, mask=live, other=0)
        offs = tile * BLOCK + tl.arange(0, BLOCK)
        mask = live[:, None] & (offs < row_words)[None, :]
        s = (sp * src_page_stride + r * src_row_stride)[:, None] + offs[None, :]
        d = (dp * dst_page_stride + r * dst_row_stride)[:, None] + offs[None, :]
        if STREAMING:
            x = tl.load(src + s, mask=mask, eviction_policy="evict_first")
            tl.store(dst + d, x, mask=mask, cache_modifier=".cs")
        else:
            x = tl.load(src + s, mask=mask)
            tl.store(dst + d, x, mask=mask)

    return page_copy


def launch_page_copy(src_words: torch.Tensor, dst_words: torch.Tensor, src_pages: torch.Tensor,
                     dst_pages: torch.Tensor, rows: int, row_words: int, src_page_stride: int,
                     src_row_stride: int, dst_page_stride: int, dst_row_stride: int, block: int,
                     runs: int = 1, num_warps: int | None = None, streaming: bool = False) -> None:
    """Launch the Triton page copy over flat word views (strides in words, pages int64)."""
    n = src_pages.numel()
    tiles = -(-row_words // block)
    n_runs = n * rows
    grid = (-(-n_runs // runs), tiles)
    _kernel()[grid](src_words, dst_words, src_pages, dst_pages, n_runs, rows, row_words,
                    src_page_stride, src_row_stride, dst_page_stride, dst_row_stride,
                    BLOCK=block, RUNS=runs, STREAMING=streaming,
                    num_warps=num_warps or max(1, min(4, block // 128)))

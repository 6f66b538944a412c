"""Paged KV copies between pools of any layout: one gather/scatter over every page and layer.

A pool stores each page as `rows` runs of `row_elems` contiguous elements (one run per layer and
K/V); run r of page p starts at `p * page_stride + r * row_stride`. Both layouts refcache uses
fit that description (`PageGeometry.of`): the layer-first device pool [L, 2, slots, H, D] and the
page-first host pool [pages, L, 2, page_size, H, D]. A transfer of n pages is then n * rows
independent runs, whatever the two layouts are.

Mechanisms (measured in benchmarks/bench_transfer.py; `copy_pages` picks `default_mechanism`):
- `kernel`: one Triton launch; each program moves one tile of one run. Pinned host memory is
  read and written through its device pointer (UVA), so a scattered batch needs no staging and
  no per-page launch. Asynchronous on the current CUDA stream.
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

MECHANISMS = ("kernel", "copy_engine", "torch")

_WORDS = {4: torch.int32, 2: torch.int16, 1: torch.uint8}
_BLOCK_BYTES = 8192  # bytes one Triton program moves; 16 B per thread and access, 4 warps


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
    mechanism = mechanism or default_mechanism(src, dst)
    if mechanism == "kernel":
        _copy_triton(src, src_geom, src_pages, dst, dst_geom, dst_pages)
    elif mechanism == "copy_engine":
        _copy_engine(src, src_geom, src_pages, dst, dst_geom, dst_pages)
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


# ----------------------------------------------------------------------------------- triton
def _word_dtype(*byte_counts: int) -> torch.dtype:
    for w, dt in _WORDS.items():
        if all(b % w == 0 for b in byte_counts):
            return dt
    return torch.uint8


def _copy_triton(src, sg, sp, dst, dg, dp) -> None:
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
    block = max(64, min(_BLOCK_BYTES // ratio, 1 << (row_words - 1).bit_length()))  # a power of two
    launch_page_copy(sw, dw, sp, dp, sg.rows, row_words, words(sg.page_stride), words(sg.row_stride),
                     words(dg.page_stride), words(dg.row_stride), block=block)


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def page_copy(src, dst, src_pages, dst_pages, rows, row_words,
                  src_page_stride, src_row_stride, dst_page_stride, dst_row_stride,
                  BLOCK: tl.constexpr):
        run = tl.program_id(0)  # one (page, row) run
        tile = tl.program_id(1)  # one BLOCK of it
        i = run // rows
        r = (run - i * rows).to(tl.int64)
        sp = tl.load(src_pages + i)
        dp = tl.load(dst_pages + i)
        offs = tile * BLOCK + tl.arange(0, BLOCK)
        mask = offs < row_words
        s = sp * src_page_stride + r * src_row_stride
        d = dp * dst_page_stride + r * dst_row_stride
        x = tl.load(src + s + offs, mask=mask)
        tl.store(dst + d + offs, x, mask=mask)

    return page_copy


def launch_page_copy(src_words: torch.Tensor, dst_words: torch.Tensor, src_pages: torch.Tensor,
                     dst_pages: torch.Tensor, rows: int, row_words: int, src_page_stride: int,
                     src_row_stride: int, dst_page_stride: int, dst_row_stride: int, block: int) -> None:
    """Launch the Triton page copy over flat word views (strides in words, pages int64)."""
    n = src_pages.numel()
    tiles = -(-row_words // block)
    grid = (n * rows, tiles)
    _kernel()[grid](src_words, dst_words, src_pages, dst_pages, rows, row_words,
                    src_page_stride, src_row_stride, dst_page_stride, dst_row_stride,
                    BLOCK=block, num_warps=max(1, min(4, block // 128)))

"""Slot pools: a page-granular allocator and the tensors behind each tier.

L1 (device) KV is layer-first, as a model's attention reads it: [layers, 2, slots, heads, dim].
L2 (host) KV is page-first, so one page of every layer is one contiguous block for transfers:
[pages, layers, 2, page_size, heads, dim]; it is pinned when CUDA is present.
Mamba state pools hold one recurrent state per slot on each tier.
"""

from __future__ import annotations

import heapq

import numpy as np
import torch

from .errors import InvalidIndicesError
from .kernels import PageGeometry, copy_pages, page_runs

__all__ = ["INDEX_DTYPE", "KVPool", "PageAllocator", "StatePool", "canonical_device", "copy_kv", "page_runs"]

INDEX_DTYPE = torch.int64
"""dtype of every slot-index tensor the cache stores or accepts."""


def canonical_device(device: torch.device | str) -> torch.device:
    """`cuda` becomes `cuda:<current>`, so device comparisons match the tensors we make."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


class PageAllocator:
    """Hands out slots a whole page at a time and takes them back, refusing double frees.

    Lowest pages go first, so runs are reproducible. `index_device` is where index tensors live.
    """

    def __init__(self, name: str, capacity: int, page_size: int, index_device: torch.device):
        self.name = name
        self.capacity = capacity
        self.page_size = page_size
        self.index_device = canonical_device(index_device)
        self._free: list[int] = list(range(capacity // page_size))
        heapq.heapify(self._free)
        self._allocated: set[int] = set()
        self._offsets = np.arange(page_size, dtype=np.int64)

    # -- queries ---------------------------------------------------------------------------
    def available(self) -> int:
        """Free slots (a multiple of page_size)."""
        return len(self._free) * self.page_size

    def allocated_pages(self) -> frozenset[int]:
        return frozenset(self._allocated)

    def free_pages(self) -> list[int]:
        return sorted(self._free)

    # -- alloc / free ----------------------------------------------------------------------
    def alloc(self, n_slots: int) -> torch.Tensor | None:
        """Slots for `n_slots` (a whole number of pages), or None when too few are free."""
        if n_slots < 0 or n_slots % self.page_size:
            raise InvalidIndicesError(f"{self.name}: {n_slots} slots is not a whole number of pages")
        n_pages = n_slots // self.page_size
        if n_pages > len(self._free):
            return None
        pages = [heapq.heappop(self._free) for _ in range(n_pages)]
        self._allocated.update(pages)
        return self.slots_of(pages)

    def free(self, indices: torch.Tensor) -> None:
        """Return slots to the pool; all-or-nothing, so a bad call changes nothing."""
        pages = self.pages_of(indices)
        missing = [p for p in pages if p not in self._allocated]
        if missing or len(set(pages)) != len(pages):
            raise InvalidIndicesError(f"{self.name}: double free or foreign pages {missing or pages}")
        for p in pages:
            self._allocated.discard(p)
            heapq.heappush(self._free, p)

    # -- conversions -----------------------------------------------------------------------
    def slots_of(self, pages: list[int]) -> torch.Tensor:
        ps = self.page_size
        base = torch.tensor(pages, dtype=INDEX_DTYPE).repeat_interleave(ps) * ps
        offs = torch.arange(ps, dtype=INDEX_DTYPE).repeat(len(pages))
        return (base + offs).to(self.index_device)

    def check_indices(self, indices: object) -> torch.Tensor:
        """Validate dtype, device, shape and page alignment; returns the indices unchanged."""
        if not isinstance(indices, torch.Tensor):
            raise InvalidIndicesError(f"{self.name}: indices must be a torch.Tensor, got {type(indices).__name__}")
        if indices.dtype != INDEX_DTYPE:
            raise InvalidIndicesError(f"{self.name}: indices must be {INDEX_DTYPE}, got {indices.dtype}")
        if indices.device != self.index_device:
            raise InvalidIndicesError(f"{self.name}: indices must be on {self.index_device}, got {indices.device}")
        if indices.dim() != 1 or indices.numel() % self.page_size:
            raise InvalidIndicesError(
                f"{self.name}: indices must be 1-D and a whole number of pages, got shape {tuple(indices.shape)}")
        return indices

    def pages_of(self, indices: torch.Tensor) -> list[int]:
        """Page numbers of page-aligned slot indices (validated).

        Runs on every insert and free, so the common case is one vectorized comparison: the
        slots must be byte-equal to the pages their first slots fall in, each clamped into the
        pool (an unaligned, non-consecutive or out-of-range page differs). Only a refusal pays
        for finding the first bad page."""
        self.check_indices(indices)
        ps, last = self.page_size, self.capacity // self.page_size - 1
        flat = indices.cpu().numpy()
        page_no = flat[::ps] // ps
        start = np.maximum(np.minimum(page_no, last), 0) * ps
        if (start[:, None] + self._offsets).tobytes() != flat.tobytes() or last < 0 < flat.size:
            self._refuse(flat.reshape(-1, ps))
        return page_no.tolist()

    def _refuse(self, rows: np.ndarray) -> None:
        """Raise for the first row of `rows` that is not one aligned page, else the first page
        out of range."""
        ps, first = self.page_size, rows[:, 0]
        bad_rows = np.flatnonzero((rows != first[:, None] + self._offsets).any(1) | (first % ps != 0))
        if bad_rows.size:
            raise InvalidIndicesError(f"{self.name}: slots {rows[int(bad_rows[0])].tolist()} are not one aligned page")
        bad = next(p for p in (first // ps).tolist() if not 0 <= p < self.capacity // ps)
        raise InvalidIndicesError(f"{self.name}: slot {bad * ps} out of range [0, {self.capacity})")


class KVPool:
    """Per-token KV of every layer on one tier, with the allocator for its slots.

    Every copy in or out goes through `refcache.kernels.copy_pages`, which knows both layouts:
    on CUDA it is asynchronous on the current stream (Triton gather/scatter reading and writing
    pinned host memory in place); on CPU it is plain indexing."""

    def __init__(self, name: str, capacity: int, page_size: int, num_layers: int, num_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device, page_first: bool,
                 pin: bool = False):
        self.allocator = PageAllocator(name, capacity, page_size, device)
        self.page_first = page_first
        self.page_size = page_size
        if page_first:
            shape = (capacity // page_size, num_layers, 2, page_size, num_heads, head_dim)
        else:
            shape = (num_layers, 2, capacity, num_heads, head_dim)
        self.data = torch.zeros(shape, dtype=dtype, device=device, pin_memory=pin)
        self.pinned = pin
        self.geometry = PageGeometry.of(self.data, page_size, page_first)
        self.page_shape = (num_layers, 2, page_size, num_heads, head_dim)

    def page_numbers(self, slots: torch.Tensor) -> torch.Tensor:
        """Page numbers of page-aligned slot indices (no validation; callers pass pool slots)."""
        ps = self.page_size
        return slots.view(-1, ps)[:, 0] // ps

    def _staging_side(self, pages: torch.Tensor) -> tuple[torch.Tensor, PageGeometry, torch.Tensor]:
        """A [pages, layers, 2, page_size, heads, dim] tensor as a copy endpoint."""
        pages = pages.contiguous()
        arange = torch.arange(pages.shape[0], dtype=torch.int64, device=pages.device)
        return pages, PageGeometry.of(pages, self.page_size, page_first=True), arange

    def read_pages(self, slots: torch.Tensor) -> torch.Tensor:
        """Copy of the pages at `slots` as [pages, layers, 2, page_size, heads, dim], on this pool's
        device (asynchronous on the current stream when that is CUDA)."""
        out = torch.empty((slots.numel() // self.page_size, *self.page_shape), dtype=self.data.dtype,
                          device=self.data.device)
        out_t, out_g, out_p = self._staging_side(out)
        copy_pages(self.data, self.geometry, self.page_numbers(slots), out_t, out_g, out_p)
        return out

    def write_pages(self, slots: torch.Tensor, pages: torch.Tensor) -> None:
        """Store `pages` ([pages, layers, 2, page_size, heads, dim], any device) at `slots`.

        A CUDA source lands in a pinned pool in place and asynchronously (a CPU-side scatter
        would run before an in-flight device-to-host copy had landed); pageable sources are
        moved to the pool's device first."""
        dev = self.data.device
        if pages.device != dev and not (pages.is_cuda and self.pinned):
            pages = pages.to(dev, non_blocking=pages.is_pinned())
        src, src_g, src_p = self._staging_side(pages.to(self.data.dtype))
        copy_pages(src, src_g, src_p, self.data, self.geometry, self.page_numbers(slots))

    def fill_pages(self, slots: torch.Tensor, value: float) -> None:
        """Overwrite the pages at `slots` with `value` (poisoning before an async write)."""
        pages = self.page_numbers(slots).to(self.data.device, torch.int64)
        self.geometry.paged_view(self.data).index_fill_(0, pages, value)


def copy_kv(src: KVPool, src_slots: torch.Tensor, dst: KVPool, dst_slots: torch.Tensor) -> None:
    """The KV copy of one operation: every page at `src_slots`, every layer, to `dst_slots`.

    One gather/scatter between the two layouts with no staging: on CUDA a single asynchronous
    launch on the current stream that reads or writes the pinned host pool in place. Same
    semantics as `dst.write_pages(dst_slots, src.read_pages(src_slots))`."""
    if src.page_shape != dst.page_shape:
        raise InvalidIndicesError(f"page shapes differ: {src.page_shape} vs {dst.page_shape}")
    if src_slots.numel() != dst_slots.numel():
        raise InvalidIndicesError(f"{src_slots.numel()} source slots but {dst_slots.numel()} destination slots")
    copy_pages(src.data, src.geometry, src.page_numbers(src_slots), dst.data, dst.geometry, dst.page_numbers(dst_slots))


class StatePool:
    """One recurrent (mamba) state per slot on one tier, with its allocator."""

    def __init__(self, name: str, capacity: int, state_dim: int, dtype: torch.dtype,
                 device: torch.device, pin: bool = False):
        self.allocator = PageAllocator(name, capacity, 1, device)
        self.data = torch.zeros((capacity, state_dim), dtype=dtype, device=device, pin_memory=pin)

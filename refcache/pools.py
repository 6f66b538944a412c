"""Slot pools: a page-granular allocator and the tensors behind each tier.

L1 (device) KV is layer-first, as a model's attention reads it: [layers, 2, slots, heads, dim].
L2 (host) KV is page-first, so one page of every layer is one contiguous block for transfers:
[pages, layers, 2, page_size, heads, dim]; it is pinned when CUDA is present.
Mamba state pools hold one recurrent state per slot on each tier.
"""

from __future__ import annotations

import heapq

import torch

from .errors import InvalidIndicesError

INDEX_DTYPE = torch.int64
"""dtype of every slot-index tensor the cache stores or accepts."""


def canonical_device(device: torch.device | str) -> torch.device:
    """`cuda` becomes `cuda:<current>`, so device comparisons match the tensors we make."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def page_runs(pages: list[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive page numbers: (offset in `pages`, first page, length)."""
    runs: list[tuple[int, int, int]] = []
    for i, p in enumerate(pages):
        if runs and runs[-1][1] + runs[-1][2] == p:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((i, p, 1))
    return runs


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
        """Page numbers of page-aligned slot indices (validated)."""
        self.check_indices(indices)
        ps = self.page_size
        flat = indices.tolist()
        pages = []
        for i in range(0, len(flat), ps):
            first = flat[i]
            if first % ps or flat[i : i + ps] != list(range(first, first + ps)):
                raise InvalidIndicesError(f"{self.name}: slots {flat[i:i + ps]} are not one aligned page")
            if not 0 <= first < self.capacity:
                raise InvalidIndicesError(f"{self.name}: slot {first} out of range [0, {self.capacity})")
            pages.append(first // ps)
        return pages


class KVPool:
    """Per-token KV of every layer on one tier, with the allocator for its slots."""

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

    def read_pages(self, slots: torch.Tensor) -> torch.Tensor:
        """Copy of the pages at `slots` as [pages, layers, 2, page_size, heads, dim]."""
        ps = self.page_size
        pages = slots.view(-1, ps)[:, 0] // ps
        if self.page_first:
            return self.data[pages.to(self.data.device)]
        sel = self.data[:, :, slots.to(self.data.device)]  # [L, 2, n, H, D]
        L, two, n, H, D = sel.shape
        return sel.view(L, two, n // ps, ps, H, D).permute(2, 0, 1, 3, 4, 5).contiguous()

    def write_pages(self, slots: torch.Tensor, pages: torch.Tensor) -> None:
        """Store `pages` ([pages, layers, 2, page_size, heads, dim]) at `slots`.

        From another device into the page-first (pinned) pool, each run of consecutive pages is
        one asynchronous `copy_` straight into its destination: a CPU-side scatter would run
        before an in-flight device-to-host copy had landed."""
        ps = self.page_size
        if self.page_first:
            dst = (slots.view(-1, ps)[:, 0] // ps).to(self.data.device)
            if pages.device != self.data.device:
                for i, p0, k in page_runs(dst.tolist()):
                    self.data[p0 : p0 + k].copy_(pages[i : i + k], non_blocking=True)
            else:
                self.data[dst] = pages
            return
        pages = pages.to(self.data.device, non_blocking=True)
        n, L, two, _, H, D = pages.shape
        self.data[:, :, slots.to(self.data.device)] = pages.permute(1, 2, 0, 3, 4, 5).reshape(L, two, n * ps, H, D)


    def fill_pages(self, slots: torch.Tensor, value: float) -> None:
        """Overwrite the pages at `slots` with `value` (poisoning before an async write)."""
        ps = self.page_size
        if self.page_first:
            self.data[(slots.view(-1, ps)[:, 0] // ps).to(self.data.device)] = value
        else:
            self.data[:, :, slots.to(self.data.device)] = value


class StatePool:
    """One recurrent (mamba) state per slot on one tier, with its allocator."""

    def __init__(self, name: str, capacity: int, state_dim: int, dtype: torch.dtype,
                 device: torch.device, pin: bool = False):
        self.allocator = PageAllocator(name, capacity, 1, device)
        self.data = torch.zeros((capacity, state_dim), dtype=dtype, device=device, pin_memory=pin)

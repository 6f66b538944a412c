"""Radix-tree node: a run of whole pages with per-component, per-tier values."""

from __future__ import annotations

import itertools

import torch

from .pages import ROOT_HASH, page_hashes
from .transfer import PoolTransfer

_ids = itertools.count()


class TreeNode:
    """One edge of the radix tree.

    Full KV: `value` (L1 slots) and `host_value` (L2 slots), one slot per token.
    Mamba: `mamba_value` (L1 state slot) and `mamba_host` (the record of the L2 state slot; the
    record a backup produced is kept as is, which is why a transfer must never mutate it).
    SWA: `swa` / `swa_host`, whether the sliding-window layers' KV for these tokens is present.
    `lock_ref` and `host_ref` count users of the path from this node to the root.
    """

    __slots__ = ("id", "key", "parent", "children", "value", "host_value", "mamba_value",
                 "mamba_host", "swa", "swa_host", "lock_ref", "host_ref", "last_access",
                 "hit_count", "_hashes", "page_size", "acct", "__weakref__")

    def __init__(self, key: tuple[int, ...] = (), parent: TreeNode | None = None,
                 hashes: list[int] | None = None, page_size: int | None = None):
        self.id: int = next(_ids)
        self.key = key
        self.parent = parent
        self.children: dict[tuple[int, ...], TreeNode] = {}
        self.value: torch.Tensor | None = None
        self.host_value: torch.Tensor | None = None
        self.mamba_value: torch.Tensor | None = None
        self.mamba_host: PoolTransfer | None = None
        self.swa = False
        self.swa_host = False
        self.lock_ref = 0
        self.host_ref = 0
        self.last_access = 0
        self.hit_count = 0
        self.page_size: int = page_size or (parent.page_size if parent is not None else 1)
        self._hashes: list[int] | None = [] if parent is None else hashes  # None: not computed yet
        self.acct: tuple = ()  # this node's current contribution to the derived bookkeeping

    @property
    def hashes(self) -> list[int]:
        """Chain hashes of this node's pages (the L3 keys). Computed on first use, from the nearest
        ancestor that has them: only L3 and the data oracle read them, so a device-only insert
        does not pay for hashing."""
        if self._hashes is None:
            pending, n = [], self
            while n._hashes is None:
                pending.append(n)
                n = n.parent
            h = n._hashes[-1] if n._hashes else ROOT_HASH
            for m in reversed(pending):
                m._hashes = page_hashes(h, m.key, m.page_size)
                h = m._hashes[-1]
        return self._hashes

    @hashes.setter
    def hashes(self, value: list[int] | None) -> None:
        self._hashes = value

    # -- tiers -----------------------------------------------------------------------------
    @property
    def on_device(self) -> bool:
        return self.value is not None

    @property
    def on_host(self) -> bool:
        return self.host_value is not None

    @property
    def is_root(self) -> bool:
        return self.parent is None

    def __len__(self) -> int:
        return len(self.key)

    def path_to_root(self):
        """This node, its parent, ..., up to but excluding the root."""
        n = self
        while n.parent is not None:
            yield n
            n = n.parent

    def __repr__(self) -> str:
        tiers = ("D" if self.on_device else "") + ("H" if self.on_host else "")
        return f"Node#{self.id}(len={len(self.key)}, {tiers or '-'}, lock={self.lock_ref}, host_ref={self.host_ref})"

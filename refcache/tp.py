"""Agreement between tensor-parallel ranks on prefetch decisions.

Each TP rank runs its own cache over its shard of the KV heads, with its own transfers in flight.
Decisions that change what the scheduler sees (how many tokens were hit, whether a request may
stop waiting for its prefetch) must be identical on every rank, or the ranks run different batches
and the next collective in the model hangs. So ranks reduce their local views with max / min
collectives and all act on the reduced value.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch


class RankGroup(ABC):
    """The ranks that must agree. Every rank must call each collective, in the same order and
    with lists of the same length, or the collective hangs (or fails on its timeout)."""

    world_size: int
    rank: int

    @abstractmethod
    def all_max(self, values: Sequence[int]) -> list[int]:
        """Element-wise maximum of `values` over the ranks."""

    @abstractmethod
    def all_min(self, values: Sequence[int]) -> list[int]:
        """Element-wise minimum of `values` over the ranks."""


class SingleRank(RankGroup):
    """No tensor parallelism: the local view is the agreed one."""

    world_size = 1
    rank = 0

    def all_max(self, values: Sequence[int]) -> list[int]:
        return [int(v) for v in values]

    def all_min(self, values: Sequence[int]) -> list[int]:
        return [int(v) for v in values]


class TorchDistributedGroup(RankGroup):
    """Ranks of a torch.distributed process group (the default group when `group` is None).

    The reduction runs on CPU tensors for gloo and on the current CUDA device for NCCL (NCCL cannot
    reduce CPU tensors); values travel as int64."""

    def __init__(self, group=None):
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized: call init_process_group first")
        self._dist = dist
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        backend = str(dist.get_backend(group)).lower()
        cuda = "nccl" in backend and "gloo" not in backend and torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

    def _reduce(self, values: Sequence[int], op) -> list[int]:
        t = torch.tensor([int(v) for v in values], dtype=torch.int64, device=self.device)
        self._dist.all_reduce(t, op=op, group=self.group)
        return [int(v) for v in t.tolist()]

    def all_max(self, values: Sequence[int]) -> list[int]:
        return self._reduce(values, self._dist.ReduceOp.MAX)

    def all_min(self, values: Sequence[int]) -> list[int]:
        return self._reduce(values, self._dist.ReduceOp.MIN)


def agree_termination(group: RankGroup, can_terminate: bool, terminated: bool) -> bool:
    """Whether every rank stops waiting for a prefetch now.

    A rank that cannot terminate yet (KV pages or a pool transfer still in flight) holds everyone
    back; a rank that already terminated (e.g. its timeout fired) pulls everyone along, since it
    will not wait again. One collective over [not ready, terminated] with max says both."""
    not_ready, any_terminated = group.all_max([int(not can_terminate), int(terminated)])
    return not_ready == 0 or any_terminated == 1


def agree_hit_length(group: RankGroup, length: int) -> int:
    """Tokens every rank can serve: the minimum of the ranks' local hit lengths."""
    return group.all_min([length])[0]

"""TP-rank agreement: the no-op single rank, and two real gloo ranks that must agree."""

from __future__ import annotations

import multiprocessing as mp
import queue
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from refcache.tp import RankGroup, SingleRank, TorchDistributedGroup, agree_hit_length, agree_termination

TIMEOUT_S = 90


class FakeGroup(RankGroup):
    """Every rank's values in one process: the reduction the collectives compute."""

    def __init__(self, per_rank: list[list[int]]):
        self.per_rank, self.world_size, self.rank = per_rank, len(per_rank), 0

    def all_max(self, values):
        return [max(col) for col in zip(*self.per_rank, strict=True)]

    def all_min(self, values):
        return [min(col) for col in zip(*self.per_rank, strict=True)]


def test_single_rank_is_a_no_op():
    g = SingleRank()
    assert (g.world_size, g.rank) == (1, 0)
    assert g.all_max([3, 1]) == [3, 1] and g.all_min([3, 1]) == [3, 1] and g.all_max([]) == []
    assert agree_termination(g, can_terminate=True, terminated=False) is True
    assert agree_termination(g, can_terminate=False, terminated=False) is False
    assert agree_termination(g, can_terminate=False, terminated=True) is True
    assert agree_hit_length(g, 12) == 12


@pytest.mark.parametrize("states, want", [
    ([(True, False), (True, False)], True),  # everyone ready
    ([(True, False), (False, False)], False),  # one rank still has a transfer in flight
    ([(False, False), (False, False)], False),
    ([(True, False), (True, True)], True),  # one rank already terminated
    ([(False, False), (False, True)], True),  # ... it will not wait again, so all follow
])
def test_termination_rule(states, want):
    per_rank = [[int(not can), int(done)] for can, done in states]
    assert agree_termination(FakeGroup(per_rank), states[0][0], states[0][1]) is want


def test_torch_group_needs_an_initialized_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with pytest.raises(RuntimeError, match="not initialized"):
        TorchDistributedGroup()


# -- two real gloo ranks -----------------------------------------------------------------------
def _rank_main(rank: int, world_size: int, init_method: str, results, backend: str = "gloo") -> None:
    """One TP rank: local views disagree, agreed answers must not."""
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=TIMEOUT_S // 2))
        group = TorchDistributedGroup()
        out: dict[str, object] = {"rank": group.rank, "world_size": group.world_size, "device": str(group.device)}
        # Rank 0's prefetch has all its KV pages and pool transfers; rank 1's mamba pool transfer
        # is still in flight, so rank 1 cannot terminate.
        kv_done, pool_transfers_done = True, rank == 0
        out["in_flight"] = agree_termination(group, can_terminate=kv_done and pool_transfers_done, terminated=False)
        # Rank 1 times out and terminates; rank 0 still reports only that it could.
        out["one_terminated"] = agree_termination(group, can_terminate=True, terminated=rank == 1)
        # A rank that terminated pulls along one that is not ready.
        out["pulled_along"] = agree_termination(group, can_terminate=rank == 1, terminated=rank == 1)
        out["hit"] = agree_hit_length(group, [12, 8][rank])
        out["max"] = group.all_max([rank, 10 - rank, -5])
        out["min"] = group.all_min([rank, 10 - rank, -5])
        results.put((rank, out))
    except BaseException:  # report instead of dying silently, so the parent fails with the cause
        results.put((rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("backend", [
    "gloo",
    pytest.param("nccl", marks=[pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]),
])
def test_two_ranks_agree(tmp_path, backend):
    """Two real ranks (gloo on CPU; NCCL, one process per GPU) whose local states disagree agree."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init_method = f"file://{tmp_path / 'rendezvous'}"
    procs = [ctx.Process(target=_rank_main, args=(r, 2, init_method, results, backend), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    got: dict[int, object] = {}
    try:
        for _ in procs:
            rank, out = results.get(timeout=TIMEOUT_S)
            got[rank] = out
    except queue.Empty:
        pytest.fail(f"ranks hung: results only from {sorted(got)}")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
    for rank, out in got.items():
        assert isinstance(out, dict), f"rank {rank} failed:\n{out}"
    assert sorted(got) == [0, 1]
    for rank, out in got.items():
        assert out == {
            "rank": rank, "world_size": 2, "device": "cpu" if backend == "gloo" else f"cuda:{rank}",
            "in_flight": False, "one_terminated": True, "pulled_along": True, "hit": 8,
            "max": [1, 10, -5], "min": [0, 9, -5],
        }
    assert all(p.exitcode == 0 for p in procs)

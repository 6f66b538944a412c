"""The stateful machines (stateful_tests/machines.py) on device='cuda' with the CUDA executor.

Copies run for real: Triton gather/scatter on a copy stream, pinned L2, CUDA events. The GPU
decides when each copy finishes; the machine only *observes* completion. The executor here
latches what it has observed (`SampledCudaExecutor`): a part reads as done from the moment an
observation first saw its event fire, so the cache and the model see one consistent status
within a step while the order and the moment of completion stay the GPU's. Destinations are
poisoned before each copy, so data read before its copy landed fails the data oracle, which
runs on every page of every node after every step (snapshot(with_data=True) in the base).

The base machine's completion rules (finish_part, finish_op, kv_first, settle, and whatever it
grows) drive the executor through `complete`, `fail` and `complete_all`; on the GPU these mean
"wait for that part's event, then observe it" and "wait for it, then report it failed" (a copy
that landed but whose transfer reported an error: the cache must discard it). So every base
rule keeps its meaning on real hardware, and `gpu_sample` adds the GPU's own order: observe
whatever has finished by now. (Dropping a base rule instead would take overriding it with a
plain attribute: Hypothesis collects rules by attribute lookup; the first test checks that.)
"""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
import torch
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule, run_state_machine_as_test

from models.abstract import Allowed
from refcache.transfer import CopyJob, CudaExecutor, Operation, PartStatus
from stateful_tests.machines import MACHINES, CacheMachine
from stateful_tests.profiles import current

EXAMPLES = int(os.environ.get("REFCACHE_GPU_EXAMPLES", "30"))
STATS_FILE = os.environ.get("REFCACHE_GPU_STATS")  # where each run appends its counts (JSON lines)


class SampledCudaExecutor(CudaExecutor):
    """CudaExecutor whose statuses change only when observed; poisons destinations on submit."""

    totals: Counter = Counter()  # over all instances: parts submitted, parts seen still running

    def __init__(self, device):
        super().__init__(device)
        self._seen: dict[int, set[str]] = {}  # op id -> parts observed finished
        self._reported_failed: dict[int, set[str]] = {}

    def submit(self, op: Operation, jobs: list[CopyJob]) -> None:
        for j in jobs:  # on the compute stream / CPU, ordered before the copy stream's copies
            if j.poison is not None:
                j.poison()
        self._seen[op.id] = set()
        self.totals["parts_submitted"] += len(jobs)
        super().submit(op, jobs)

    def sample(self) -> None:
        """Observe every part whose event has fired by now."""
        for op_id, p in self.pending_parts():
            if self._events[op_id][p].query():
                self._seen[op_id].add(p)
            else:
                self.totals["parts_still_running_when_sampled"] += 1

    def _pending(self, op_id: int, part: str) -> None:
        if op_id not in self._seen or part not in self._events[op_id] or part in self._seen[op_id]:
            raise KeyError(f"part {part!r} of operation {op_id} is not pending")

    def complete(self, op_id: int, part: str | None = None) -> None:
        """Wait for one pending part (or every pending part of the op) on the GPU, then observe it."""
        if op_id not in self._seen:
            raise KeyError(f"no operation {op_id} in the executor")
        parts = [part] if part is not None else [p for i, p in self.pending_parts() if i == op_id]
        for p in parts:
            self._pending(op_id, p)
            self.wait(op_id, p)
            self._seen[op_id].add(p)

    def fail(self, op_id: int, part: str = "kv") -> None:
        """Report one pending part failed, once its copy has stopped touching memory."""
        self._pending(op_id, part)
        self.wait(op_id, part)
        self._reported_failed.setdefault(op_id, set()).add(part)
        self._seen[op_id].add(part)

    def status(self, op_id: int) -> dict[str, PartStatus]:
        live = super().status(op_id)
        seen, failed = self._seen.get(op_id, set()), self._reported_failed.get(op_id, set())
        return {p: PartStatus.PENDING if p not in seen else PartStatus.FAILED if p in failed else s
                for p, s in live.items()}

    def pending_parts(self) -> list[tuple[int, str]]:
        return [(i, p) for i, evs in self._events.items() for p in evs if p not in self._seen[i]]

    def pending_ops(self) -> set[int]:
        return {i for i, _ in self.pending_parts()}

    def complete_all(self) -> None:
        super().complete_all()
        self.sample()

    def forget(self, op_id: int) -> None:
        super().forget(op_id)
        self._seen.pop(op_id, None)
        self._reported_failed.pop(op_id, None)


class CudaRules(RuleBasedStateMachine):
    """Mixed in before a CacheMachine: the CUDA executor, and a rule that observes the GPU."""

    steps = 0

    def __init__(self):
        super().__init__()
        dev = self.cache.config.torch_device
        assert dev.type == "cuda", "run with REFCACHE_DEVICE=cuda"
        assert not self.cache.ops
        self.cache.executor = SampledCudaExecutor(dev)

    def _step(self, what, allowed, check=None):
        type(self).steps += 1
        return super()._step(what, allowed, check)

    @precondition(lambda self: self.cache.executor.pending_parts())
    @rule()
    def gpu_sample(self):
        """Observe whatever the GPU has finished by now, in its own order."""
        self.cache.executor.sample()
        self._step("sample events", Allowed())


CUDA_MACHINES: dict[str, type[CacheMachine]] = {
    name: type(f"Cuda{m.__name__}", (CudaRules, m), {}) for name, m in MACHINES.items()}


def _rule_names(cls) -> set[str]:
    return {r.function.__name__ for r in cls.setup_state().rules}


def test_cuda_machines_keep_every_base_rule_and_add_gpu_sample():
    """Hypothesis collects rules by attribute lookup on the class: the CUDA machines have every
    rule of their base plus gpu_sample, and a plain attribute would drop a rule (runs without CUDA)."""
    for name, cls in CUDA_MACHINES.items():
        base = _rule_names(MACHINES[name])
        assert {"finish_part", "finish_op", "settle"} <= base
        assert _rule_names(cls) == base | {"gpu_sample"}, name
    dropped = type("Dropped", (CUDA_MACHINES["full/write_through"],), {"finish_part": None})
    assert "finish_part" not in _rule_names(dropped)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(CUDA_MACHINES))
def test_machine_on_cuda(name, monkeypatch):
    """Each machine (component mix x write policy) with real transfers on the GPU."""
    monkeypatch.setenv("REFCACHE_DEVICE", "cuda")
    cls = CUDA_MACHINES[name]
    cls.steps = 0
    SampledCudaExecutor.totals.clear()
    run_state_machine_as_test(cls, settings=current(max_examples=EXAMPLES))
    line = {"machine": name, "examples": EXAMPLES, "steps": cls.steps, **SampledCudaExecutor.totals}
    print(json.dumps(line))
    if STATS_FILE:
        with open(STATS_FILE, "a") as f:
            f.write(json.dumps(line) + "\n")
    assert cls.steps > 0 and SampledCudaExecutor.totals["parts_submitted"] > 0

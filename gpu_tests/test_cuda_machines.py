"""The stateful machines (stateful_tests/machines.py) on device='cuda' with the CUDA executor.

Copies run for real: Triton gather/scatter on a copy stream, pinned L2, CUDA events. The
executor here (`LatchedCudaExecutor`) reports a part done only once the machine has asked for
it and its CUDA event has fired: the base machine's completion rules (finish_part, finish_op,
kv_first, settle, and whatever it grows) call `complete`, `fail` and `complete_all`, which on
the GPU mean "block on that part's event, then report it done" and "block on it, then report it
failed" (a copy that landed but whose transfer reported an error: the cache must discard it).
So every base rule keeps its meaning on real hardware, and the cache sees each part's status
change only at a step the machine chose, which keeps the run replayable: Hypothesis refuses
runs whose enabled rules depend on timing (FlakyStrategyDefinition), which is what reading the
events' live state at each step gave (seen on the H100). The GPU's own timing is exercised by
`gpu_stall`, which keeps the copy stream busy for milliseconds so that later copies are really
in flight while the next steps and their data checks run (counted as `completed_while_in_flight`:
parts the machine completed while the GPU was still copying them), and by the random walks of
test_cuda_path.py, which poll the live events.

Destinations are poisoned before each copy, so data read before its copy landed fails the data
oracle, which runs on every page of every node after every step (snapshot(with_data=True)).
(Dropping a base rule would take overriding it with a plain attribute: Hypothesis collects rules
by attribute lookup; the first test checks that.)
"""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
import torch
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test

from models.abstract import Allowed
from refcache.transfer import CopyJob, CudaExecutor, Operation, PartStatus
from stateful_tests.machines import MACHINES, CacheMachine
from stateful_tests.profiles import current

EXAMPLES = int(os.environ.get("REFCACHE_GPU_EXAMPLES", "30"))
STALL_HZ = 1.5e9  # torch.cuda._sleep counts clock cycles; roughly the SM clock
STATS_FILE = os.environ.get("REFCACHE_GPU_STATS")  # where each run appends its counts (JSON lines)


class LatchedCudaExecutor(CudaExecutor):
    """CudaExecutor whose parts read as done only once completed through it (after their events
    fired); poisons destinations on submit."""

    totals: Counter = Counter()  # over all instances: parts submitted, parts completed while in flight

    def __init__(self, device):
        super().__init__(device)
        self._seen: dict[int, set[str]] = {}  # op id -> parts reported finished
        self._reported_failed: dict[int, set[str]] = {}

    def submit(self, op: Operation, jobs: list[CopyJob]) -> None:
        for j in jobs:  # on the compute stream / CPU, ordered before the copy stream's copies
            if j.poison is not None:
                j.poison()
        self._seen[op.id] = set()
        self.totals["parts_submitted"] += len(jobs)
        super().submit(op, jobs)

    def _finish(self, op_id: int, part: str) -> None:
        if op_id not in self._seen or part not in self._events[op_id] or part in self._seen[op_id]:
            raise KeyError(f"part {part!r} of operation {op_id} is not pending")
        if not self._events[op_id][part].query():
            self.totals["completed_while_in_flight"] += 1
        self.wait(op_id, part)
        self._seen[op_id].add(part)

    def complete(self, op_id: int, part: str | None = None) -> None:
        """Block until one pending part (or every pending part of the op) is done on the GPU."""
        if op_id not in self._seen:
            raise KeyError(f"no operation {op_id} in the executor")
        for p in [part] if part is not None else [p for i, p in self.pending_parts() if i == op_id]:
            self._finish(op_id, p)

    def fail(self, op_id: int, part: str = "kv") -> None:
        """Report one pending part failed, once its copy has stopped touching memory."""
        self._finish(op_id, part)
        self._reported_failed.setdefault(op_id, set()).add(part)

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
        for op_id, p in self.pending_parts():
            self._finish(op_id, p)

    def forget(self, op_id: int) -> None:
        super().forget(op_id)
        self._seen.pop(op_id, None)
        self._reported_failed.pop(op_id, None)


class CudaRules(RuleBasedStateMachine):
    """Mixed in before a CacheMachine: the CUDA executor, and a rule that stalls the GPU."""

    steps = 0

    def __init__(self):
        super().__init__()
        dev = self.cache.config.torch_device
        assert dev.type == "cuda", "run with REFCACHE_DEVICE=cuda"
        assert not self.cache.ops
        self.cache.executor = LatchedCudaExecutor(dev)

    def _step(self, what, allowed, check=None):
        type(self).steps += 1
        return super()._step(what, allowed, check)

    @rule(ms=st.sampled_from([1, 5, 20]))
    def gpu_stall(self, ms):
        """Keep the copy stream busy for a while, so the next copies are really in flight when the
        following steps run (without it, these tiny copies finish before any step can look)."""
        ex = self.cache.executor
        with torch.cuda.stream(ex.stream):
            torch.cuda._sleep(int(ms * 1e-3 * STALL_HZ))
        self._step(f"stall copy stream {ms} ms", Allowed())


CUDA_MACHINES: dict[str, type[CacheMachine]] = {
    name: type(f"Cuda{m.__name__}", (CudaRules, m), {}) for name, m in MACHINES.items()}


def _rule_names(cls) -> set[str]:
    return {r.function.__name__ for r in cls.setup_state().rules}


def test_cuda_machines_keep_every_base_rule_and_add_gpu_stall():
    """Hypothesis collects rules by attribute lookup on the class: the CUDA machines have every
    rule of their base plus gpu_stall, and a plain attribute would drop a rule (runs without CUDA)."""
    for name, cls in CUDA_MACHINES.items():
        base = _rule_names(MACHINES[name])
        assert {"finish_part", "finish_op", "settle"} <= base
        assert _rule_names(cls) == base | {"gpu_stall"}, name
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
    LatchedCudaExecutor.totals.clear()
    run_state_machine_as_test(cls, settings=current(max_examples=EXAMPLES))
    line = {"machine": name, "examples": EXAMPLES, "steps": cls.steps, **LatchedCudaExecutor.totals}
    print(json.dumps(line))
    if STATS_FILE:
        with open(STATS_FILE, "a") as f:
            f.write(json.dumps(line) + "\n")
    assert cls.steps > 0 and LatchedCudaExecutor.totals["parts_submitted"] > 0

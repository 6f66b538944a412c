"""Run one stateful machine under Hypothesis until it fails or its time is up, then shrink.

Detection and minimization are two runs over one in-memory example database: the first only
generates (its wall time is the time to detection), the second replays the saved failure and
shrinks it within a time cap. The minimized program is the one Hypothesis prints
(`state = ...`, `state.rule(...)`), which `campaign.report` replays and turns into a report.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import hypothesis.internal.conjecture.engine as engine
from hypothesis import Phase, reporting, seed
from hypothesis.database import InMemoryExampleDatabase
from hypothesis.stateful import run_state_machine_as_test

from stateful_tests.machines import MACHINES, CacheMachine
from stateful_tests.profiles import current

_STEP = re.compile(r"^(?:[\w, ()]+ = )*state\.(\w+)\(")
_NOT_RULES = {"invariants_hold", "model_agrees", "teardown"}


@dataclass
class Hunt:
    """What one machine run found."""

    machine: str
    seed: int
    found: bool = False
    seconds: float = 0.0  # to detection (or the whole run when nothing was found)
    shrink_seconds: float = 0.0
    shrink_capped: bool = False  # Hypothesis's shrinking stopped at our cap (the line-level pass goes on)
    steps_run: int = 0  # model-checked steps executed while searching
    error: str = ""  # the failure's message (first line first)
    error_type: str = ""
    program: list[str] = field(default_factory=list)  # the minimized steps, as Hypothesis printed them

    @property
    def rules(self) -> list[str]:
        """The rule calls of the minimized program (no invariant checks, no teardown)."""
        return [ln for ln in self.program if (m := _STEP.match(ln)) and m.group(1) not in _NOT_RULES]

    @property
    def minimized_steps(self) -> int:
        return len(self.rules) + (1 if self.error.startswith("invariants broken at teardown") else 0)

    @property
    def invariant(self) -> str:
        """The invariant (or model check) the failure names."""
        return failure_check(self.error)


def failure_check(message: str) -> str:
    """Map a machine failure message to the check that fired: an invariant id of DESIGN §3, or
    `model:<operation>` for a disagreement with the abstract model."""
    m = re.search(r"\b([STRXD]\d)\b(?: \(node \d+\))?:", message)
    if "invariants broken" in message and m:
        return m.group(1)
    if "never terminates" in message or "still in flight after completing all" in message:
        return "X3"
    op = re.match(r"(\w+)", message)
    return f"model:{op.group(1)}" if op else "model"


SLOW_SHRINK_WARNING = "spent more than five minutes working to shrink"  # Hypothesis's words at *any* cap


@contextlib.contextmanager
def shrink_cap(seconds: float, capped: Callable[[], None] | None = None) -> Iterator[None]:
    """Bound Hypothesis's shrinking (its own cap is 5 minutes) for this block. When the cap fires,
    Hypothesis reports that it spent "more than five minutes", whatever the cap: that line is
    swallowed here and `capped()` called instead, so the caller can say what really happened."""
    old = engine.MAX_SHRINKING_SECONDS
    engine.MAX_SHRINKING_SECONDS = max(1, int(seconds))
    outer = reporting.current_reporter()

    def reporter(message: object) -> None:
        if SLOW_SHRINK_WARNING in str(message):
            if capped is not None:
                capped()
        else:
            outer(message)

    try:
        with reporting.with_reporter(reporter):
            yield
    finally:
        engine.MAX_SHRINKING_SECONDS = old


def hunt(name: str, seed_: int, budget_s: float, shrink_s: float = 30.0, max_examples: int = 100_000,
         patch: contextlib.AbstractContextManager | None = None) -> Hunt:
    """Search machine `name` (under `patch`, a seeded bug, if given) for up to `budget_s` seconds."""
    res = Hunt(name, seed_)
    db = InMemoryExampleDatabase()
    base = MACHINES[name]
    machine = type(base.__name__, (base,), {})  # one class for both runs: the database key is its digest
    deadline = time.monotonic() + budget_s
    start_steps = CacheMachine.checked_steps
    t0 = time.perf_counter()
    with patch or contextlib.nullcontext():
        # generation in slices, so the budget is honoured; each slice has its own seed
        k = 0
        while time.monotonic() < deadline:
            try:
                run_state_machine_as_test(seed(seed_ * 1000 + k)(machine), settings=current(
                    phases=(Phase.generate,), database=db, derandomize=False, print_blob=False,
                    max_examples=min(max_examples, 25)))
            except Exception as e:  # noqa: BLE001 - any failure is a finding
                res.found, res.seconds = True, time.perf_counter() - t0
                res.steps_run = CacheMachine.checked_steps - start_steps
                _record(res, e)
                break
            k += 1
        if not res.found:
            res.seconds = time.perf_counter() - t0
            res.steps_run = CacheMachine.checked_steps - start_steps
            return res
        for key in [k for k in db.data if not k.endswith(b".secondary")]:  # not "previously shrunk": shrink it
            for value in list(db.data[key]):
                db.move(key, key + b".secondary", value)
        t1 = time.perf_counter()
        with shrink_cap(shrink_s, lambda: setattr(res, "shrink_capped", True)):
            try:
                run_state_machine_as_test(machine, settings=current(
                    phases=(Phase.reuse, Phase.shrink), database=db, derandomize=False, print_blob=False,
                    report_multiple_bugs=False))  # one failure, its steps attached as notes (not under quiet)
            except Exception as e:  # noqa: BLE001
                _record(res, e)
        res.shrink_seconds = time.perf_counter() - t1
    return res


def _program(e: BaseException) -> list[str]:
    """The steps Hypothesis attached to a failure (empty when it attached none)."""
    notes = [n for n in getattr(e, "__notes__", []) if not n.startswith("Failing test case")]
    program = [ln for n in notes for ln in n.splitlines()]
    return [ln for ln in program if ln.strip()] if any(ln.startswith("state = ") for ln in program) else []


def _record(res: Hunt, e: BaseException) -> None:
    """Keep the failure's error and steps; of several distinct failures, the shortest program."""
    if getattr(e, "exceptions", None):  # an exception group
        found = [x for x in e.exceptions if _program(x)]
        if found:
            e = min(found, key=lambda x: len(_program(x)))
    res.error_type = type(e).__name__
    res.error = str(e)
    if program := _program(e):
        res.program = program

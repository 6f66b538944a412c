"""Check one target against the abstract model within a time budget: the engine of the pytest
plugin (`conformance.pytest_plugin`), usable from any script.

    from conformance import check_target
    r = check_target("mypkg.adapter:make_target", budget_s=30)
    assert r.passed, r.report()

The machine (`conformance.machine`) runs in batches of Hypothesis examples until the budget is
spent or a step disagrees with the model. A failure is shrunk by Hypothesis (capped, so a bounded
run stays bounded), then by a replay pass that deletes every operation the failure does not need;
the result names the check that fired and the minimized operations, which `replay_operations`
runs again (to keep as a regression test).
"""

from __future__ import annotations

import importlib
import io
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .target import Target

Factory = Callable[[], Target]


def load_factory(spec: str | Factory) -> tuple[Factory, str]:
    """`"package.module:attr"` (or `"package.module.attr"`) -> (zero-argument factory, its name).

    `attr` is a `Target` subclass or any zero-argument callable returning a `Target`."""
    if callable(spec):
        return spec, getattr(spec, "__qualname__", repr(spec))
    mod_name, sep, attr = spec.partition(":")
    if not sep:
        mod_name, _, attr = spec.rpartition(".")
    if not mod_name or not attr:
        raise ValueError(f"target {spec!r}: expected 'package.module:attribute'")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"target {spec!r}: cannot import {mod_name!r}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"target {spec!r}: {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"target {spec!r}: {attr!r} is neither a Target subclass nor a factory")
    return obj, spec


def validate(factory: Factory, name: str) -> Target:
    """Build one target and check that it declares what the machine needs (clear errors early,
    instead of an AttributeError deep inside the first step)."""
    from .target import TargetInfo

    t = factory()
    if not isinstance(t, Target):
        raise TypeError(f"target {name}: the factory returned {type(t).__name__}, not a conformance.Target")
    info = getattr(t, "info", None)
    if not isinstance(info, TargetInfo):
        raise TypeError(f"target {name}: {type(t).__name__}.info must be a conformance.TargetInfo")
    unknown = set(info.ops) - {"insert", "match", "lock", "unlock", "evict", "evict_mamba", "load_back"}
    if unknown:
        raise ValueError(f"target {name}: TargetInfo.ops names unknown operations {sorted(unknown)}")
    if type(t).data_ok is Target.data_ok and not hasattr(t, "book"):
        raise TypeError(f"target {name}: give the adapter a `book` (a conformance.SlotBook) or override data_ok()")
    return t


@dataclass
class CheckResult:
    """The outcome of `check_target`. `operations` are the minimized ones (as `replay_operations`
    takes them); `check` is one line naming the check that fired."""

    target: str
    passed: bool
    steps: int
    examples: int
    seed: int
    elapsed_s: float
    check: str | None = None
    operations: list[tuple[str, Any]] | None = None
    error: str | None = None
    hypothesis_output: str = ""
    notes: list[str] = field(default_factory=list)

    def report(self) -> str:
        """What a CI log should show: verdict, the check, the operations, how to replay them."""
        head = (f"refcache conformance: target {self.target}: {'agrees with the model' if self.passed else 'FAILED'} "
                f"({self.steps} steps, {self.examples} examples, seed {self.seed}, {self.elapsed_s:.1f} s)")
        if self.passed:
            return head
        from .machine import format_calls

        out = [head, f"check that fired: {self.check}"]
        if self.operations is not None:
            out += [f"minimized to {len(self.operations)} operations:", format_calls(self.operations)]
        out += ["error:", _indent(self.error or "")]
        if self.operations is not None:
            out += ["replay (a regression test):",
                    f"  from conformance.check import replay_operations\n"
                    f"  assert replay_operations({self.target!r}, {self.operations!r}) is None"]
        out += self.notes
        if self.hypothesis_output.strip():
            out += ["--- as Hypothesis reported it:", self.hypothesis_output.rstrip()]
        return "\n".join(out)


def _indent(text: str) -> str:
    return "\n".join("  " + ln for ln in text.splitlines())


def fired_check(e: BaseException) -> str:
    """One line naming the check behind a failure: which comparison with the model, the target's
    own checks, the lock counts, or an exception the target raised."""
    from .machine import Disagreement

    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    if not isinstance(e, Disagreement):
        return f"the target raised {type(e).__name__}: {first}"[:300]
    detail = lines[1] if len(lines) > 1 else first.split(": ", 2)[-1]
    if "target and model disagree" in first:
        op = first.split(": ")[1].split(" ")[0] if ": " in first else "?"
        return f"model ({op}): {detail}"[:300]
    if "target checks fail" in first:
        return f"target's own check: {detail}"[:300]
    if ": locks: " in first:
        return "lock counts: " + first.split(": locks: ", 1)[1][:280]
    if ": at teardown: " in first:
        return "target's own check at teardown: " + first.split(": at teardown: ", 1)[1][:260]
    return first[:300]


_FALSE_WARNING = re.compile(r".*spent more than .* shrink.*", re.I)


def check_target(target: str | Factory, budget_s: float = 30.0, seed: int | None = None,
                 steps_per_example: int = 40, shrink_s: float | None = None) -> CheckResult:
    """Run the conformance machine against `target` (a "module:attr" path or a zero-argument
    factory) for about `budget_s` seconds; stop at the first disagreement and minimize it.

    Shrinking is capped at `shrink_s` seconds (default: the budget, at least 5 and at most 60) on
    top of the budget, so a failing run takes at most about twice its budget plus one batch."""
    from hypothesis import HealthCheck, settings
    from hypothesis import seed as hseed
    from hypothesis.internal.conjecture import engine
    from hypothesis.reporting import with_reporter
    from hypothesis.stateful import get_state_machine_test

    from .machine import machine_for, minimize

    factory, name = load_factory(target)
    probe = validate(factory, name)
    probe.close()
    cls = machine_for(factory, probe.info.name)
    cls.steps_run = 0
    first = s = random.randrange(2**32) if seed is None else seed
    shrink_s = min(60.0, max(5.0, budget_s)) if shrink_s is None else shrink_s
    conf = settings(max_examples=10, stateful_step_count=steps_per_example, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large], print_blob=False)
    t0 = time.monotonic()
    deadline = t0 + budget_s
    examples = 0
    saved, engine.MAX_SHRINKING_SECONDS = engine.MAX_SHRINKING_SECONDS, max(1, int(shrink_s))
    try:
        while True:
            out = io.StringIO()
            test = hseed(s)(get_state_machine_test(cls, settings=conf))
            try:
                with with_reporter(lambda m, out=out: out.write(str(m) + "\n")):
                    test()
            except Exception as e:  # noqa: BLE001 - a disagreement, or the target crashing: the finding
                examples += 10
                err = _first(e)
                said = out.getvalue()
                notes = []
                if _FALSE_WARNING.search(said):
                    said = _FALSE_WARNING.sub("", said)
                    notes.append(f"(Hypothesis' shrinking stopped at our cap of {shrink_s:.0f} s; the replay pass "
                                 "below removed the operations the failure did not need)")
                calls = list(cls.last_calls)
                small = minimize(cls, calls, min(20.0, shrink_s)) if calls else None
                if small is not None:
                    calls, err = small
                return CheckResult(name, False, cls.steps_run, examples, first, time.monotonic() - t0,
                                   fired_check(err), [(op, a) for op, a in calls] if calls else None,
                                   f"{type(err).__name__}: {err}", said, notes)
            examples += 10
            s += 1
            if time.monotonic() >= deadline:
                return CheckResult(name, True, cls.steps_run, examples, first, time.monotonic() - t0)
    finally:
        engine.MAX_SHRINKING_SECONDS = saved


def _first(e: BaseException) -> BaseException:
    """Hypothesis raises an ExceptionGroup when it found several distinct failures: take the first."""
    inner = getattr(e, "exceptions", None)
    return inner[0] if inner else e


def replay_operations(target: str | Factory, operations: list) -> BaseException | None:
    """Run recorded operations (a `CheckResult.operations` list) on a fresh target with every check
    after every step; returns the failure, or None when the target now agrees with the model."""
    from .machine import machine_for, replay

    factory, name = load_factory(target)
    probe = validate(factory, name)
    probe.close()
    return replay(machine_for(factory, probe.info.name), [tuple(c) for c in operations])

"""Stateful steps per second on the CPU, per machine (issue 4's benchmark; not a test).

A "step" is one operation checked against the model (`CacheMachine._step`): the snapshot with
data, the abstraction, the frame and the step's own prediction; every invariant of
`check_invariants()` and the model's own counts also run after each rule. Each machine runs
Hypothesis (generation only, random seeds) for `--seconds`, on one core.

    python -m benchmarks.bench_stateful [--seconds 20] [--machines full/write_through,...]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from hypothesis import Phase
from hypothesis.stateful import run_state_machine_as_test

from stateful_tests.machines import MACHINES, CacheMachine
from stateful_tests.profiles import current


def measure(name: str, seconds: float) -> tuple[int, int, float]:
    """(steps, examples, wall seconds) of `name` run for about `seconds`."""
    machine = MACHINES[name]
    start_steps, examples, t0 = CacheMachine.checked_steps, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        run_state_machine_as_test(machine, settings=current(
            max_examples=20, derandomize=False, database=None, phases=(Phase.generate,), print_blob=False))
        examples += 20
    return CacheMachine.checked_steps - start_steps, examples, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="time per machine")
    ap.add_argument("--machines", default=",".join(MACHINES), help="comma-separated machine names")
    args = ap.parse_args(argv)
    names = [n for n in args.machines.split(",") if n]
    unknown = [n for n in names if n not in MACHINES]
    if unknown:
        ap.error(f"unknown machines {unknown}; known: {sorted(MACHINES)}")
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; one core used; "
          f"device={os.environ.get('REFCACHE_DEVICE', 'cpu')}")
    print(f"{'machine':32} {'prefetch policy':16} {'steps':>8} {'examples':>9} {'seconds':>8} {'steps/s':>8}")
    total_steps = total_t = 0.0
    for name in names:
        try:
            steps, examples, dt = measure(name, args.seconds)
        except Exception as e:  # noqa: BLE001 - a failure on the clean cache is a finding, not a figure
            print(f"{name}: FAILED {type(e).__name__}: {str(e)[:2000]}")
            return 1
        policy = MACHINES[name].CONFIG["prefetch_policy"]
        print(f"{name:32} {policy:16} {steps:8d} {examples:9d} {dt:8.1f} {steps / dt:8.0f}", flush=True)
        total_steps += steps
        total_t += dt
    print(f"{'all':32} {'':16} {int(total_steps):8d} {'':9} {total_t:8.1f} {total_steps / total_t:8.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

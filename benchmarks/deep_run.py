"""A long clean-cache run of every machine under the `deep` profile, spread over processes.

Each worker runs the machines in turns (generation only, fresh seeds) until its share of
`--steps` model-checked steps is done; a failure is printed with its program and counted.

    python -m benchmarks.deep_run --steps 1000000 --jobs 8
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time


def _worker(args: tuple[int, int, int]) -> tuple[int, int, list[str], float]:
    index, steps, seed = args
    os.environ.setdefault("REFCACHE_HYPOTHESIS_PROFILE", "deep")
    import torch
    from hypothesis import Phase
    from hypothesis import seed as hseed
    from hypothesis.stateful import run_state_machine_as_test

    from stateful_tests.machines import MACHINES, CacheMachine
    from stateful_tests.profiles import current

    torch.set_num_threads(1)
    t0, turn, examples, failures = time.perf_counter(), 0, 0, []
    names = list(MACHINES)
    while CacheMachine.checked_steps < steps:
        name = names[(index + turn) % len(names)]
        machine = type(MACHINES[name].__name__, (MACHINES[name],), {})
        try:
            run_state_machine_as_test(hseed(seed * 1_000_003 + index * 10_007 + turn)(machine), settings=current(
                phases=(Phase.generate,), derandomize=False, database=None, max_examples=20, print_blob=False))
        except Exception as e:  # noqa: BLE001 - a failure on the clean cache is the finding
            failures.append(f"{name}: {e}\n" + "\n".join(getattr(e, "__notes__", [])))
        examples += 20
        turn += 1
    return CacheMachine.checked_steps, examples, failures, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1_000_000)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    share = -(-a.steps // a.jobs)
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(a.jobs) as pool:
        results = pool.map(_worker, [(i, share, a.seed) for i in range(a.jobs)])
    wall = time.perf_counter() - t0
    steps = sum(r[0] for r in results)
    examples = sum(r[1] for r in results)
    failures = [f for r in results for f in r[2]]
    cpu = sum(r[3] for r in results)
    print(f"deep profile: {steps} model-checked steps in {examples} examples over {a.jobs} processes; "
          f"wall {wall:.0f} s, {cpu:.0f} process-seconds ({steps / cpu:.0f} steps/s per process); "
          f"{len(failures)} failures")
    for f in failures:
        print(f)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Checked steps per second of the clean exploration at 1, 2, 4, ... worker processes (a figure, not a test).

Each point is one `explore_clean` run of `--seconds` wall-clock seconds with `--jobs k`: the
campaign's own scheduler and worker processes. The workers are started and warmed up (torch,
Hypothesis and refcache imported) before the clock starts, and the start-up is printed apart:
it is paid once per run, and a 300 s run should not be judged by it. Steps are model-checked
steps (the snapshot, the abstraction, the model's prediction and every invariant after each
rule), summed over every machine. Branch coverage is off, so every step runs at full speed.
Prints steps/s, the speed-up over one worker and its ratio to linear (speed-up / k), with the
host it ran on.

    python -m benchmarks.bench_scaling [--seconds 30] [--jobs 1,2,4,8,16]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from campaign.verify import Progress, explore_clean
from campaign.workers import default_jobs, make_pool, task_warm_up


def measure(jobs: int, seconds: float, seed: int) -> tuple[int, float, int, float]:
    """(steps, wall seconds, violations, start-up seconds) of one clean exploration with `jobs` workers."""
    t0 = time.perf_counter()
    pool = make_pool(jobs)
    try:
        for f in [pool.submit(task_warm_up, 0.5) for _ in range(jobs)]:
            f.result()
        start_up = time.perf_counter() - t0
        with tempfile.TemporaryDirectory(prefix="refcache-scaling-") as out:
            t1 = time.perf_counter()
            clean, failures = explore_clean(seconds, seed, Progress(deadline=time.monotonic() + seconds), Path(out),
                                            coverage_share=0.0, jobs=jobs, pool=pool)
            return clean["steps"], time.perf_counter() - t1, len(failures), start_up
    finally:
        pool.shutdown()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_scaling", description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0, help="wall-clock seconds per point (default 30)")
    ap.add_argument("--jobs", default="1,2,4,8,16", help="worker counts, comma-separated (default 1,2,4,8,16)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    counts = [int(j) for j in a.jobs.split(",") if j.strip()]
    if not counts or min(counts) < 1:
        ap.error("--jobs wants positive worker counts")
    cores = default_jobs()
    print(f"# clean-exploration scaling on {platform.node()} ({platform.processor() or platform.machine()}, "
          f"{cores} usable cores, {os.cpu_count()} in the host), python {platform.python_version()}, "
          f"{a.seconds:.0f} s per point")
    if max(counts) > cores:
        print(f"# note: {max(counts)} workers on {cores} cores: points above {cores} are oversubscribed")
    print(f"{'workers':>7} {'steps':>9} {'wall s':>7} {'steps/s':>9} {'speed-up':>9} {'x linear':>9} "
          f"{'start-up s':>10} violations")
    base = None
    for k in counts:
        steps, wall, bad, start_up = measure(k, a.seconds, a.seed)
        rate = steps / wall
        base = base or (rate if k == 1 else None)
        up = rate / base if base else float("nan")
        print(f"{k:>7} {steps:>9} {wall:>7.1f} {rate:>9.0f} {up:>9.2f} {up / k:>9.2f} {start_up:>10.1f} {bad}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

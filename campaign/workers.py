"""The campaign's units of work, and the pool of processes that runs them side by side.

Every phase of `refcache verify` splits into tasks that need nothing from each other: the Z3
proofs of one transition, the CrossHair checks, the hunt for one seeded bug, one machine's slice
of clean exploration. A task is a plain function of plain arguments returning a plain dict, so
it runs the same in this process (`--jobs 1`) or in a worker process; the parent merges the
dicts. Deadlines are wall-clock times (`time.time()`), the one clock all processes share: a task
that waited in the queue gets only what is left of its phase.

A task writes its failure reports into a scratch folder of its own and returns their text with
its result (`files`); the parent writes them under the run's report folder. So a failure found
on any worker, in this process, in another process or on another machine of a Dask cluster,
lands in the same report with the same repro files, and no worker needs the parent's disk.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def default_jobs() -> int:
    """All the cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.time())


def _quiet(*_a: Any, **_k: Any) -> None:
    """A worker's progress goes nowhere: the parent prints one line for all of them."""


SCRATCH = "\x00scratch\x00"  # stands for the task's scratch folder in the text of its reports


def _files(folder: str) -> dict[str, str]:
    """Every file under `folder`, by relative path: the reports a task wrote, to travel back.
    Paths into the scratch folder (the replay command names its repro file) are marked, so the
    parent can point them at the run's own folder."""
    root = Path(folder)
    return {str(p.relative_to(root)): p.read_text().replace(str(root), SCRATCH)
            for p in sorted(root.rglob("*")) if p.is_file()}


def write_files(out: Path, files: dict[str, str]) -> None:
    """Land a task's reports under the run's folder, their paths pointing there."""
    for rel, text in files.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.replace(SCRATCH, str(out)))


# ---------------------------------------------------------------------------------- tasks
def task_proofs(transitions: list[str], nodes: int, deadline: float) -> dict:
    """Z3: every invariant inductive over `transitions`, for trees up to `nodes` nodes."""
    from properties.prove import run_all

    rows = run_all(nodes=nodes, budget_s=_left(deadline), bugs=False, transitions=transitions)
    return {"proofs": [{k: r.get(k) for k in ("invariant", "transition", "status", "nodes", "seconds")} for r in rows]}


def task_crosshair(deadline: float) -> dict:
    from .verify import run_crosshair

    return {"crosshair": run_crosshair(max(5.0, _left(deadline)), _quiet)}


def task_hunt(name: str, cap_s: float, deadline: float, seed: int, device: str) -> dict:
    """One seeded bug: hunt it on its machines until detected, shrink, minimize, report."""
    os.environ["REFCACHE_DEVICE"] = device
    from .verify import hunt_bug

    budget = min(cap_s, _left(deadline))
    with tempfile.TemporaryDirectory(prefix="refcache-task-") as tmp:
        row = hunt_bug(name, max(1.0, budget), seed, _quiet, Path(tmp))
        return {"bug": row, "files": _files(tmp)}


def task_conformance(name: str, deadline: float, seed: int) -> dict:
    from .verify import run_conformance

    with tempfile.TemporaryDirectory(prefix="refcache-task-") as tmp:
        row = run_conformance(name, _left(deadline), seed, _quiet, Path(tmp))
        return {"conformance": row, "files": _files(tmp)}


def task_clean(machine: str, seed: int, deadline: float, slice_s: float, stem: str, device: str,
               coverage_dir: str | None, coverage_share: float) -> dict:
    """One machine's slice of clean exploration: its steps, any violation (with a report), the
    rare events and rules it reached, and, when asked, branch coverage of the first share of
    the slice saved to a data file of its own in `coverage_dir` (the parent combines them)."""
    os.environ["REFCACHE_DEVICE"] = device
    from stateful_tests import events

    from .hunt import hunt
    from .verify import SHRINK_S, report_violation

    events.reset()
    slice_s = min(slice_s, _left(deadline))
    runs, measured = [], None
    if coverage_dir is not None:
        import coverage

        from .verify import REFCACHE_DIR

        cov = coverage.Coverage(branch=True, source=[str(REFCACHE_DIR)],
                                data_file=str(Path(coverage_dir) / ".coverage"), data_suffix=True)
        cov.set_option("run:disable_warnings", ["no-data-collected"])  # a short slice may collect nothing
        cov.start()
        try:
            runs.append(hunt(machine, seed, slice_s * coverage_share, SHRINK_S, max_examples=5))
        finally:
            cov.stop()
            cov.save()
        measured = (runs[0].steps_run, runs[0].seconds)
        rest = min(slice_s * (1 - coverage_share), _left(deadline))
        if not runs[0].found and rest > 0.5:
            runs.append(hunt(machine, seed + 500_000, rest, SHRINK_S, max_examples=5))
    else:
        runs.append(hunt(machine, seed, slice_s, SHRINK_S, max_examples=5))
    with tempfile.TemporaryDirectory(prefix="refcache-task-") as tmp:
        failures = [report_violation(h, Path(tmp), f"{stem}_{i}") for i, h in enumerate(runs) if h.found]
        files = _files(tmp)
    return {"files": files, "clean": {"machine": machine, "steps": sum(h.steps_run for h in runs),
                      "seconds": sum(h.seconds for h in runs), "failures": failures,
                      "events": dict(events.REACHED), "rules": {m: dict(c) for m, c in events.RULES.items()},
                      "detector_errors": dict(events.ERRORS), "measured": measured}}


def task_warm_up(hold_s: float) -> dict:
    """Import what every task needs, then hold the worker a moment so each worker gets one."""
    import campaign.verify  # noqa: F401 - the import is the point
    import stateful_tests.machines  # noqa: F401

    time.sleep(hold_s)
    return {"warm": os.getpid()}


# ----------------------------------------------------------------------------------- pool
class InlinePool:
    """`--jobs 1`: tasks run in this process, one at a time, when submitted."""

    def submit(self, fn: Callable[..., dict], *args: Any) -> cf.Future:
        fut: cf.Future = cf.Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - the caller reads it from the future
            fut.set_exception(e)
        return fut

    def shutdown(self) -> None:
        pass


def _worker_init() -> None:
    """Workers use one thread each for torch: the parallelism is the processes. A worker whose
    parent died (killed, or stopped without shutting the pool) exits instead of living on."""
    import torch

    torch.set_num_threads(1)
    _exit_with_parent(os.getppid())


def _exit_with_parent(parent: int, every_s: float = 1.0) -> None:
    def watch() -> None:
        while True:
            time.sleep(every_s)
            if os.getppid() != parent:  # re-parented: the campaign that started us is gone
                os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def make_pool(jobs: int) -> cf.Executor | InlinePool:
    """`jobs` worker processes (spawned: no state inherited from the parent's threads), or inline."""
    if jobs <= 1:
        return InlinePool()
    ctx = multiprocessing.get_context("spawn")
    return cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init)


def run_tasks(pool: cf.Executor | InlinePool, jobs: int, fixed: list[tuple], more: Callable[[], tuple | None],
              on_done: Callable[[tuple, dict | BaseException], None], tick: Callable[[int], None]) -> None:
    """Keep `jobs` tasks in flight: first `fixed` (in order), then what `more()` gives until it
    gives None. `on_done(task, result or exception)` for each; `tick(in_flight)` about every second."""
    queue = list(fixed)
    flight: dict[cf.Future, tuple] = {}
    exhausted = False

    def top_up() -> None:
        nonlocal exhausted
        while len(flight) < max(1, jobs) and (queue or not exhausted):
            task = queue.pop(0) if queue else more()
            if task is None:
                exhausted = True
                return
            fut = pool.submit(*task)
            flight[fut] = task
            if isinstance(pool, InlinePool):  # ran already: report it before starting the next
                _drain({fut}, flight, on_done)

    top_up()
    while flight:
        done, _ = cf.wait(list(flight), timeout=1.0, return_when=cf.FIRST_COMPLETED)
        _drain(done, flight, on_done)
        top_up()
        tick(len(flight))


def _drain(done: set[cf.Future], flight: dict[cf.Future, tuple], on_done: Callable) -> None:
    for fut in done:
        task = flight.pop(fut)
        try:
            res: dict | BaseException = fut.result()
        except Exception as e:  # noqa: BLE001 - a task that crashed (or whose worker died) is reported, not fatal
            res = e
        on_done(task, res)

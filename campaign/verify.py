"""The main job: one verdict within a time budget, and the reports behind it.

Phases, in order, each with a share of the budget (unused time passes on to the next):
1. Z3 proofs — every invariant inductive over every clean transition (properties.prove);
2. CrossHair — the pure helpers' contracts (properties.crosshair_checks);
3. seeded bugs — for each chosen bug, its machines (in turns) against the patched cache until
   detection, then Hypothesis shrinking and a line-level pass; a report per detection;
4. clean exploration — every machine on the clean cache, in turns, for what is left.
Exit status 0 when the clean cache shows no violation (machines and proofs) and every chosen
seeded bug was detected.

The clean exploration also gathers coverage evidence (summary["coverage"]): the named rare events
of stateful_tests/events.py its steps reached (the verdict names those never reached), the rules
each machine ran, and branch coverage of refcache/ measured with coverage.py in a share of every
slice (measuring slows the machines about twofold, so not all of it).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import refcache
from stateful_tests import events
from stateful_tests.machines import MACHINES
from stateful_tests.seeded_bugs import SEEDED_BUGS

from .hunt import Hunt, hunt
from .pages import write_index
from .report import build_report

SLICE_S = 8.0  # one machine's turn when several share a phase
SHRINK_S = 20.0  # Hypothesis shrinking cap per failure
COVERAGE_SHARE = 0.25  # of every clean slice, run under coverage.py (0: no branch coverage)
REFCACHE_DIR = Path(refcache.__file__).resolve().parent


@dataclass
class Progress:
    """One status line on stderr, rewritten in place; finished phases keep their line."""

    t0: float = field(default_factory=time.monotonic)
    deadline: float = 0.0
    last: float = 0.0

    def __call__(self, msg: str, done: bool = False) -> None:
        left = max(0.0, self.deadline - time.monotonic())
        line = f"[verify {time.monotonic() - self.t0:6.1f}s, {left:5.0f}s left] {msg}"
        if sys.stderr.isatty():  # one live line on a terminal
            print(f"\r\033[K{line}", end="\n" if done else "", file=sys.stderr, flush=True)
        elif done or time.monotonic() - self.last >= 10:  # a log: finished phases, and a line every 10 s
            print(line, file=sys.stderr, flush=True)
            self.last = time.monotonic()


def _statement(check: str) -> str:
    try:
        from properties.registry import INVARIANTS
    except ImportError:  # the registry is optional for the campaign
        return ""
    inv = INVARIANTS.get(check)
    return inv.statement if inv else ("the cache disagrees with the abstract model (models/abstract.py) on "
                                      f"`{check.split(':', 1)[-1]}`" if check.startswith("model") else "")


def run_proofs(budget: float, progress: Progress, nodes: int) -> list[dict]:
    from properties.prove import run_all

    progress(f"Z3: proving invariants inductive over the transitions (N={nodes})")
    rows = run_all(nodes=nodes, budget_s=budget, bugs=False)
    proved = sum(r["status"] == "proved" for r in rows)
    progress(f"Z3: {proved}/{len(rows)} (invariant, transition) pairs proved for trees up to {nodes} nodes", done=True)
    return [{k: r.get(k) for k in ("invariant", "transition", "status", "nodes", "seconds")} for r in rows]


def run_crosshair(budget: float, progress: Progress) -> list[dict]:
    from properties.crosshair_checks import run

    progress("CrossHair: checking the pure helpers' contracts")
    rows = run(budget_s=budget)
    ok = sum(r.get("ok", r["status"] in ("confirmed", "no counterexample") if r["expect"] == "holds"
                   else r["status"] == "counterexample") for r in rows)
    progress(f"CrossHair: {ok}/{len(rows)} functions as expected", done=True)
    return rows


def bug_row(name: str, found: Hunt | None = None, spent: float = 0.0, steps: int = 0) -> dict:
    """A seeded bug's row of the summary, before any report (a hunt whose task crashed keeps it)."""
    bug = SEEDED_BUGS[name]
    return {"name": name, "bug_class": bug.bug_class, "description": bug.description, "detected": found is not None,
            "seconds": round(spent, 2), "steps_searched": steps, "steps_minimized": None, "invariant": None,
            "machine": found.machine if found else None, "report": None, "one_minimal": False,
            "shrink_capped": bool(found and found.shrink_capped)}


def hunt_bug(name: str, budget: float, seed: int, progress: Progress, out: Path) -> dict:
    """Turns over the bug's machines until one detects it; then shrink and report."""
    bug = SEEDED_BUGS[name]
    deadline = time.monotonic() + budget
    spent, steps, turn = 0.0, 0, 0
    found: Hunt | None = None
    while time.monotonic() < deadline and found is None:
        machine = bug.machines[turn % len(bug.machines)]
        slice_s = min(SLICE_S, deadline - time.monotonic())
        progress(f"bug {name}: hunting on {machine} ({spent:.1f}s, {steps} steps so far)")
        h = hunt(machine, seed * 100 + turn, slice_s, SHRINK_S, patch=bug.patch())
        spent += h.seconds
        steps += h.steps_run
        turn += 1
        if h.found:
            found = h
    row = bug_row(name, found, spent, steps)
    if found is None:
        progress(f"bug {name}: NOT detected in {spent:.0f}s ({steps} steps)", done=True)
        return row
    progress(f"bug {name}: detected on {found.machine} after {spent:.1f}s; minimizing")
    rep = build_report(found, name, f"Seeded bug {name}", "")
    if rep is not None:
        rep.statement = _statement(rep.replayed.check)
        files = rep.write(out / "bugs", name)
        row.update(steps_minimized=len(rep.rules), one_minimal=rep.one_minimal, invariant=rep.replayed.check,
                   report=f"bugs/{files['html']}",
                   report_md=f"bugs/{files['markdown']}", repro=f"bugs/{files['repro']}",
                   message=rep.replayed.message.splitlines()[0])
    else:  # Hypothesis's program did not replay: keep what the hunt saw
        row.update(steps_minimized=found.minimized_steps, invariant=found.invariant,
                   message=found.error.splitlines()[0] if found.error else "")
    progress(f"bug {name}: detected in {spent:.1f}s by {row['invariant']}, {row['steps_minimized']} minimized steps"
             + (" (Hypothesis's shrinking stopped at our cap; the line-level pass went on)" if row["shrink_capped"] else ""),
             done=True)
    return row


def run_conformance(name: str, budget: float, seed: int, progress: Progress, out: Path) -> dict:
    """The conformance machine against another cache (conformance/): agreement with our model."""
    from conformance.runner import run_target

    progress(f"conformance: {name} for {budget:.0f}s")
    res = run_target(name, max(5.0, budget), seed)
    if res.get("failure_report"):
        path = out / "conformance" / f"{name}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(res["failure_report"])
        res["report"] = f"conformance/{name}.md"
    state = (f"skipped ({res['skipped']})" if res.get("skipped")
             else f"{res['steps']} steps, {res['violations']} disagreements")
    progress(f"conformance: {name}: {state}", done=True)
    return {k: v for k, v in res.items() if k != "failure_report"}


# Run in a fresh interpreter: import every refcache module under coverage. Module-level lines ran
# when this process imported refcache, before any measurement could start; this counts them.
_IMPORT_UNDER_COVERAGE = """
import importlib, pkgutil, sys
import coverage
cov = coverage.Coverage(branch=True, source=[sys.argv[1]], data_file=sys.argv[2])
cov.start()
import refcache
for m in pkgutil.iter_modules(refcache.__path__):
    importlib.import_module("refcache." + m.name)
cov.stop()
cov.save()
"""


class BranchCoverage:
    """coverage.py with branch measurement over refcache/, on for the first `share` of each clean
    slice. Each slice (in whichever process ran it) saves its own data file into `data_dir`;
    `report` combines them with the module-level lines of a separate import of refcache. The
    steps/s of measured and unmeasured time give its overhead."""

    def __init__(self, share: float):
        import coverage

        self.version = coverage.__version__
        self.share = share
        self.runs = {True: [0, 0.0], False: [0, 0.0]}  # measured? -> [steps, seconds]
        self._tmp = tempfile.TemporaryDirectory(prefix="refcache-cov-")
        self.data_dir = self._tmp.name
        self._import = subprocess.Popen(  # runs beside the exploration; read at the end
            [sys.executable, "-c", _IMPORT_UNDER_COVERAGE, str(REFCACHE_DIR), str(Path(self.data_dir) / ".coverage.import")],
            cwd=REFCACHE_DIR.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def add(self, measured: bool, steps: int, seconds: float) -> None:
        self.runs[measured][0] += steps
        self.runs[measured][1] += seconds

    def report(self, out: Path) -> dict:
        """Per-module figures (and coverage/index.html, coverage.json in `out`), with how they were measured."""
        import coverage

        notes = []
        try:
            _, err = self._import.communicate(timeout=120)
            notes.append("module-level lines from a separate import of refcache under coverage"
                         if self._import.returncode == 0 else
                         f"module-level lines NOT counted (the import under coverage failed: {err.strip()[-200:]})")
        except subprocess.TimeoutExpired:
            self._import.kill()
            notes.append("module-level lines NOT counted (the import under coverage timed out)")
        try:
            cov = coverage.Coverage(branch=True, source=[str(REFCACHE_DIR)], data_file=str(Path(self.data_dir) / ".coverage"))
            cov.set_option("run:disable_warnings", ["no-data-collected"])
            cov.combine(data_paths=[self.data_dir], keep=False)
            cov.json_report(outfile=str(out / "coverage.json"))
            cov.html_report(directory=str(out / "coverage"), title="refcache: branch coverage of the clean exploration")
        finally:
            self._tmp.cleanup()
        files = json.loads((out / "coverage.json").read_text())
        branches = {}
        for path, f in sorted(files["files"].items()):
            branches[f"refcache/{Path(path).name}"] = _figures(f["summary"])
        branches["total"] = _figures(files["totals"])
        (sm, tm), (su, tu) = self.runs[True], self.runs[False]
        measured = (f"coverage.py {self.version} (branch), in the first {self.share:.0%} of each clean-exploration "
                    f"slice's time budget: {tm:.0f} s of {tm + tu:.0f} s, {sm} of {sm + su} steps")
        if sm and su and tm and tu:
            slow = (su / tu) / (sm / tm)
            measured += (f"; measuring, the machines ran {sm / tm:.0f} steps/s against {su / tu:.0f} unmeasured "
                         f"({slow:.1f}x slower), which cost the exploration about "
                         f"{tm / (tm + tu) * (1 - 1 / slow):.0%} of its steps")
        notes.append("seeded-bug hunts are not measured (they run patched caches)")
        return {"branches": branches, "measured": "; ".join([measured, *notes]), "report": "coverage/index.html"}


def _figures(summary: dict) -> dict:
    st, sc = summary["num_statements"], summary["covered_lines"]
    br, bc = summary["num_branches"], summary["covered_branches"]
    return {"statements": st, "statements_covered": sc, "statements_pct": round(100 * sc / st, 1) if st else 100.0,
            "branches": br, "branches_covered": bc, "branches_pct": round(100 * bc / br, 1) if br else 100.0,
            "partial_branches": summary["num_partial_branches"]}


def _branch_coverage(share: float) -> tuple[BranchCoverage | None, str]:
    """A meter, or None and why not."""
    if share <= 0:
        return None, "branch coverage not measured (turned off)"
    try:
        import coverage
    except ImportError:
        return None, "branch coverage not measured: coverage is not installed (pip install -e '.[test]')"
    if coverage.Coverage.current() is not None or sys.gettrace() is not None:
        return None, "branch coverage not measured: this process is already traced (coverage, a debugger)"
    return BranchCoverage(share), ""


def report_violation(h: Hunt, out: Path, stem: str) -> dict:
    """A clean-cache failure: minimized, replayed, written as a report with its repro file."""
    entry = {"machine": h.machine, "seed": h.seed, "invariant": h.invariant,
             "message": h.error.splitlines()[0] if h.error else h.error_type}
    rep = build_report(h, None, f"Violation on the clean cache: {h.machine}")
    if rep is not None:
        rep.statement = _statement(rep.replayed.check)
        files = rep.write(out / "clean", f"clean_{stem}_{h.machine.replace('/', '_')}")
        entry.update(invariant=rep.replayed.check, report=f"clean/{files['html']}", repro=f"clean/{files['repro']}",
                     steps_minimized=len(rep.rules), one_minimal=rep.one_minimal)
    return entry


class Campaign:
    """What the tasks of one run found, merged in the parent as each task finishes."""

    def __init__(self, out: Path, seed: int, device: str, jobs: int, meter: BranchCoverage | None):
        self.out, self.seed, self.device, self.jobs, self.meter = out, seed, device, jobs, meter
        self.proofs: list[dict] = []
        self.crosshair: list[dict] = []
        self.bugs: dict[str, dict] = {}
        self.conformance: list[dict] = []
        self.machines: dict[str, dict] = {m: {"steps": 0, "seconds": 0.0, "violations": 0} for m in MACHINES}
        self.failures: list[dict] = []
        self.events: Counter[str] = Counter()
        self.rules: dict[str, Counter[str]] = {}
        self.detector_errors: Counter[str] = Counter()
        self.task_errors: list[str] = []
        self.clean_turn = 0

    # ----------------------------------------------------------------- merging
    def add(self, task: tuple, res: dict | BaseException) -> str:
        """Merge one task's result; returns a line for the progress log (empty: nothing to say)."""
        fn, args = task[0], task[1:]
        if isinstance(res, dict) and res.get("files"):
            from .workers import write_files

            write_files(self.out, res["files"])
        if isinstance(res, BaseException):
            what = f"{fn.__name__}{tuple(a for a in args if isinstance(a, (str, list)))[:2]}"
            self.task_errors.append(f"{what}: {type(res).__name__}: {res}")
            return f"task {what} crashed: {type(res).__name__}: {res}"
        if "proofs" in res:
            self.proofs += res["proofs"]
            return ""
        if "crosshair" in res:
            self.crosshair = res["crosshair"]
            ok = sum(bool(r.get("ok")) for r in self.crosshair)
            return f"CrossHair: {ok}/{len(self.crosshair)} functions as expected"
        if "bug" in res:
            b = res["bug"]
            self.bugs[b["name"]] = b
            if not b["detected"]:
                return f"bug {b['name']}: NOT detected in {b['seconds']:.0f}s ({b['steps_searched']} steps)"
            return (f"bug {b['name']}: detected in {b['seconds']:.1f}s by {b['invariant']}, "
                    f"{b['steps_minimized']} minimized steps, {'1-minimal' if b.get('one_minimal') else 'not shown 1-minimal'}"
                    + (" (Hypothesis's shrinking stopped at our cap; the line-level pass went on)"
                       if b.get("shrink_capped") else ""))
        if "conformance" in res:
            c = res["conformance"]
            self.conformance.append(c)
            return (f"conformance: {c['target']}: " + (f"skipped ({c['skipped']})" if c.get("skipped")
                                                        else f"{c['steps']} steps, {c['violations']} disagreements"))
        c = res["clean"]
        m = self.machines[c["machine"]]
        m["steps"] += c["steps"]
        m["seconds"] += c["seconds"]
        m["violations"] += len(c["failures"])
        self.failures += c["failures"]
        self.events.update(c["events"])
        for name, counts in c["rules"].items():
            self.rules.setdefault(name, Counter()).update(counts)
        self.detector_errors.update(c["detector_errors"])
        if self.meter is not None and c["measured"] is not None:
            steps, secs = c["measured"]
            self.meter.add(True, steps, secs)
            self.meter.add(False, c["steps"] - steps, c["seconds"] - secs)
        return "".join(f"clean: VIOLATION on {f['machine']}: {f['invariant']}: {f['message']}" for f in c["failures"])

    # ------------------------------------------------------------- clean slices
    def next_clean(self, deadline: float, min_slice: float = 1.0, slice_s: float | None = None) -> tuple | None:
        """The next machine's slice, or None when the time is up. Every machine gets a turn in
        each round, however short the budget: a bug only one component mix or write policy
        reaches is otherwise never looked for."""
        from . import workers

        left = deadline - time.time()
        if left < min_slice:
            return None
        names = list(MACHINES)
        name = names[self.clean_turn % len(names)]
        left_in_round = len(names) - self.clean_turn % len(names)
        if slice_s is None:
            slice_s = min(SLICE_S, max(min_slice, left * max(1, self.jobs) / left_in_round), left)
        turn, self.clean_turn = self.clean_turn, self.clean_turn + 1
        cov_dir = self.meter.data_dir if self.meter is not None else None
        share = self.meter.share if self.meter is not None else 0.0
        return (workers.task_clean, name, self.seed * 1000 + turn, deadline, slice_s, str(turn), self.device,
                cov_dir, share)

    @property
    def clean_steps(self) -> int:
        return sum(m["steps"] for m in self.machines.values())

    def coverage(self, why_not: str, progress: Progress) -> dict:
        evidence = {"events": {n: self.events[n] for n in events.EVENTS},
                    "never_reached": [n for n in events.EVENTS if not self.events[n]],
                    "descriptions": dict(events.EVENTS),
                    "rules": {m: dict(sorted(self.rules[m].items())) for m in MACHINES if m in self.rules},
                    "detector_errors": dict(self.detector_errors), "branches": {}, "measured": why_not}
        if self.meter is not None:
            progress("clean: writing branch coverage")
            try:
                evidence.update(self.meter.report(self.out))
            except Exception as e:  # noqa: BLE001 - the verdict stands without the figures; say why they are missing
                evidence.update(measured=f"branch coverage not reported: {type(e).__name__}: {e}")
        return evidence


def explore_clean(budget: float, seed: int, progress: Progress, out: Path,
                  coverage_share: float = COVERAGE_SHARE, jobs: int = 1, pool=None) -> tuple[dict, list[dict]]:
    """Every machine on the clean cache, in turns; any failure is a violation with a report.
    The first dict also carries the coverage evidence (events, rules, branches) under "coverage".
    `pool`: workers already started (kept running), else `jobs` new ones for this call."""
    from . import workers

    meter, why_not = _branch_coverage(coverage_share)
    camp = Campaign(out, seed, "cpu", jobs, meter)
    deadline = time.time() + budget
    own = pool is None
    pool = workers.make_pool(jobs) if own else pool
    try:
        workers.run_tasks(pool, jobs, [], lambda: camp.next_clean(deadline),
                          lambda t, r: _log_line(progress, camp.add(t, r)),
                          lambda n: progress(f"clean: {camp.clean_steps} steps, {len(camp.failures)} violations"))
    finally:
        if own:
            pool.shutdown()
    total = camp.clean_steps
    progress(f"clean: {total} model-checked steps over {len(MACHINES)} machines, {len(camp.failures)} violations", done=True)
    evidence = camp.coverage(why_not, progress)
    return {"steps": total, "violations": len(camp.failures), "machines": camp.machines, "coverage": evidence}, camp.failures


def _log_line(progress: Progress, line: str) -> None:
    if line:
        progress(line, done=True)


# ------------------------------------------------------------------------------ the verdict
PASS, FAIL, INCOMPLETE = "PASS", "FAIL", "INCOMPLETE"
EXIT = {PASS: 0, FAIL: 1, INCOMPLETE: 3}  # 2 is argparse's: a usage error


def judge(summary: dict, proofs: bool, crosshair: bool) -> tuple[str, list[str], list[str]]:
    """PASS only when every proof ran and held, every chosen bug was found and the clean cache
    (and each conformance target) showed no violation. FAIL when a check failed: a violation,
    a counterexample, a disagreement, a seeded bug the suite did not find. INCOMPLETE when
    nothing failed but some work was not done. Returns (status, failed, not done)."""
    failed, not_done = [], []
    p = summary["proofs"]
    cex = [f"{r['invariant']}/{r['transition']}" for r in p if r["status"] == "counterexample"]
    if cex:
        failed.append(f"Z3 counterexamples: {', '.join(cex[:6])}{' ...' if len(cex) > 6 else ''}")
    if not proofs:
        not_done.append("Z3 proofs not run (--no-proofs)")
    elif (open_ := [r for r in p if r["status"] != "proved" and r["status"] != "counterexample"]) or not p:
        not_done.append(f"{len(open_)} of {len(p)} Z3 proofs not proved within the budget "
                        f"({', '.join(sorted({r['status'] for r in open_}))}; raise --budget or --jobs)" if p
                        else "Z3 proofs: none ran")
    ch = summary["crosshair"]
    wrong = [r["function"] for r in ch if not r.get("ok") and r["status"] == "counterexample"]
    if wrong:
        failed.append(f"CrossHair counterexamples: {', '.join(wrong)}")
    if not crosshair:
        not_done.append("CrossHair contracts not checked (--no-crosshair)")
    elif (unsure := [r["function"] for r in ch if not r.get("ok") and r["function"] not in wrong]) or not ch:
        not_done.append(f"CrossHair: {len(unsure)} of {len(ch)} functions not settled ({', '.join(unsure[:3])})"
                        if ch else "CrossHair: did not run")
    missed = [b for b in summary["bugs"] if not b["detected"]]
    if missed:
        failed.append("seeded bugs not detected: " + ", ".join(f"{b['name']} ({b['seconds']:.0f} s)" for b in missed))
    if summary["clean"]["violations"]:
        failed.append(f"{summary['clean']['violations']} violations on the clean cache")
    if not summary["clean"]["steps"]:
        not_done.append("clean exploration ran no steps")
    for c in summary["conformance"]:
        if c.get("violations"):
            failed.append(f"conformance {c['target']}: {c['violations']} disagreements")
        elif c.get("skipped"):
            not_done.append(f"conformance {c['target']} skipped: {c['skipped']}")
    not_done += [f"task crashed: {e}" for e in summary.get("task_errors", [])]
    status = FAIL if failed else INCOMPLETE if not_done else PASS
    return status, failed, not_done


# ------------------------------------------------------------------------------- the run
def plan_fixed(camp: Campaign, t0: float, budget: float, bugs: list[str], nodes: int, proofs: bool, crosshair: bool,
               targets: list[str]) -> list[tuple]:
    """The tasks that are not clean exploration, longest-first, each with its deadline (wall clock).
    Proofs may use up to 60 % of the budget, CrossHair 10 % (it spends what it is given), the
    hunts until 85 %; one round of clean exploration goes before the hunts, and after them clean
    exploration takes every worker that is free."""
    from properties.transitions import TRANSITIONS

    from . import workers

    tasks: list[tuple] = []
    if proofs:
        # the slowest transitions first, so the pool's tail is short
        order = sorted(TRANSITIONS, key=lambda t: -_PROOF_WEIGHT.get(t, 0.5))
        tasks += [(workers.task_proofs, [t], nodes, t0 + 0.6 * budget) for t in order]
    if crosshair:
        tasks.append((workers.task_crosshair, t0 + min(0.1 * budget, 60.0) + 1.0))
    # one round of clean exploration before the hunts: however long they take, every machine is
    # explored on the clean cache at least once
    first = max(2.0, 0.02 * budget)
    tasks += [t for _ in MACHINES if (t := camp.next_clean(t0 + budget, min_slice=first, slice_s=first)) is not None]
    tasks += [(workers.task_conformance, t, t0 + 0.5 * budget, camp.seed) for t in targets]
    tasks += [(workers.task_hunt, b, 0.5 * budget, t0 + 0.85 * budget, camp.seed, camp.device) for b in bugs]
    return tasks


# seconds per transition for all invariants at N=6 on one core (measured on a 2-core CPU): the
# order in which proof tasks start; the rest are under half a second
_PROOF_WEIGHT = {"poll_release": 7.2, "poll_ack": 6.3, "backup_fail": 4.9, "cascade": 3.4, "evict_host": 3.2,
                 "evict_demote": 2.4, "evict_delete": 2.4, "insert": 1.8, "prefetch_terminate": 1.6, "split": 1.6,
                 "load_fail": 1.4, "load_begin": 1.3, "evict_writeback": 1.0}


def verify(budget: float, out: Path, seed: int, bugs: list[str], device: str = "cpu", nodes: int = 6,
           proofs: bool = True, crosshair: bool = True, targets: list[str] | None = None,
           log: Callable[[str], None] = print, coverage_share: float = COVERAGE_SHARE, jobs: int = 1,
           cluster: str | None = None) -> int:
    """Run the campaign; write summary.json, summary.md, index.html and the reports; return the
    verdict's exit status (0 PASS, 1 FAIL, 3 INCOMPLETE). With `cluster` (a Dask scheduler
    address, or local:N) the tasks run on its workers and `jobs` is their thread count."""
    from . import workers

    t_start, t0 = time.monotonic(), time.time()
    where = f"{jobs} local worker process{'es' if jobs > 1 else ''}" if jobs > 1 else "this process"
    if cluster is not None:
        from .cluster import connect

        c = connect(cluster)  # ClusterError: the caller reports it; nothing has run
        pool, jobs, where = c.executor, c.jobs, c.where
        if not cluster.startswith("local:"):  # coverage data files live on the workers' disks
            coverage_share = 0.0
    else:
        pool = workers.make_pool(jobs)
    out.mkdir(parents=True, exist_ok=True)
    t_ready = time.monotonic()
    # workers start (spawn, import torch and the machines) before the clock: the phases' deadlines
    # are then time to work, not time to start up (several seconds per worker on a busy machine)
    for f in [pool.submit(workers.task_warm_up, 0.2) for _ in range(jobs if jobs > 1 else 0)]:
        f.result()
    start_up = round(time.monotonic() - t_ready, 1)
    t_start, t0 = time.monotonic(), time.time()  # the budget starts once the pool is there
    progress = Progress(deadline=time.monotonic() + budget)
    targets = targets or []
    meter, why_not = _branch_coverage(coverage_share)
    camp = Campaign(out, seed, device, jobs, meter)
    fixed = plan_fixed(camp, t0, budget, bugs, nodes, proofs, crosshair, targets)
    n_proof_tasks = sum(t[0] is workers.task_proofs for t in fixed)
    progress(f"{where} (started in {start_up} s, before the budget's clock): {n_proof_tasks} proof tasks (N={nodes})"
             f"{', CrossHair' if crosshair else ''}, {len(bugs)} seeded bugs, {len(targets)} targets, "
             "then clean exploration", done=True)
    proofs_reported = False

    def on_done(task: tuple, res: dict | BaseException) -> None:
        nonlocal proofs_reported
        _log_line(progress, camp.add(task, res))
        if not proofs_reported and n_proof_tasks and len({r["transition"] for r in camp.proofs}) == n_proof_tasks:
            proofs_reported = True
            proved = sum(r["status"] == "proved" for r in camp.proofs)
            progress(f"Z3: {proved}/{len(camp.proofs)} (invariant, transition) pairs proved for trees up to "
                     f"{nodes} nodes", done=True)

    def tick(in_flight: int) -> None:
        found = sum(b["detected"] for b in camp.bugs.values())
        proved = sum(r["status"] == "proved" for r in camp.proofs)
        progress(f"{in_flight} running; proofs {proved} proved; bugs {found}/{len(bugs)} found, "
                 f"{len(bugs) - len(camp.bugs)} to go; clean {camp.clean_steps} steps, {len(camp.failures)} violations")

    # the last seconds are kept for the coverage report, the invariant docs and the pages
    deadline = t0 + budget - min(5.0, 0.02 * budget)
    try:
        workers.run_tasks(pool, jobs, fixed, lambda: camp.next_clean(deadline), on_done, tick)
    finally:
        c.close() if cluster is not None else pool.shutdown()
    progress(f"clean: {camp.clean_steps} model-checked steps over {len(MACHINES)} machines, "
             f"{len(camp.failures)} violations", done=True)
    coverage = camp.coverage(why_not, progress)
    reached = sum(1 for n in coverage["events"].values() if n)
    progress(f"clean: {reached}/{len(events.EVENTS)} rare events reached"
             + (f", refcache/ branches {coverage['branches']['total']['branches_pct']}% covered"
                if coverage["branches"] else ""), done=True)

    rows = [camp.bugs.get(b) or bug_row(b) for b in bugs]  # in the order asked; a crashed hunt found nothing
    if camp.proofs:  # in the transitions' declared order, whichever worker finished first
        from properties.transitions import TRANSITIONS

        rank = {t: k for k, t in enumerate(TRANSITIONS)}
        camp.proofs.sort(key=lambda r: rank.get(r["transition"], len(rank)))
    summary: dict = {"budget_s": budget, "seed": seed, "device": device, "jobs": jobs, "where": where,
                     "start_up_s": start_up,
                     "bugs_requested": bugs,
                     "proofs": camp.proofs, "crosshair": camp.crosshair, "bugs": rows, "conformance": camp.conformance,
                     "clean": {"steps": camp.clean_steps, "violations": len(camp.failures)}, "machines": camp.machines,
                     "coverage": coverage, "clean_failures": camp.failures, "task_errors": camp.task_errors}
    status, failed, not_done = judge(summary, proofs, crosshair)
    detected = [r for r in rows if r["detected"]]
    summary["verdict"] = {
        "status": status, "failed": failed, "not_done": not_done,
        "clean_ok": not camp.failures and not any("counterexample" in f or "conformance" in f for f in failed),
        "bugs_detected": f"{len(detected)}/{len(rows)}",
        "median_detection_s": statistics.median([r["seconds"] for r in detected]) if detected else None,
        "elapsed_s": round(time.monotonic() - t_start, 1),
        "events_never_reached": coverage["never_reached"],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    try:  # the invariant docs for reviewers, with this run's proof and step figures
        from properties.docs import generate

        generate(out / "invariants", proofs=summary["proofs"] or None, steps={"steps": camp.clean_steps},
                 crosshair=summary["crosshair"] or None)
        summary["invariant_docs"] = "invariants/index.html"
    except Exception as e:  # noqa: BLE001 - the verdict stands without the docs; say why they are missing
        summary["invariant_docs"] = f"not written: {type(e).__name__}: {e}"
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    write_index(out, summary)
    proved = sum(p["status"] == "proved" for p in summary["proofs"])
    log(f"[verify] clean: {camp.clean_steps} steps, {len(camp.failures)} violations; proofs: {proved}/"
        f"{len(summary['proofs'])} proved (N={nodes}); bugs detected: {len(detected)}/{len(rows)}; rare events never "
        f"reached: {', '.join(coverage['never_reached']) or 'none'}; {where}, "
        f"{summary['verdict']['elapsed_s']} s; reports in {out}/index.html")
    for line in failed:
        log(f"[verify] FAILED: {line}")
    for line in not_done:
        log(f"[verify] NOT DONE: {line}")
    log(f"[verify] {status}")
    return EXIT[status]

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

import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import refcache
from stateful_tests import events
from stateful_tests.machines import MACHINES, CacheMachine
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
    row = {"name": name, "bug_class": bug.bug_class, "description": bug.description, "detected": found is not None,
           "seconds": round(spent, 2), "steps_searched": steps, "steps_minimized": None, "invariant": None,
           "machine": found.machine if found else None, "report": None}
    if found is None:
        progress(f"bug {name}: NOT detected in {spent:.0f}s ({steps} steps)", done=True)
        return row
    progress(f"bug {name}: detected on {found.machine} after {spent:.1f}s; minimizing")
    rep = build_report(found, name, f"Seeded bug {name}", "")
    if rep is not None:
        rep.statement = _statement(rep.replayed.check)
        files = rep.write(out / "bugs", name)
        row.update(steps_minimized=len(rep.rules), invariant=rep.replayed.check, report=f"bugs/{files['html']}",
                   report_md=f"bugs/{files['markdown']}", repro=f"bugs/{files['repro']}",
                   message=rep.replayed.message.splitlines()[0])
    else:  # Hypothesis's program did not replay: keep what the hunt saw
        row.update(steps_minimized=found.minimized_steps, invariant=found.invariant,
                   message=found.error.splitlines()[0] if found.error else "")
    progress(f"bug {name}: detected in {spent:.1f}s by {row['invariant']}, {row['steps_minimized']} minimized steps",
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
    slice; the steps/s of measured and unmeasured time give its overhead."""

    def __init__(self, share: float):
        import coverage

        self.version = coverage.__version__
        self.share = share
        self.cov = coverage.Coverage(branch=True, source=[str(REFCACHE_DIR)], data_file=None)
        self.runs = {True: [0, 0.0], False: [0, 0.0]}  # measured? -> [steps, seconds]
        self._tmp = tempfile.TemporaryDirectory(prefix="refcache-cov-")
        self._import_data = Path(self._tmp.name) / "import.coverage"
        self._import = subprocess.Popen(  # runs beside the exploration; read at the end
            [sys.executable, "-c", _IMPORT_UNDER_COVERAGE, str(REFCACHE_DIR), str(self._import_data)],
            cwd=REFCACHE_DIR.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    @contextlib.contextmanager
    def measuring(self) -> Iterator[None]:
        self.cov.start()
        try:
            yield
        finally:
            self.cov.stop()

    def add(self, measured: bool, steps: int, seconds: float) -> None:
        self.runs[measured][0] += steps
        self.runs[measured][1] += seconds

    def report(self, out: Path) -> dict:
        """Per-module figures (and coverage/index.html, coverage.json in `out`), with how they were measured."""
        from coverage import CoverageData

        notes = []
        try:
            _, err = self._import.communicate(timeout=120)
            if self._import.returncode == 0:
                imported = CoverageData(basename=str(self._import_data))
                imported.read()
                self.cov.get_data().update(imported)
                notes.append("module-level lines from a separate import of refcache under coverage")
            else:
                notes.append(f"module-level lines NOT counted (the import under coverage failed: {err.strip()[-200:]})")
        except subprocess.TimeoutExpired:
            self._import.kill()
            notes.append("module-level lines NOT counted (the import under coverage timed out)")
        finally:
            self._tmp.cleanup()
        self.cov.json_report(outfile=str(out / "coverage.json"))
        self.cov.html_report(directory=str(out / "coverage"), title="refcache: branch coverage of the clean exploration")
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


def explore_clean(budget: float, seed: int, progress: Progress, out: Path,
                  coverage_share: float = COVERAGE_SHARE) -> tuple[dict, list[dict]]:
    """Every machine on the clean cache, in turns; any failure is a violation with a report.
    The first dict also carries the coverage evidence (events, rules, branches) under "coverage"."""
    deadline = time.monotonic() + budget
    per: dict[str, dict] = {m: {"steps": 0, "seconds": 0.0, "violations": 0} for m in MACHINES}
    failures: list[dict] = []
    events.reset()
    meter, why_not = _branch_coverage(coverage_share)
    turn = 0
    while time.monotonic() < deadline - 1:
        name = list(MACHINES)[turn % len(MACHINES)]
        total = sum(p["steps"] for p in per.values())
        progress(f"clean: {total} steps, {len(failures)} violations; exploring {name}")
        # every machine gets a turn in each round, however short the budget: a bug that only one
        # component mix or write policy reaches is otherwise never looked for
        left_in_round = len(MACHINES) - turn % len(MACHINES)
        slice_s = min(SLICE_S, (deadline - time.monotonic()) / left_in_round)
        if meter is None:
            runs = [hunt(name, seed * 1000 + turn, slice_s, SHRINK_S, max_examples=5)]
        else:  # the first share of the slice under coverage, the rest without (two runs, two seeds)
            with meter.measuring():  # small Hypothesis runs: a whole run of 25 examples overshoots a short share
                runs = [hunt(name, seed * 1000 + turn, slice_s * meter.share, SHRINK_S, max_examples=5)]
            meter.add(True, runs[0].steps_run, runs[0].seconds)
            rest = min(slice_s * (1 - meter.share), deadline - time.monotonic())
            if not runs[0].found and rest > 0.5:
                runs.append(hunt(name, seed * 1000 + turn + 500_000, rest, SHRINK_S, max_examples=5))
                meter.add(False, runs[1].steps_run, runs[1].seconds)
        turn += 1
        for h in runs:
            per[name]["steps"] += h.steps_run
            per[name]["seconds"] += h.seconds
            if not h.found:
                continue
            per[name]["violations"] += 1
            rep = build_report(h, None, f"Violation on the clean cache: {name}")
            entry = {"machine": name, "seed": h.seed, "invariant": h.invariant, "message": h.error.splitlines()[0]}
            if rep is not None:
                rep.statement = _statement(rep.replayed.check)
                files = rep.write(out / "clean", f"clean_{len(failures)}_{name.replace('/', '_')}")
                entry.update(invariant=rep.replayed.check, report=f"clean/{files['html']}", repro=f"clean/{files['repro']}")
            failures.append(entry)
    total = sum(p["steps"] for p in per.values())
    progress(f"clean: {total} model-checked steps over {len(MACHINES)} machines, {len(failures)} violations", done=True)
    evidence = {"events": events.reached(), "never_reached": events.never_reached(), "descriptions": dict(events.EVENTS),
                "rules": events.rules(), "detector_errors": dict(events.ERRORS)}
    evidence.update(branches={}, measured=why_not)
    if meter is not None:
        progress("clean: writing branch coverage")
        try:
            evidence.update(meter.report(out))
        except Exception as e:  # noqa: BLE001 - the verdict stands without the figures; say why they are missing
            evidence.update(measured=f"branch coverage not reported: {type(e).__name__}: {e}")
    reached = sum(1 for n in evidence["events"].values() if n)
    progress(f"clean: {reached}/{len(events.EVENTS)} rare events reached"
             + (f", refcache/ branches {evidence['branches']['total']['branches_pct']}% covered"
                if evidence["branches"] else ""),
             done=True)
    return {"steps": total, "violations": len(failures), "machines": per, "coverage": evidence}, failures


def verify(budget: float, out: Path, seed: int, bugs: list[str], device: str = "cpu", nodes: int = 5,
           proofs: bool = True, crosshair: bool = True, targets: list[str] | None = None,
           log: Callable[[str], None] = print, coverage_share: float = COVERAGE_SHARE) -> int:
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(deadline=time.monotonic() + budget)
    t_start = time.monotonic()

    summary: dict = {"budget_s": budget, "seed": seed, "device": device, "bugs_requested": bugs}
    # Fixed shares of the budget; a phase that ends early passes its time on to the later ones.
    shares = (0.10, 0.05, 0.70) if bugs else (0.30, 0.10, 0.0)
    end_proofs = t_start + shares[0] * budget
    end_crosshair = end_proofs + shares[1] * budget
    end_bugs = end_crosshair + shares[2] * budget
    summary["proofs"] = run_proofs(end_proofs - time.monotonic(), progress, nodes) if proofs else []
    summary["crosshair"] = (run_crosshair(max(5.0, end_crosshair - time.monotonic()), progress)
                            if crosshair else [])
    rows = []
    for i, name in enumerate(bugs):
        share = max(5.0, (end_bugs - time.monotonic()) / (len(bugs) - i))
        rows.append(hunt_bug(name, share, seed, progress, out))
    summary["bugs"] = rows
    summary["conformance"] = [run_conformance(t, 0.5 * (budget - (time.monotonic() - t_start)) / (len(targets) - i),
                                              seed, progress, out) for i, t in enumerate(targets or [])]
    clean, failures = explore_clean(max(10.0, budget - (time.monotonic() - t_start)), seed, progress, out,
                                    coverage_share)
    summary["clean"] = {"steps": clean["steps"], "violations": clean["violations"]}
    summary["machines"] = clean["machines"]
    summary["coverage"] = clean["coverage"]
    summary["clean_failures"] = failures
    summary["checked_steps_total"] = CacheMachine.checked_steps
    bad_proofs = [p for p in summary["proofs"] if p["status"] == "counterexample"]
    detected = [r for r in rows if r["detected"]]
    bad_targets = [c for c in summary["conformance"] if c.get("violations")]
    summary["verdict"] = {
        "clean_ok": clean["violations"] == 0 and not bad_proofs and not bad_targets,
        "bugs_detected": f"{len(detected)}/{len(rows)}",
        "median_detection_s": statistics.median([r["seconds"] for r in detected]) if detected else None,
        "elapsed_s": round(time.monotonic() - t_start, 1),
        "events_never_reached": summary["coverage"]["never_reached"],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    try:  # the invariant docs for reviewers, with this run's proof and step figures
        from properties.docs import generate

        generate(out / "invariants", proofs=summary["proofs"] or None, steps={"steps": clean["steps"]},
                 crosshair=summary["crosshair"] or None)
        summary["invariant_docs"] = "invariants/index.html"
    except Exception as e:  # noqa: BLE001 - the verdict stands without the docs; say why they are missing
        summary["invariant_docs"] = f"not written: {type(e).__name__}: {e}"
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    write_index(out, summary)
    ok = summary["verdict"]["clean_ok"] and len(detected) == len(rows)
    log(f"[verify] clean: {clean['steps']} steps, {clean['violations']} violations; proofs: "
        f"{sum(p['status'] == 'proved' for p in summary['proofs'])}/{len(summary['proofs'])} proved; "
        f"bugs detected: {len(detected)}/{len(rows)}; rare events never reached: "
        f"{', '.join(summary['coverage']['never_reached']) or 'none'}; reports in {out}/index.html -> "
        f"{'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1
